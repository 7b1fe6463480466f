"""Shared fixtures: a fully built model repository and a real tritonserver serving it.

The repository is built once per session from the real Home Depot data (``DATA_DIR``, default
``../shared/data``) into a temporary copy of ``model_repository/``. Set ``SHOPSERVE_REPOSITORY`` to a
repository you already built to skip that step while iterating.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# The in-process reference runs numpy with the thread settings the server gives its model processes
# (shopserve.server), so both sum floats in the same order. Set before numpy is first imported.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import pytest  # noqa: E402
from shopserve.export.data import DEFAULT_DATA_DIR  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
SOURCE_REPOSITORY = PROJECT / "model_repository"


def copy_source_repository(destination: Path) -> Path:
    """The project's model repository as source: configs and adapters, no built artefacts."""
    shutil.copytree(
        SOURCE_REPOSITORY,
        destination,
        ignore=lambda _dir, names: [
            n
            for n in names
            if n.endswith((".onnx", ".faiss", ".json")) or n in ("lexical", "__pycache__")
        ],
    )
    return destination


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DEFAULT_DATA_DIR / "products.csv").exists():
        pytest.fail(f"the Home Depot data is not at {DEFAULT_DATA_DIR}; set DATA_DIR")
    return DEFAULT_DATA_DIR


@pytest.fixture(scope="session")
def built_repository(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    existing = os.environ.get("SHOPSERVE_REPOSITORY")
    if existing:
        return Path(existing)
    from shopserve.export.build import BuildOptions, build

    repository = copy_source_repository(tmp_path_factory.mktemp("store") / "model_repository")
    build(
        BuildOptions(
            catalogue=data_dir / "products.csv",
            judgments=data_dir / "judgments.csv",
            repository=repository,
        )
    )
    return repository


@pytest.fixture(scope="session")
def manifest(built_repository: Path) -> dict:
    import json

    return json.loads((built_repository / "manifest.json").read_text())


@pytest.fixture(scope="session")
def pipeline(built_repository: Path):
    from shopserve.ensemble import SearchPipeline

    return SearchPipeline.from_repository(built_repository)


@pytest.fixture(scope="session")
def server(built_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    from shopserve.server import ServerConfig, TritonServer, free_ports

    work = tmp_path_factory.mktemp("triton")
    grpc_port, http_port, metrics_port = free_ports(3)
    config = ServerConfig(
        built_repository,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        work_dir=work,
    )
    with TritonServer(config, log_file=work / "server.log") as running:
        yield running
