"""The ``shopserve`` command: ``serve`` starts the Triton server, ``search`` queries it."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path


def serve(argv: list[str]) -> int:
    from shopserve.ensemble.profiles import USER_KEY_FILE_ENV

    from .server import ServerConfig, ServerError, TritonServer

    parser = argparse.ArgumentParser(
        prog="shopserve serve", description="Serve a built model repository with tritonserver."
    )
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument(
        "--log-file", type=Path, help="write the server's log here (default: stdout)"
    )
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument(
        "--profile-store",
        help="a personalised store's live profiles: a path, sqlite:///path, or redis://host:port/db "
        "to share them between servers (default: a SQLite file under .triton/profiles/)",
    )
    parser.add_argument(
        "--user-key-file",
        type=Path,
        help="the secret that user ids are hashed with (a personalised store needs it; default: "
        "$SHOPSERVE_USER_KEY_FILE)",
    )
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for readiness")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.user_key_file is not None:
        os.environ[USER_KEY_FILE_ENV] = str(args.user_key_file.resolve())
    server = TritonServer(
        ServerConfig(
            args.model_repository,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            log_verbose=args.log_verbose,
            profile_store=args.profile_store,
        ),
        log_file=args.log_file,
        inherit_output=args.log_file is None,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server.start(timeout=args.timeout)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"shopserve ready: gRPC {server.grpc_url}  HTTP {server.http_url}  "
        f"metrics {server.metrics_url}  (Ctrl-C to stop)",
        flush=True,
    )
    while not stop.wait(0.5):
        if server.process is None or server.process.poll() is not None:
            print("error: tritonserver exited", file=sys.stderr)
            return 1
    print("stopping tritonserver ...", flush=True)
    server.stop()
    return 0


def keys(argv: list[str]) -> int:
    """``shopserve keys create FILE``: a new secret for hashing user ids, readable by its owner only."""
    from shopserve.ensemble.profiles import new_secret

    parser = argparse.ArgumentParser(
        prog="shopserve keys", description="Create the secret that user ids are hashed with."
    )
    parser.add_argument("action", choices=["create"])
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.file.exists():
        print(
            f"error: {args.file} exists; a new secret would orphan every profile", file=sys.stderr
        )
        return 1
    args.file.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(new_secret() + b"\n")
    print(f"wrote a new user-id secret to {args.file} (mode 600); keep it out of version control")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = (
        "usage: shopserve {serve,search,recommend,events,forget,keys} [options]  "
        "(shopserve COMMAND --help for more)"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("search", "recommend"):
        from shopserve.client._cli import main as query

        return query(rest, recommend=command == "recommend")
    if command == "keys":
        return keys(rest)
    if command in ("events", "forget"):
        from shopserve.client import _cli

        return (_cli.events_main if command == "events" else _cli.forget_main)(rest)
    if command == "serve":
        return serve(rest)
    print(f"error: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2
