"""The launcher's preparations, without starting tritonserver."""

from __future__ import annotations

import socket
import threading

import pytest

from shopserve.cli import keys, serve
from shopserve.server import (
    ServerConfig,
    TritonServer,
    free_ports,
    ports_in_use,
    prepare_backend_directory,
    triton_failure,
)


def test_a_current_backend_directory_is_left_alone_and_a_stale_file_replaced_by_rename(
    tmp_path,
) -> None:
    """A running server has these files loaded: writing over one in place crashes it."""
    backends = prepare_backend_directory(tmp_path / "backends")
    library = backends / "python" / "libtriton_python.so"
    stub = backends / "python" / "triton_python_backend_stub"
    loaded = library.stat().st_ino, stub.readlink(), (backends / "onnxruntime" / "model.py").stat()
    prepare_backend_directory(tmp_path / "backends")
    assert library.stat().st_ino == loaded[0] and stub.readlink() == loaded[1]
    assert (backends / "onnxruntime" / "model.py").stat().st_ino == loaded[2].st_ino

    original = library.read_bytes()
    library.write_bytes(b"an outdated copy")
    outdated = library.stat().st_ino
    prepare_backend_directory(tmp_path / "backends")
    assert library.stat().st_ino != outdated and library.read_bytes() == original
    assert not list(backends.rglob("*.partial"))


def test_ports_in_use_names_only_the_taken_ones() -> None:
    free, taken = free_ports(2)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", taken))
        listener.listen()
        found = ports_in_use({"gRPC": ("", taken), "HTTP": ("127.0.0.1", free)})
    assert found == [f"gRPC {taken}"]
    assert ports_in_use({"gRPC": ("", taken)}) == []  # closed again


def test_keys_create_makes_its_own_folder_private_but_not_a_missing_path(tmp_path, capsys) -> None:
    assert keys(["create", str(tmp_path / ".secrets" / "admin.key")]) == 0
    assert (tmp_path / ".secrets").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / ".secrets" / "admin.key").stat().st_mode & 0o777 == 0o600
    assert keys(["create", str(tmp_path / "missing" / "folder" / "k")]) == 1
    assert f"error: {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_serve_names_a_key_file_that_is_missing(tmp_path, capsys) -> None:
    store = ["--model-repository", str(tmp_path)]
    assert serve([*store, "--user-key-file", str(tmp_path / "user.key")]) == 1
    assert (
        f"error: --user-key-file {tmp_path / 'user.key'} is not a file" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit, match=r"error: the key file .*admin\.key is not a file"):
        serve([*store, "--admin-key-file", str(tmp_path / "admin.key")])


def test_the_reason_for_a_failed_start_is_tritons_own_line() -> None:
    log = "\n".join(
        [
            "E1206 09:00:00.000 1 cuda.cc:1] CudaDriverHelper has not been initialized.",
            "E1206 09:00:01.000 1 chttp2_server.cc:1053] UNKNOWN:No address added out of total 1",
            'E1206 09:00:01.100 1 main.cc:245] "failed to start GRPC service: Unavailable - '
            "Socket '0.0.0.0:8001' already in use\"",
        ]
    )
    assert triton_failure(log) == (
        "failed to start GRPC service: Unavailable - Socket '0.0.0.0:8001' already in use"
    )
    assert triton_failure(log.splitlines()[1]).startswith("UNKNOWN:No address added")
    assert triton_failure(log.splitlines()[0]) is None


def test_only_a_port_in_use_is_called_taken() -> None:
    """An address this host cannot bind (or may not) is Triton's to refuse, in its own words."""
    (port,) = free_ports(1)
    assert ports_in_use({"HTTP": ("192.0.2.1", port), "gRPC": ("no-such-host.invalid", port)}) == []
    with socket.socket(socket.AF_INET6) as listener:
        try:
            listener.bind(("::1", port))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        listener.listen()
        assert ports_in_use({"HTTP": ("::1", port)}) == [f"HTTP {port}"]


def test_a_port_let_go_within_the_grace_is_not_refused(tmp_path) -> None:
    """A restart right after a stop: the stopping server still listens for a moment."""
    grpc_port, http_port, metrics_port = free_ports(3)
    config = ServerConfig(
        tmp_path, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port
    )
    listener = socket.socket()
    listener.bind(("", grpc_port))
    listener.listen()
    closing = threading.Timer(1.0, listener.close)
    closing.start()
    try:
        TritonServer(config)._check_ports()  # returns once the port is free
    finally:
        closing.join()
    assert ports_in_use({"gRPC": ("", grpc_port)}) == []
