"""Zero-downtime rollout of a store version through Triton's model-control API.

``shopserve rollout --model-repository R --version N`` checks version N's files against its manifest
(``R/manifests/v<N>.json``) and refuses a version that fails, then pins version N in every model's
config (so a restart serves it too, until the next build or rollout) and asks the running server to
load it (steps first, endpoints last). Triton loads the new version while the old one goes on
serving, and unloads the old one once the new one is ready, so no request fails. A rollback is a
rollout to an earlier version (``--rollback``: the newest version below the live one). A model that
fails to load undoes the rollout: every config goes back to what it was and the models already
switched are loaded again from it. One rollout at a time per repository (a lock file).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shopserve.client._client import ADMIN_KEY_HEADER, Security
from shopserve.ensemble import store

log = logging.getLogger("shopserve.rollout")

MANIFESTS_DIR = store.MANIFESTS_DIR
# Steps before the models that read them, so that an endpoint never meets older steps.
LOAD_ORDER = (
    store.TOKENIZE,
    store.ENCODER,
    store.RETRIEVE,
    store.RANKER,
    store.POSTPROCESS,
    store.REC_RANKER,
    store.ENSEMBLE,
    store.CATALOGUE,
    store.SEARCH,
    store.RECOMMEND,
    store.EVENTS,
    store.FORGET,
)


class RolloutError(RuntimeError):
    """The version cannot be rolled out; the message says why."""


def manifest_path(repository: Path, version: int) -> Path:
    return store.version_manifest(repository, version)


def versions(repository: Path) -> list[int]:
    """The versions the repository holds a manifest for, ascending."""
    folder = Path(repository) / MANIFESTS_DIR
    found = (int(p.stem[1:]) for p in folder.glob("v*.json") if p.stem[1:].isdigit())
    return sorted(found)


def verify(repository: Path, version: int) -> dict:
    """Version ``version``'s manifest, once every file of its version directories matches its
    sha256. (Configs are shared by every version in Triton's layout; a later build may have
    rewritten them, so they are not checked.)"""
    path = manifest_path(repository, version)
    if not path.exists():
        raise RolloutError(f"{repository} has no manifest for version {version} ({path})")
    manifest = json.loads(path.read_text())
    for relative, expected in manifest["files"].items():
        if Path(relative).parts[1:2] != (str(version),):
            continue
        target = Path(repository) / relative
        if not target.is_file():
            raise RolloutError(f"version {version}: {relative} is missing; not loaded")
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        if digest != expected:
            raise RolloutError(
                f"version {version}: {relative} fails its manifest checksum; not loaded"
            )
    return manifest


def _write(config: Path, text: str) -> None:
    """Replace ``config`` by ``text`` atomically: a reader never sees half a file."""
    handle, partial = tempfile.mkstemp(dir=config.parent, prefix=config.name + ".")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
    os.chmod(partial, config.stat().st_mode)
    Path(partial).replace(config)


@contextmanager
def _one_at_a_time(repository: Path) -> Iterator[None]:
    """Hold the repository's rollout lock (a second rollout waits for the first)."""
    folder = Path(repository) / MANIFESTS_DIR
    with (folder / ".rollout.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Rollout:
    """Model control over gRPC, with the admin key when the server requires one."""

    def __init__(self, url: str, security: Security | None = None, timeout: float = 300.0) -> None:
        self.security = security or Security()
        self.timeout = timeout
        self.client = grpcclient.InferenceServerClient(url, **self.security.channel())

    def _admin(self) -> dict:
        key = self.security.admin_key
        return {"headers": {ADMIN_KEY_HEADER: key}} if key else {}

    def live_versions(self) -> dict[str, list[int]]:
        """What the server says is loaded: every READY model and its versions."""
        try:
            index = self.client.get_model_repository_index(
                as_json=True, client_timeout=self.timeout, **self._admin()
            )
        except InferenceServerException as exc:
            raise RolloutError(f"the server refused the repository index: {exc.message()}") from exc
        ready: dict[str, list[int]] = {}
        for model in index.get("models", []):
            if model.get("state") == "READY":
                ready.setdefault(model["name"], []).append(int(model["version"]))
        return {name: sorted(found) for name, found in sorted(ready.items())}

    def roll_to(self, repository: Path, version: int) -> dict[str, list[int]]:
        """Load ``version`` of every model the version's manifest lists; return the live versions.
        A model that fails to load undoes the rollout (configs and loaded models) before the
        error is raised."""
        manifest = verify(repository, version)
        models = [m for m in LOAD_ORDER if m in manifest["models"]]
        configs = {m: Path(repository) / m / "config.pbtxt" for m in models}
        with _one_at_a_time(repository):
            before = {m: configs[m].read_text(encoding="utf-8") for m in models}
            pinned: list[str] = []
            try:
                for model in models:
                    # The pin goes into the store's config on disk: Triton reloads an ensemble's
                    # steps from disk when it loads the ensemble, and a restart serves what was
                    # rolled out.
                    _write(configs[model], store.with_version_policy(before[model], version))
                    pinned.append(model)
                    self._load(model, version)
            except RolloutError:
                self._undo(pinned, configs, before)
                raise
        live = self.live_versions()
        wrong = {m: live.get(m) for m in models if live.get(m) != [version]}
        if wrong:
            raise RolloutError(f"after the rollout the server reports {wrong}, not {version}")
        return live

    def _load(self, model: str, version: int) -> None:
        log.info("loading %s version %d", model, version)
        try:
            self.client.load_model(model, client_timeout=self.timeout, **self._admin())
        except InferenceServerException as exc:
            raise RolloutError(f"{model} version {version} did not load: {exc.message()}") from exc

    def _undo(self, pinned: list[str], configs: dict[str, Path], before: dict[str, str]) -> None:
        """Put back the configs of ``pinned`` and load those models from them again (in load
        order, as a rollout would), so the server serves what it served before."""
        for model in pinned:
            _write(configs[model], before[model])
        for model in pinned:
            log.warning("rollout failed: loading %s as it was", model)
            try:
                self.client.load_model(model, client_timeout=self.timeout, **self._admin())
            except InferenceServerException as exc:
                log.error("%s did not load as it was: %s", model, exc.message())

    def previous(self, repository: Path) -> int:
        """The newest version below the one the search endpoint serves now."""
        serving = self.live_versions().get(store.SEARCH, [])
        if not serving:
            raise RolloutError("the server serves no search version to roll back from")
        earlier = [v for v in versions(repository) if v < min(serving)]
        if not earlier:
            raise RolloutError(f"{repository} holds no version before {min(serving)}")
        return earlier[-1]

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Rollout:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
