"""Writing built artefacts into a Triton model repository, and its manifest.

A build writes into a staging folder beside the repository and moves the finished version in only
when every step has passed, so a failed build leaves the repository as it was (and a new folder is
not created at all). A repository folder that does not exist yet gets the shipped configs and
adapters (the project's ``model_repository/``) as its templates.

One writer at a time (a build, ``milvus load`` or ``milvus detach``): it holds a lock file beside
the repository while it runs (``flock``, which the kernel releases when the process ends, however it
ends; a writer that finishes removes the file). A build that takes the lock removes the staging
folders of builds into the same repository that died before they finished (killed, out of memory).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from shopserve.ensemble import store

log = logging.getLogger("shopserve.export.repository")

PYTHON_ADAPTER = "model.py"
CONFIG_FILE = "config.pbtxt"
TEMPLATES = Path(__file__).resolve().parents[1] / "model_repository"
STAGE_MARKER = ".shopserve-build-stage"  # in every staging folder: only such folders are removed


class RepositoryError(RuntimeError):
    """The model repository cannot be written: its source configs or adapters are missing, or
    another build is writing into it."""


def _source_of_configs(repository: Path, models: tuple[str, ...]) -> Path:
    """Where the configs and adapters of ``repository`` come from: itself, or the templates."""
    if repository.resolve() == TEMPLATES.resolve():
        raise RepositoryError(
            f"{repository} holds the shipped templates, which a build never writes into; build into "
            f"another folder (the default is {store.DEFAULT_REPOSITORY})"
        )
    present = [m for m in store.MODELS if (repository / m / CONFIG_FILE).exists()]
    if len(present) == len(store.MODELS):
        if all((repository / m / CONFIG_FILE).exists() for m in models):
            return repository
        missing = [m for m in models if not (repository / m / CONFIG_FILE).exists()]
        raise RepositoryError(
            f"{repository} has no configs for {missing}; copy them from {TEMPLATES}"
        )
    if present:
        missing = sorted(set(store.MODELS) - set(present))
        raise RepositoryError(
            f"{repository} has configs for {sorted(present)} but not for {missing}; point "
            "--repository at a complete model repository or at a new folder"
        )
    if repository.exists() and any(repository.iterdir()):
        raise RepositoryError(f"{repository} is not empty and holds no model repository")
    if not all((TEMPLATES / m / CONFIG_FILE).exists() for m in models):
        raise RepositoryError(f"the shipped model repository templates are missing ({TEMPLATES})")
    return TEMPLATES


def _lock_file(repository: Path) -> Path:
    return repository.parent / f".{repository.name}.build-lock"


def _lock(repository: Path) -> IO[str]:
    """Hold the repository's writer lock (until :func:`_unlock`, or the process's end); another
    writer holding it is an error."""
    path = _lock_file(repository)
    while True:
        handle = path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RepositoryError(
                f"another process is writing into {repository} (a build, or a milvus load or "
                f"detach: it holds {path}); wait for it to finish, or stop it"
            ) from None
        # A writer that finished removes the file, so the one locked here may be gone already.
        with suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        handle.close()


def _unlock(repository: Path, handle: IO[str]) -> None:
    """Release the lock and remove its file (while still held, so the next writer locks a new one)."""
    _lock_file(repository).unlink(missing_ok=True)
    handle.close()


@contextmanager
def sole_writer(repository: Path) -> Iterator[None]:
    """Write into a built ``repository`` (its files in place) as its only writer."""
    repository = Path(repository)
    handle = _lock(repository)
    try:
        yield
    finally:
        _unlock(repository, handle)


def _remove_unfinished_stages(repository: Path) -> None:
    """Remove the staging folders that builds into ``repository`` left when they died (only a
    build holding the lock may call this: no other build is running)."""
    named = re.compile(rf"\.{re.escape(repository.name)}\.v\d+\.")
    for stage in repository.parent.iterdir():
        if named.match(stage.name) and (stage / STAGE_MARKER).exists():
            shutil.rmtree(stage)
            log.warning("removed %s, left by a build of %s that did not finish", stage, repository)


class RepositoryWriter:
    """Stages version ``version`` of every model; :meth:`commit` moves it into the repository.

    Use as a context manager: leaving it with an exception (or without commit) deletes the stage.
    """

    def __init__(
        self, repository: Path, version: int = 1, models: tuple[str, ...] = store.MODELS
    ) -> None:
        self.repository = Path(repository)
        self.version = version
        self.models = models
        source = _source_of_configs(self.repository, models)
        self.repository.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.repository)
        try:
            self.stage = self._stage(source)
        except BaseException:
            _unlock(self.repository, self._lock)
            raise

    def _stage(self, source: Path) -> Path:
        """A new staging folder with the configs and adapters of every model (and the folders a
        dead build left, removed)."""
        _remove_unfinished_stages(self.repository)
        stage_name = f".{self.repository.name}.v{self.version}."  # what a removal recognises
        stage = Path(tempfile.mkdtemp(prefix=stage_name, dir=self.repository.parent))
        (stage / STAGE_MARKER).touch()
        for model in self.models:
            (stage / model).mkdir()
            shutil.copy2(source / model / CONFIG_FILE, stage / model / CONFIG_FILE)
            adapters = [
                v / PYTHON_ADAPTER
                for v in store.version_dirs(source, model)
                if (v / PYTHON_ADAPTER).exists()
            ]
            directory = stage / model / str(self.version)
            directory.mkdir()
            if adapters:  # the oldest version's adapter is the source one
                shutil.copy2(adapters[0], directory / PYTHON_ADAPTER)
        return stage

    def __enter__(self) -> RepositoryWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.stage.exists():
            shutil.rmtree(self.stage)
            log.info("build did not finish: %s left unchanged", self.repository)
        _unlock(self.repository, self._lock)

    def version_dir(self, model: str) -> Path:
        """The staged version directory of ``model``."""
        return self.stage / model / str(self.version)

    def parameters(self, model: str) -> dict[str, str]:
        return store.config_parameters(self.stage, model, self.version)

    def set_parameter(self, model: str, key: str, value: str) -> None:
        """Record a value the build fitted, with this version's files (the shared config keeps
        the template's default)."""
        fitted = store.fitted_parameters(self.version_dir(model)) | {key: value}
        store.write_fitted_parameters(self.version_dir(model), fitted)

    def checksums(self) -> dict[str, str]:
        files = sorted(
            p
            for model in self.models
            for p in (self.stage / model).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        )
        return {str(p.relative_to(self.stage)): store.file_digest(p) for p in files}

    def commit(self, build: dict) -> Path:
        """Write the manifest and move the staged version into the repository."""
        manifest = {
            "format": 1,
            "version": self.version,
            "models": {model: self.version for model in self.models},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": {"python": platform.python_version(), "machine": platform.machine()},
            **build,
            "files": self.checksums(),
        }
        for model in self.models:
            target = self.repository / model
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.stage / model / CONFIG_FILE, target / CONFIG_FILE)
            version_dir = target / str(self.version)
            if version_dir.exists():
                shutil.rmtree(version_dir)
            self.version_dir(model).rename(version_dir)
        text = json.dumps(manifest, indent=2) + "\n"
        versioned = store.version_manifest(self.repository, self.version)
        versioned.parent.mkdir(exist_ok=True)
        versioned.write_text(text)  # what a rollout of this version checks its files against
        path = self.repository / store.MANIFEST_FILE
        path.write_text(text)
        shutil.rmtree(self.stage)
        log.info("wrote %s (%d files checksummed)", path, len(manifest["files"]))
        return path


def record_rewritten_files(version_dir: Path) -> None:
    """After a tool rewrote files of a built version (``milvus load`` and ``milvus detach`` its
    fitted values and moments), record the version directory's files afresh in that version's
    manifests, so that a rollout to it still verifies it."""
    repository, model, version = version_dir.parents[1], version_dir.parent.name, version_dir.name
    current = {
        str(p.relative_to(repository)): store.file_digest(p)
        for p in sorted(version_dir.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }
    prefix = f"{model}/{version}/"
    for path in (
        store.version_manifest(repository, int(version)),
        repository / store.MANIFEST_FILE,
    ):
        if not path.is_file():
            continue
        manifest = json.loads(path.read_text())
        if path.name == store.MANIFEST_FILE and str(manifest.get("version")) != version:
            continue  # the newest build's manifest, of another version
        files = {k: v for k, v in manifest["files"].items() if not k.startswith(prefix)}
        manifest["files"] = dict(sorted({**files, **current}.items()))
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(manifest, indent=2) + "\n")
        partial.replace(path)
