"""The ``shopserve`` command: ``serve`` starts the Triton server, ``search`` queries it."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shopserve.ensemble.profile_store import ProfileStore


def serve_parser() -> argparse.ArgumentParser:
    """``shopserve serve``'s options (also checked against deploy/'s container commands)."""
    from shopserve.ensemble.store import DEFAULT_REPOSITORY

    parser = argparse.ArgumentParser(
        prog="shopserve serve", description="Serve a built model repository with tritonserver."
    )
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument(
        "--http-address",
        default="127.0.0.1",
        help="where HTTP (health probes /v2/health/live and /ready) and metrics listen (default: "
        "loopback; 0.0.0.0 in a container whose orchestrator probes them)",
    )
    parser.add_argument(
        "--log-file", type=Path, help="write the server's log here (default: stdout)"
    )
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where the server keeps its backends and the live SQLite profiles (default: .triton "
        "beside the model repository); must be writable and, for SQLite profiles, persistent",
    )
    parser.add_argument(
        "--profile-store",
        help="a personalised store's live profiles: a path, sqlite:///path, or redis://host:port/db "
        "(rediss:// for TLS) to share them between servers (default: "
        "WORK_DIR/profiles/live.sqlite)",
    )
    parser.add_argument("--tls-cert", type=Path, help="serve gRPC over TLS: the certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    parser.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates signed by this CA (PEM)"
    )
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        help="a file holding the key that admin operations (model load/unload, repository index, "
        "logging, tracing) and forget require (gRPC header triton-grpc-protocol-shopserve-admin-key)",
    )
    parser.add_argument(
        "--inference-key-file",
        type=Path,
        help="require this key (gRPC header triton-grpc-protocol-shopserve-inference-key) on every inference request",
    )
    parser.add_argument(
        "--user-key-file",
        type=Path,
        help="the secret that user ids are hashed with (a personalised store needs it; default: "
        "$SHOPSERVE_USER_KEY_FILE)",
    )
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for readiness")
    return parser


def serve(argv: list[str]) -> int:
    from shopserve.ensemble.profiles import USER_KEY_FILE_ENV

    from .server import ServerConfig, ServerError, TritonServer

    args = serve_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.user_key_file is not None:
        if not args.user_key_file.is_file():
            print(f"error: --user-key-file {args.user_key_file} is not a file", file=sys.stderr)
            return 1
        os.environ[USER_KEY_FILE_ENV] = str(args.user_key_file.resolve())
    server = TritonServer(
        ServerConfig(
            args.model_repository,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            http_address=args.http_address,
            work_dir=args.work_dir,
            log_verbose=args.log_verbose,
            profile_store=args.profile_store,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            admin_key=_read_key(args.admin_key_file),
            inference_key=_read_key(args.inference_key_file),
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
            server.stop()
            return 1
    print("stopping tritonserver ...", flush=True)
    server.stop()
    return 0


def _read_key(path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        raise SystemExit(f"error: the key file {path} is not a file")
    key = path.read_text().strip()
    if len(key) < 16:
        raise SystemExit(f"error: the key in {path} is shorter than 16 characters")
    return key


def keys(argv: list[str]) -> int:
    """``shopserve keys create FILE``: a new secret (the user-id secret, or an admin or inference
    key), readable by its owner only."""
    from shopserve.ensemble.profiles import new_secret

    parser = argparse.ArgumentParser(
        prog="shopserve keys",
        description="Create a secret: the user-id secret, or an admin or inference key.",
    )
    parser.add_argument("action", choices=["create"])
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.file.exists():
        print(
            f"error: {args.file} exists; a new secret would orphan every profile", file=sys.stderr
        )
        return 1
    try:  # its own folder (.secrets/) is made, readable by its owner only; not a missing path
        args.file.parent.mkdir(mode=0o700, exist_ok=True)
    except FileNotFoundError:
        print(f"error: {args.file.parent.parent} does not exist", file=sys.stderr)
        return 1
    descriptor = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(new_secret() + b"\n")
    print(f"wrote a new secret to {args.file} (mode 600); keep it out of version control")
    return 0


def events_export(argv: list[str]) -> int:
    """``shopserve events export``: the live store's event log as an events file (hashed ids)."""
    from shopserve.ensemble.profile_store import export_log

    parser = argparse.ArgumentParser(
        prog="shopserve events export",
        description="Write the live store's event log (every accepted event and erasure) as a "
        "CSV in the events format, user ids as their keyed hashes (column user_key).",
    )
    parser.add_argument("output", type=Path)
    parser.add_argument(
        "--profile-store",
        required=True,
        help="the server's live store: WORK_DIR/profiles/live.sqlite, or its redis:// location",
    )
    parser.add_argument(
        "--since",
        type=float,
        default=0.0,
        help="only events accepted at or after this Unix time (erasures always)",
    )
    args = parser.parse_args(argv)

    def export(store: ProfileStore) -> str:
        events, erasures = export_log(store, args.output, args.since)
        return f"wrote {events} events and {erasures} erasures to {args.output}"

    return _on_live_store(args.profile_store, True, export)


