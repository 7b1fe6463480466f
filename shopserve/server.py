"""Launch the real ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel.

The wheel carries the server, the Python backend and a Python 3.11 backend stub, but no ONNX Runtime
backend. ``prepare_backend_directory`` lays out a backend directory the way the server accepts it on a
CPU-only machine (see ``../shared/notes/triton-on-cpu.md``):

* ``python/libtriton_python.so`` and ``python/triton_python_backend_utils.py`` are real copies
  (a symlinked library is refused as "escaping the backend directory");
* ``python/triton_python_backend_stub`` is a symlink to the wheel's 3.11 stub (a copy cannot find its
  shared libraries);
* ``onnxruntime/model.py`` is shopserve's Python-based ONNX Runtime backend, so the model configs say
  ``backend: "onnxruntime"`` exactly as they would for the native backend on a GPU Triton build.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from shopserve.client._client import ADMIN_KEY_NAME, INFERENCE_KEY_NAME
from shopserve.ensemble import store
from shopserve.ensemble.catalogue_log import CATALOGUE_LOG_ENV, CATALOGUE_LOG_FILE
from shopserve.ensemble.models import (
    PREPACKED_DIR_ENV,
    int8_sums,
    int8_sums_mismatch,
    prepacked_model,
)
from shopserve.ensemble.personal import (
    BuildProducts,
    check_user_key,
    profile_namespace,
    snapshot_path,
)
from shopserve.ensemble.profile_store import (
    LIVE_PROFILES_FILE,
    PROFILE_STORE_ENV,
    seed,
    store_failed,
    store_failures,
)
from shopserve.ensemble.profiles import MissingUserKeyError, UserKeys, WrongUserKeyError
from shopserve.ensemble.redis_link import is_redis, public_location

log = logging.getLogger("shopserve.server")

ADMIN_PROTOCOLS = "model-repository,logging,trace"
ADMIN_KEY_ENV = "SHOPSERVE_ADMIN_KEY"  # the models read it: forget checks the caller's key

EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
PRIVATE_PORTS_FROM = 10000  # free_ports draws from here up to the ephemeral range
ORT_BACKEND_SOURCE = Path(__file__).resolve().parent / "ort_backend.py"
SHM_DIR = Path("/dev/shm")
PORTS_GRACE_S = 10.0  # how long a port in use may take to be let go before start() refuses it
# Error lines this Triton build writes on every start on a machine without a GPU driver.
NO_GPU_ERRORS = ("CudaDriverHelper has not been initialized", "CUDA driver version is insufficient")
TRITON_ERROR_LINE = re.compile(r'^E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] "?(.*?)"?$')


class ServerError(RuntimeError):
    """The Triton server could not be prepared, started or reached."""


def pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ServerError(
            "nvidia-pytriton is not installed; install the serving extra: pip install '.[serve]'"
        ) from exc
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def prepare_backend_directory(destination: Path) -> Path:
    """Create (or refresh) a backend directory that the bundled server can load.

    Another server may be running from the same directory (a second store in one work folder, a
    second launch): a file it has loaded is never written over, since rewriting a loaded library
    in place crashes that server. A file that is already current is left alone, and one that is
    not is replaced by a rename, which leaves a running server its old copy."""
    root = pytriton_root()
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = stub / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"no Python backend stub for Python {sys.version_info[:2]} in {root}")
    python_dir = destination / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _install_copy(root / "backends" / "python" / name, python_dir / name)
    link = python_dir / "triton_python_backend_stub"
    if not (link.is_symlink() and link.readlink() == stub):
        partial = link.with_name(f"{link.name}.{os.getpid()}.partial")
        partial.unlink(missing_ok=True)
        partial.symlink_to(stub)
        partial.replace(link)
    ort_dir = destination / "onnxruntime"
    ort_dir.mkdir(parents=True, exist_ok=True)
    _install_copy(ORT_BACKEND_SOURCE, ort_dir / "model.py")
    return destination


def _install_copy(source: Path, target: Path) -> None:
    """Make ``target`` a copy of ``source``: left alone when it already is one (same size and
    modification time, as copy2 keeps them), else written beside it and renamed into place."""
    wanted = source.stat()
    with contextlib.suppress(FileNotFoundError):
        held = target.stat()
        if (held.st_size, held.st_mtime_ns) == (wanted.st_size, wanted.st_mtime_ns):
            return
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    shutil.copy2(source, partial)
    partial.replace(target)


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands to outgoing connections and to binds to port 0."""
    try:
        return int(Path(EPHEMERAL_RANGE_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free now (bound together, so none repeats).

    They are drawn below the kernel's ephemeral range where it leaves room: a port from that
    range could be taken, before the server binds it, by any outgoing connection's own end."""
    below = range(PRIVATE_PORTS_FROM, _ephemeral_floor())
    candidates = random.sample(below, len(below)) if len(below) >= 1000 else [0] * count
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for candidate in candidates:
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("", candidate))
            except OSError:
                continue
            ports.append(sock.getsockname()[1])
            if len(ports) == count:
                return ports
    raise ServerError(f"no {count} free TCP ports were found")


def ports_in_use(ports: dict[str, tuple[str, int]]) -> list[str]:
    """Which of the named (address, port) pairs another process listens on now: Triton would
    fail to bind them, and until it exits that process would answer the readiness probes. Only
    that is reported: an address this host cannot bind, or a port it may not, is left for Triton
    to refuse in its own words."""
    taken = []
    for name, (address, port) in ports.items():
        try:
            family, kind, _, _, where = socket.getaddrinfo(
                address or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
        except socket.gaierror:
            continue
        with socket.socket(family, kind) as sock:
            # As a listening server binds: a port whose last connection is in TIME_WAIT is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(where)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    taken.append(f"{name} {port}")
    return taken


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def triton_failure(log_text: str) -> str | None:
    """The first line of Triton's reason for failing in ``log_text``: the first model that did not
    load, else its first error in its own words (``failed to start Metrics service: ...``), else
    its first error, skipping the errors it writes on every start without a GPU."""
    errors = []
    for line in log_text.splitlines():
        found = TRITON_ERROR_LINE.match(line)
        if found and not any(noise in line for noise in NO_GPU_ERRORS):
            errors.append(found.group(1).split("\\n", 1)[0])  # a traceback follows, escaped
    loads = [error for error in errors if error.startswith("failed to load")]
    # Triton's own words ("failed to start GRPC service: ...") over a library's raw ones before them
    own = [error for error in errors if error.startswith("failed to")]
    return (loads or own or errors or [None])[0]


@dataclass
class ServerConfig:
    model_repository: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    work_dir: Path | None = None
    response_cache_bytes: int = 16 * 1024 * 1024
    log_verbose: int = 0
    # A personalised store's live profiles: a path, sqlite:///path, redis:// or rediss://host:port/db.
    # Default: <work_dir>/profiles/live.sqlite (it keeps the event log across builds).
    profile_store: str | None = None
    # gRPC over TLS: the server's certificate and key (PEM files), and a CA to require client
    # certificates signed by it.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Keys: admin operations (model load/unload, repository index, logging, tracing) and forget
    # need admin_key; every inference needs inference_key when one is set.
    admin_key: str | None = None
    inference_key: str | None = None
    exit_timeout_s: int = 5  # SIGTERM: in-flight requests get this long, then the server exits
    # HTTP (health probes, admin; no TLS in Triton) and metrics bind here: loopback by default, a
    # pod's address (0.0.0.0) where an orchestrator probes /v2/health/* and scrapes /metrics.
    http_address: str = "127.0.0.1"


STORES_FILE = "stores.json"  # in a work folder: the stores served from it


def default_live_profiles(work_dir: Path) -> Path:
    """Where a server working in ``work_dir`` keeps a personalised store's live profiles (and
    their event log) unless ServerConfig.profile_store says otherwise."""
    return work_dir / "profiles" / LIVE_PROFILES_FILE


def warn_of_other_int8_sums(repo: Path, here: str | None = None) -> str | None:
    """Log (and return) a warning when this machine, whose CPU adds INT8 products as ``here``
    says (read when None), runs the served version's INT8 encoder otherwise than the machine that
    embedded its catalogue."""
    path = store.version_manifest(repo, store.served_version(repo))
    if not path.exists():  # a build from before versions kept their own manifests
        return None
    manifest = json.loads(path.read_text())
    message = int8_sums_mismatch(manifest, int8_sums() if here is None else here)
    if message:
        log.warning("%s version %s: %s", repo, manifest.get("version"), message)
    return message


def _note_store(work_dir: Path, repo: Path) -> list[str]:
    """Record that ``repo`` is served from ``work_dir``; warn when other stores were too: they
    share its live state (catalogue updates, live profiles and the event log). Returns the
    others."""
    path = work_dir / STORES_FILE
    known = json.loads(path.read_text()) if path.is_file() else []
    store_path = str(repo.resolve())
    others = [s for s in known if s != store_path]
    if store_path not in known:
        if others:
            log.warning(
                "%s shares the work folder %s, and with it the live state (catalogue updates, "
                "live profiles and their event log), with %s. That is right for another build of "
                "the same shop; serve another shop with its own --work-dir",
                store_path,
                work_dir,
                ", ".join(others),
            )
        work_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # launches may race
        partial.write_text(json.dumps([*known, store_path], indent=1))
        partial.replace(path)
    return others


class TritonServer:
    """A ``tritonserver`` child process; use as a context manager or call start()/stop()."""

    def __init__(
        self, config: ServerConfig, log_file: Path | None = None, inherit_output: bool = False
    ) -> None:
        self.config = config
        self.log_file = log_file
        self.inherit_output = inherit_output
        self.process: subprocess.Popen | None = None
        self._log_handle = None
        self._log_start = 0
        # This server's backends name their shared-memory regions with it, so that stop() can
        # remove the ones a killed server leaves in /dev/shm (1 MiB a model instance).
        self.shm_prefix = f"shopserve_{secrets.token_hex(6)}_"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.config.grpc_port}"

    @property
    def http_url(self) -> str:
        """Where the launcher reaches HTTP: the bound address, or loopback for a wildcard."""
        host = self.config.http_address
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{self.config.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.http_url.rsplit(':', 1)[0]}:{self.config.metrics_port}/metrics"

    def metric_by_model(self, name: str) -> dict[str, float]:
        """One of the server's Prometheus counters or gauges (``nv_inference_request_success``,
        ``shopserve_profile_store_unavailable_total``, ...) per model, summed over versions."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(name + "{"):
                labels, value = line.rsplit(" ", 1)
                model = labels.split('model="', 1)[1].split('"', 1)[0]
                values[model] = values.get(model, 0.0) + float(value)
        return values

    def command(self, backend_dir: Path, models: list[str]) -> list[str]:
        root = pytriton_root()
        cfg = self.config
        return [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={Path(cfg.model_repository).resolve()}",
            f"--backend-directory={backend_dir}",
            f"--cache-directory={root / 'caches'}",
            f"--cache-config=local,size={cfg.response_cache_bytes}",
            "--pinned-memory-pool-byte-size=0",
            "--allow-gpu-metrics=false",
            "--model-control-mode=explicit",
            *(f"--load-model={model}" for model in models),
            "--strict-readiness=true",
            f"--log-verbose={cfg.log_verbose}",
            f"--http-port={cfg.http_port}",
            f"--grpc-port={cfg.grpc_port}",
            f"--metrics-port={cfg.metrics_port}",
            # HTTP has no TLS in Triton: health probes, admin (behind the admin key) and metrics,
            # on loopback unless the operator opens it; gRPC is the served endpoint.
            f"--http-address={cfg.http_address}",
            f"--exit-timeout-secs={cfg.exit_timeout_s}",
            # Python-based backends (the ONNX Runtime one too) take the python backend's setting.
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self._security_flags(),
        ]

    def redacted(self, command: list[str]) -> list[str]:
        """``command`` with every key replaced by ``***`` (what the launcher may log)."""
        secrets = [key for key in (self.config.admin_key, self.config.inference_key) if key]
        out = []
        for argument in command:
            for secret in secrets:
                argument = argument.replace(secret, "***")
            out.append(argument)
        return out

    def _security_flags(self) -> list[str]:
        cfg = self.config
        flags = []
        if cfg.tls_cert or cfg.tls_key:
            if not (cfg.tls_cert and cfg.tls_key):
                raise ServerError("TLS needs both the server certificate and its key")
            flags += [
                "--grpc-use-ssl=true",
                f"--grpc-server-cert={Path(cfg.tls_cert).resolve()}",
                f"--grpc-server-key={Path(cfg.tls_key).resolve()}",
            ]
            if cfg.tls_client_ca:
                flags += [
                    f"--grpc-root-cert={Path(cfg.tls_client_ca).resolve()}",
                    "--grpc-use-ssl-mutual=true",
                ]
        elif cfg.tls_client_ca:
            raise ServerError("client certificates need TLS: give the server certificate and key")
        if cfg.admin_key:
            flags += [
                f"--grpc-restricted-protocol={ADMIN_PROTOCOLS}:{ADMIN_KEY_NAME}={cfg.admin_key}",
                f"--http-restricted-api={ADMIN_PROTOCOLS}:{ADMIN_KEY_NAME}={cfg.admin_key}",
            ]
        if cfg.inference_key:
            key = f"{INFERENCE_KEY_NAME}={cfg.inference_key}"
            flags += [
                f"--grpc-restricted-protocol=inference:{key}",
                f"--http-restricted-api=inference:{key}",
            ]
        return flags

    def start(self, timeout: float = 120.0) -> TritonServer:
        repo = Path(self.config.model_repository)
        if not (repo / "manifest.json").exists():
            raise ServerError(
                f"{repo} holds no built model repository (manifest.json is missing); "
                "build it first: python -m shopserve.export build"
            )
        models = list(json.loads((repo / "manifest.json").read_text())["models"])
        self._check_ports()
        self._verify(repo)
        warn_of_other_int8_sums(repo)
        work_dir = Path(self.config.work_dir or repo.resolve().parent / ".triton")
        env = dict(os.environ)
        if "recommend" in models:
            env[PROFILE_STORE_ENV] = self._live_profiles(repo, work_dir)
        backend_dir = prepare_backend_directory(work_dir / "backends")
        _note_store(work_dir, repo)
        env[CATALOGUE_LOG_ENV] = self._catalogue_log(work_dir)
        env[PREPACKED_DIR_ENV] = str(self._prepack_encoders(repo, work_dir / "prepacked"))
        env.pop(ADMIN_KEY_ENV, None)
        if self.config.admin_key:
            env[ADMIN_KEY_ENV] = self.config.admin_key
        # The Python backend stub runs the first python on PATH: make it this environment's.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # Every step is its own process; numpy's and faiss's thread pools would oversubscribe
        # the cores that ONNX Runtime's intra-op threads (set per model) already use.
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(name, "1")
        stdout = None if self.inherit_output else subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
            self._log_start = self._log_handle.tell()
            stdout = self._log_handle
        command = self.command(backend_dir, models)
        log.info("starting %s", " ".join(self.redacted(command)))
        self.process = subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.STDOUT)
        self.wait_ready(timeout)
        return self

    def _check_ports(self) -> None:
        """Refuse ports another process listens on, once a server that is stopping has had
        PORTS_GRACE_S to let them go (a restart right after a stop)."""
        cfg = self.config
        ports = {
            "gRPC": ("", cfg.grpc_port),  # Triton's gRPC listens on every address
            "HTTP": (cfg.http_address, cfg.http_port),
            "metrics": (cfg.http_address, cfg.metrics_port),  # Triton's default: HTTP's
        }
        deadline = time.monotonic() + PORTS_GRACE_S
        while (taken := ports_in_use(ports)) and time.monotonic() < deadline:
            time.sleep(0.25)
        if taken:
            raise ServerError(
                f"another process listens on {', '.join(taken)}: stop it, or give this server "
                "other ports (--grpc-port, --http-port, --metrics-port); the server did not start"
            )

    @staticmethod
    def _verify(repo: Path) -> None:
        """Refuse to serve a version whose files are not the ones its build wrote: a store copied
        in part, or damaged on disk, would fail to load or answer wrongly."""
        version = store.served_version(repo)
        started = time.perf_counter()
        try:
            store.verify_version(repo, version)
        except store.StoreIntegrityError as exc:
            raise ServerError(
                f"{repo}: {exc}. The store is damaged or was copied in part: copy it again, or "
                "build it again; the server did not start"
            ) from exc
        log.info(
            "%s version %d: every file matches its manifest checksum (%.1f s)",
            repo,
            version,
            time.perf_counter() - started,
        )

    @staticmethod
    def _prepack_encoders(repo: Path, directory: Path) -> Path:
        """Make the served encoders' pre-packed copies here, before the model processes start: the
        process that made one would keep the memory it took (a version rolled out later gets its
        copy from the first model process that loads it)."""
        for version_dir in store.version_dirs(repo, store.ENCODER):
            prepacked_model(
                store.in_process_model_file(repo, store.ENCODER, int(version_dir.name)), directory
            )
        return directory

    def _live_profiles(self, repo: Path, work_dir: Path) -> str:
        """Check the secret, seed the live profile store from the build's snapshot (once) and
        return where the models find it."""
        try:
            keys = UserKeys.from_environment()
        except MissingUserKeyError as exc:
            raise ServerError(f"{repo} is a personalised store: {exc}") from exc
        # The version the server will serve: a rollback pinned an older one, and its models
        # must start from its own snapshot and catalogue.
        version = store.served_version(repo)
        try:
            if not check_user_key(keys, repo, version):
                log.warning(
                    "%s version %d records no fingerprint of its user-id secret (built before "
                    "they were): the secret given cannot be checked against it",
                    repo,
                    version,
                )
        except WrongUserKeyError as exc:
            raise ServerError(str(exc)) from exc
        namespace = profile_namespace(repo, version)
        location = self.config.profile_store or str(default_live_profiles(work_dir))
        if is_redis(location) and "namespace=" not in location:
            # Fixed for the server's life: a rollout to a newer build keeps the live profiles.
            location += ("&" if "?" in location else "?") + f"namespace={namespace}"
        products = BuildProducts(repo, version)
        try:
            done = seed(
                location, snapshot_path(repo, version), namespace, products, keys.log_name()
            )
        except ValueError as exc:  # a location or a Redis the store cannot use, and why
            raise ServerError(f"{exc}; the server did not start") from exc
        except store_failures(location) as exc:
            raise ServerError(
                f"{store_failed(location, exc, 'prepared')}: check that it can be reached and "
                "written and has room; the server did not start"
            ) from exc
        log.info("profile store: %s", done)
        return location

    def _catalogue_log(self, work_dir: Path) -> str:
        """Where the models keep and read the catalogue updates: the shared Redis when the
        profiles live in one (every server sees every update), else a file in the work folder
        (kept across restarts, rollouts and builds)."""
        location = self.config.profile_store
        if not (location and is_redis(location)):
            location = str(work_dir / "catalogue" / CATALOGUE_LOG_FILE)
        log.info("catalogue log: %s", public_location(location))
        return location

    def wait_ready(self, timeout: float) -> None:
        """Return once every endpoint answers: Triton reports ready on HTTP before its metrics
        service has bound its port (and exits if it cannot)."""
        deadline = time.monotonic() + timeout
        probes = [f"http://{self.http_url}/v2/health/ready", self.metrics_url]
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                reason = (
                    f"tritonserver exited with code {self.process.returncode} before it was ready"
                    + self._last_error()
                    + (f"; see {self.log_file}" if self.log_file else "")
                )
                self.stop()
                raise ServerError(reason)
            while probes and _answers(probes[0]):
                probes.pop(0)
            if not probes:
                return
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver was not ready within {timeout:.0f} s")

    def _last_error(self) -> str:
        """Why Triton exited, from what this run wrote to its log (it is appended to, so earlier
        runs' lines are skipped)."""
        if self._log_handle is None:
            return ""
        with open(self._log_handle.name, "rb") as log_text:
            log_text.seek(self._log_start)
            reason = triton_failure(log_text.read().decode(errors="replace"))
        return f": {reason}" if reason else ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self._remove_shm_regions()
        self.process = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def shm_regions(self) -> list[Path]:
        """The shared-memory regions of this server's backends that exist now."""
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*"))

    def _remove_shm_regions(self) -> None:
        """Remove the shared-memory regions of this server's backends, once it has exited. A
        backend removes its own when it stops cleanly, but not when the server is killed or
        crashes, and on a small /dev/shm (64 MiB in a default Docker container) the leftovers of
        a few restarts keep the next server from starting."""
        leftovers = self.shm_regions()
        for region in leftovers:
            with contextlib.suppress(FileNotFoundError):
                region.unlink()
        if leftovers:
            log.info("removed %d shared-memory regions the server left", len(leftovers))

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
