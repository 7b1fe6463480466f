"""Writing built artefacts into a Triton model repository, and its manifest."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import time
from pathlib import Path

from shopserve.ensemble import store

log = logging.getLogger("shopserve.export.repository")

PYTHON_ADAPTER = "model.py"


class RepositoryError(RuntimeError):
    """The model repository is missing its source configs or adapters."""


class RepositoryWriter:
    """Lays out version ``version`` of every model and records what was written."""

    def __init__(self, repository: Path, version: int = 1) -> None:
        self.repository = Path(repository)
        self.version = version
        missing = [m for m in store.MODELS if not self.config(m).exists()]
        if missing:
            raise RepositoryError(
                f"{self.repository} lacks config.pbtxt for {missing}; point --repository at a copy "
                "of the project's model_repository/"
            )

    def config(self, model: str) -> Path:
        return self.repository / model / "config.pbtxt"

    def version_dir(self, model: str) -> Path:
        """The version directory, created; Python adapters are copied in from the oldest version."""
        directory = self.repository / model / str(self.version)
        directory.mkdir(parents=True, exist_ok=True)
        versions = store.version_dirs(self.repository, model)
        adapters = [v / PYTHON_ADAPTER for v in versions if (v / PYTHON_ADAPTER).exists()]
        if adapters and not (directory / PYTHON_ADAPTER).exists():
            shutil.copy2(adapters[0], directory / PYTHON_ADAPTER)
        return directory

    def parameters(self, model: str) -> dict[str, str]:
        return store.config_parameters(self.repository, model)

    def checksums(self) -> dict[str, str]:
        files = sorted(
            p
            for model in store.MODELS
            for p in (self.repository / model).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        )
        return {str(p.relative_to(self.repository)): _sha256(p) for p in files}

    def write_manifest(self, build: dict) -> Path:
        for model in store.MODELS:  # models without artefacts (search, the ensemble) get theirs too
            self.version_dir(model)
        manifest = {
            "format": 1,
            "version": self.version,
            "models": {model: self.version for model in store.MODELS},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": {"python": platform.python_version(), "machine": platform.machine()},
            **build,
            "files": self.checksums(),
        }
        path = self.repository / store.MANIFEST_FILE
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        log.info("wrote %s (%d files checksummed)", path, len(manifest["files"]))
        return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
