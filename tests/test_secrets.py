"""Secrets stay secret: ``shopserve serve`` with every key set (operator's key, inference key, the
user-id secret, a Redis password), driven through every endpoint including refused calls; then no
key, password or user id appears in the launcher's output or the server's log (tritonserver and
every backend stub write there)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shopserve.client import Event, PermissionDeniedError, SearchClient, Security

from benchmarks.local_redis import running_redis
from shopserve.server import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.server]

ADMIN = "secret-operator-key-7f3a9c"
INFERENCE = "secret-inference-key-51be02"
REDIS_PASSWORD = "secret-redis-password-c4d8e1"
SHOPPERS = ("secret-shopper-9a7b", "7")


def test_no_secret_or_user_id_reaches_any_log(personal_repository, user_key_file, tmp_path):
    for name, value in (("admin.key", ADMIN), ("inference.key", INFERENCE)):
        (tmp_path / name).write_text(value + "\n")
    grpc_port, http_port, metrics_port = free_ports(3)
    server_log = tmp_path / "server.log"
    with running_redis(tmp_path, REDIS_PASSWORD) as redis:
        command = [
            str(Path(sys.executable).parent / "shopserve"), "serve",
            "--model-repository", str(personal_repository),
            "--grpc-port", str(grpc_port), "--http-port", str(http_port),
            "--metrics-port", str(metrics_port),
            "--admin-key-file", str(tmp_path / "admin.key"),
            "--inference-key-file", str(tmp_path / "inference.key"),
            "--user-key-file", str(user_key_file),
            "--profile-store", redis,
            "--log-file", str(server_log),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOPSERVE_USER")}
        launcher = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        try:
            url = f"127.0.0.1:{grpc_port}"
            security = Security(inference_key=INFERENCE, admin_key=ADMIN)
            with SearchClient(url, timeout=30, security=security) as client:
                for _ in range(240):
                    if client.ready():
                        break
                    time.sleep(0.5)
                for shopper in SHOPPERS:
                    client.search("yogurt", top_k=3, user_id=shopper)
                    client.recommend(shopper, top_k=3)
                    client.record_many([Event(shopper, 196, "add_to_cart")])
                assert client.forget(SHOPPERS[0]) is True
            wrong = Security(inference_key=INFERENCE, admin_key="secret-wrong-operator-key")
            with (
                SearchClient(url, timeout=30, security=wrong) as client,
                pytest.raises(PermissionDeniedError),
            ):
                client.forget(SHOPPERS[1])
            with SearchClient(url, timeout=30) as client, pytest.raises(PermissionDeniedError):
                client.search("yogurt", top_k=3)
        finally:
            launcher.send_signal(signal.SIGTERM)
            output, _ = launcher.communicate(timeout=60)
    logs = {"launcher": output, "server": server_log.read_text(errors="replace")}
    assert "shopserve ready" in output and "***" in output  # the redacted command line
    secrets = [ADMIN, INFERENCE, REDIS_PASSWORD, "secret-wrong-operator-key", *SHOPPERS[:1]]
    secrets.append(user_key_file.read_text().strip())
    for where, text in logs.items():
        for secret in secrets:
            assert secret not in text, f"{secret[:12]}... appears in the {where} log"
