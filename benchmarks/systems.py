"""The systems measured side by side, and how each is started and driven."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shopserve.ensemble import store

from shopserve.server import ServerConfig, TritonServer, free_ports

from .baseline import BaselineServer
from .common import WORK_DIR
from .loadgen import SessionFactory, http_sessions, triton_sessions

log = logging.getLogger("benchmarks.systems")

TRITON = "triton"
FASTAPI = "fastapi"
PERF_ANALYZER = "perf_analyzer"
LOADGEN = "loadgen"


@dataclass(frozen=True)
class System:
    """One column of the comparison: what serves, and what drives the load."""

    name: str
    label: str
    server: str  # TRITON or FASTAPI
    driver: str  # PERF_ANALYZER (Triton only) or LOADGEN
    repository: Path  # a repository variant for Triton; the source repository for FastAPI
    embeddings: str = ""  # FastAPI: FP32 catalogue embeddings (.npy) or "int8-index"
    torch_threads: int = 0  # FastAPI: torch intra-op threads (0: torch's default, one per core)
    model: str = store.SEARCH  # Triton: the endpoint model the load is sent to


@dataclass
class Running:
    """A started system: where to send load, and (Triton) where its statistics are."""

    system: System
    grpc_url: str = ""
    http_url: str = ""  # Triton's HTTP endpoint (statistics) or the FastAPI app
    pid: int = 0  # the server process (for CPU accounting); 0 when not started here

    @property
    def server_label(self) -> str:
        return "tritonserver" if self.system.server == TRITON else "uvicorn"

    def sessions(self) -> SessionFactory:
        if self.system.server == TRITON:
            return triton_sessions(self.grpc_url, self.system.model)
        return http_sessions(self.http_url)


@contextlib.contextmanager
def started(system: System, log_dir: Path = WORK_DIR / "logs") -> Iterator[Running]:
    """Start ``system`` on free ports; stop it (and everything it started) on exit."""
    log_file = log_dir / f"{system.name}.log"
    log.info("starting %s (%s); log %s", system.name, system.label, log_file)
    if system.server == TRITON:
        grpc_port, http_port, metrics_port = free_ports(3)
        config = ServerConfig(
            system.repository,
            grpc_port=grpc_port,
            http_port=http_port,
            metrics_port=metrics_port,
            work_dir=WORK_DIR / "triton" / system.name,
        )
        with TritonServer(config, log_file=log_file) as server:
            yield Running(
                system, grpc_url=server.grpc_url, http_url=server.http_url, pid=server.process.pid
            )
    else:
        with BaselineServer(
            system.repository, system.embeddings, free_ports(1)[0], log_file, system.torch_threads
        ) as app:
            yield Running(system, http_url=app.url, pid=app.process.pid)
    log.info("stopped %s", system.name)