def catalogue_export(argv: list[str]) -> int:
    """``shopserve catalogue export``: the catalogue log as an update file for the next build."""
    from shopserve.ensemble.catalogue_log import export_updates, open_catalogue_log
    from shopserve.ensemble.profile_store import sqlite_path
    from shopserve.ensemble.redis_link import is_redis

    parser = argparse.ArgumentParser(
        prog="shopserve catalogue export",
        description="Write each product's latest state in the catalogue log (upserted or deleted "
        "while serving) as a CSV for the next build (python -m shopserve.export build "
        "--catalogue-log FILE).",
    )
    parser.add_argument("output", type=Path)
    parser.add_argument(
        "--catalogue-log",
        required=True,
        help="the server's log: WORK_DIR/catalogue/catalogue.sqlite, or its redis:// location",
    )
    args = parser.parse_args(argv)
    if not is_redis(args.catalogue_log) and not Path(sqlite_path(args.catalogue_log)).is_file():
        print(f"error: no catalogue log at {args.catalogue_log}", file=sys.stderr)
        return 1
    try:
        log = open_catalogue_log(args.catalogue_log)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        written = export_updates(log, args.output)
    finally:
        log.close()
    print(
        f"wrote {written['products']} products ({written['deletes']} deleted) to {args.output}, "
        f"updates logged through {written['through']}"
    )
    return 0


def events_compact(argv: list[str]) -> int:
    """``shopserve events compact``: drop logged events a build has folded."""
    parser = argparse.ArgumentParser(
        prog="shopserve events compact",
        description="Delete the logged events accepted before a time (erasure records are kept): "
        "do it once every build a server may start on has folded them.",
    )
    parser.add_argument("--profile-store", required=True, help="the server's live store")
    parser.add_argument(
        "--before", type=float, required=True, help="Unix time: delete events accepted before it"
    )
    args = parser.parse_args(argv)
    return _on_live_store(
        args.profile_store,
        False,
        lambda store: (
            f"deleted {store.compact(args.before)} logged events accepted before {args.before}"
        ),
    )


def _on_live_store(location: str, readonly: bool, action: Callable[[ProfileStore], str]) -> int:
    """Open the live store at ``location`` (a Redis log is named by the user-id secret), run
    ``action`` on it and print what it says; an unusable location or secret is an error."""
    from shopserve.ensemble.profile_store import open_store, store_failed, store_failures
    from shopserve.ensemble.profiles import MissingUserKeyError, UserKeys

    failures = store_failures(location)
    try:
        store = open_store(location, readonly, log_name=UserKeys.from_environment().log_name())
    except (MissingUserKeyError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except failures as exc:  # Redis down or unreachable
        print(f"error: {store_failed(location, exc, 'opened')}", file=sys.stderr)
        return 1
    try:
        print(action(store))
    except failures as exc:
        print(
            f"error: {store_failed(location, exc, 'read' if readonly else 'written')}",
            file=sys.stderr,
        )
        return 1
    finally:
        store.close()
    return 0


def rollout(argv: list[str]) -> int:
    """``shopserve rollout``: switch a running server to another version of its store."""
    from shopserve.client._cli import _connection, _security
    from shopserve.ensemble.store import DEFAULT_REPOSITORY

    from .rollout import Rollout, RolloutError

    parser = argparse.ArgumentParser(
        prog="shopserve rollout",
        description="Load another version of every model of the store on a running server, with "
        "no failed request (Triton's model control); check its files first.",
    )
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int, help="the version to serve")
    which.add_argument(
        "--rollback", action="store_true", help="serve the newest version below the live one"
    )
    _connection(parser, timeout=300.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    control = Rollout(args.url, _security(args), args.timeout)
    try:
        version = control.previous(args.model_repository) if args.rollback else args.version
        live = control.roll_to(args.model_repository, version)
    except RolloutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        control.close()
    print(f"live (as the server says): {json.dumps(live)}")
    return 0


def verify(argv: list[str]) -> int:
    """``shopserve verify``: check a store's files against its manifest, as ``serve`` and
    ``rollout`` do before they use a version (for a store that is already being served)."""
    from shopserve.ensemble import store

    parser = argparse.ArgumentParser(
        prog="shopserve verify",
        description="Check every file of a version of a store against the SHA-256 its build "
        "recorded, as serve and rollout do before they use it; exit 1 naming the first file that "
        "is missing or differs.",
    )
    parser.add_argument("--model-repository", type=Path, default=store.DEFAULT_REPOSITORY)
    parser.add_argument(
        "--version", type=int, help="the version to check (default: the one the store serves)"
    )
    args = parser.parse_args(argv)
    repository = args.model_repository
    if not (repository / "manifest.json").is_file():
        print(f"error: {repository} is not a built store (no manifest.json)", file=sys.stderr)
        return 1
    version = store.served_version(repository) if args.version is None else args.version
    started = time.perf_counter()
    try:
        store.verify_version(repository, version)
    except store.StoreIntegrityError as exc:
        print(f"error: {repository}: {exc}", file=sys.stderr)
        return 1
    print(
        f"{repository} version {version}: every file matches its manifest checksum "
        f"({time.perf_counter() - started:.1f} s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = (
        "usage: shopserve {serve,search,recommend,events,forget,catalogue,rollout,verify,keys} "
        "[options]  (shopserve COMMAND --help for more)"
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
    if command == "rollout":
        return rollout(rest)
    if command == "verify":
        return verify(rest)
    if command == "events" and rest[:1] == ["export"]:
        return events_export(rest[1:])
    if command == "events" and rest[:1] == ["compact"]:
        return events_compact(rest[1:])
    if command == "catalogue" and rest[:1] == ["export"]:
        return catalogue_export(rest[1:])
    if command in ("events", "forget", "catalogue"):
        from shopserve.client import _cli

        mains = {"events": _cli.events_main, "forget": _cli.forget_main}
        return mains.get(command, _cli.catalogue_main)(rest)
    if command == "serve":
        return serve(rest)
    print(f"error: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2
