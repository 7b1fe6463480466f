"""Paths, logging, the shared CPU lock and small helpers used by every benchmark module."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
BENCH_DIR = PROJECT / "benchmarks"
WORK_DIR = BENCH_DIR / "work"  # git-ignored: repository variants, caches, server logs
RESULTS_DIR = BENCH_DIR / "results"
BUILT_REPOSITORY = PROJECT / "stores" / "homedepot"  # make store

# Heavy measurements hold this lock (flock(2), the same lock `flock /tmp/shopserve-cpu.lock CMD`
# takes), so that they never overlap other heavy jobs on the two shared cores. Empty disables it.
CPU_LOCK = os.environ.get("SHOPSERVE_CPU_LOCK", "/tmp/shopserve-cpu.lock")

log = logging.getLogger("benchmarks")


class BenchmarkError(RuntimeError):
    """A benchmark step cannot go on; the message says why."""


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its search for AVX builds


@contextlib.contextmanager
def cpu_lock(what: str) -> Iterator[None]:
    """Hold the machine-wide CPU lock while ``what`` runs (waits for other holders).

    Do not wrap a command that takes this lock in ``flock`` on the same file: it would wait for
    itself (set ``SHOPSERVE_CPU_LOCK=`` to disable the lock instead).
    """
    if not CPU_LOCK:
        yield
        return
    with open(CPU_LOCK, "a") as handle:
        started = time.monotonic()
        next_note = 0.0
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited >= next_note:
                    log.info(
                        "waiting %.0f s for %s (another heavy job holds it) before: %s%s",
                        waited,
                        CPU_LOCK,
                        what,
                        "; if this command runs under flock on that file, set SHOPSERVE_CPU_LOCK="
                        if waited >= 600
                        else "",
                    )
                    next_note += 60
                time.sleep(1)
        if time.monotonic() - started > 1:
            log.info("got %s after %.0f s", CPU_LOCK, time.monotonic() - started)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def repository_key(repository: Path) -> str:
    """A short key of a built repository: its manifest's checksum (the manifest lists every file's)."""
    manifest = Path(repository) / "manifest.json"
    if not manifest.exists():
        raise BenchmarkError(
            f"{repository} holds no built model repository (manifest.json is missing); "
            "build it first: make store"
        )
    return sha256_file(manifest)[:16]


def provenance(described: dict, name: str) -> str:
    """The line under a results table's title: the commit, the date, the command that wrote it."""
    return (
        f"Commit {described['git_commit']}, {described['date_utc']}; written by "
        f"`python -m benchmarks {name}` (benchmarks/{name}.py)."
    )


def write_results(out: Path, name: str, result: dict, markdown: str) -> Path:
    """``out/NAME.json`` (the numbers) and ``out/NAME.md`` (their table); the latter's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    path = out / f"{name}.md"
    path.write_text(markdown)
    return path
