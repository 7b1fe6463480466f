"""Zero-downtime rollout of a store version through Triton's model-control API.

``shopserve rollout --model-repository R --version N`` checks version N's files against its manifest
(``R/manifests/v<N>.json``) and refuses a version that fails, then pins version N in every model's
config (so a restart serves it too, until the next rollout: a build keeps the pins) and asks the
running server to load it. Triton loads the new version while the old one goes on serving, and
unloads the old one once the new one is ready, so no request fails. The search_steps ensemble's
steps serve both versions while the ensemble switches, so that a request through it meets one
version's steps. A rollback is a rollout to an earlier version (``--rollback``: the newest version
below the live one). A model that fails to load undoes the rollout: every config is pinned back to
what was live and the models already switched are loaded again from it. One rollout at a time per
repository (a lock file).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


def _same_user_key(repository: Path, version: int, live: dict[str, list[int]]) -> None:
    """Refuse a version whose shoppers were hashed under another user-id secret than the live
    version's: the server hashes with the secret it started with, so every shopper would look
    unknown (builds that recorded no fingerprint are not checked)."""
    serving = live.get(store.RECOMMEND)
    if not serving or not manifest_path(repository, serving[0]).is_file():
        return
    wanted = store.built_user_key(repository, version)
    current = store.built_user_key(repository, serving[0])
    if wanted and current and wanted != current:
        raise RolloutError(
            f"version {version} was built with another user-id secret (fingerprint {wanted}) "
            f"than the live version {serving[0]} ({current}), which this server hashes shoppers "
            "with: every shopper would look unknown; nothing was changed"
        )


@dataclass(frozen=True)
class _Plan:
    """One rollout's configs: what is live pinned (``held``), the target (``wanted``) and, for
    the steps of the search_steps ensemble, both versions side by side (``both``)."""

    version: int
    configs: dict[str, Path]
    live: dict[str, list[int]]
    held: dict[str, str]
    wanted: dict[str, str]
    both: dict[str, str]

    @property
    def steps(self) -> list[str]:
        return list(self.both)

    @property
    def others(self) -> list[str]:
        return [m for m in self.wanted if m not in self.both]

    @classmethod
    def of(
        cls, repository: Path, models: list[str], version: int, live: dict[str, list[int]]
    ) -> _Plan:
        configs = {m: repository / m / "config.pbtxt" for m in models}
        before = {m: configs[m].read_text(encoding="utf-8") for m in models}
        steps = [m for m in models if m in store.STEPS] if store.ENSEMBLE in models else []
        held = {m: store.with_version_policy(before[m], *live[m]) for m in models if live.get(m)}
        if live.get(store.ENSEMBLE) and store.ENSEMBLE not in models:
            raise RolloutError(
                f"version {version} has no {store.ENSEMBLE} ensemble, which the server serves; "
                "nothing was changed"
            )
        if live.get(store.ENSEMBLE):
            current = _ensemble_steps_version(live, steps)
            held[store.ENSEMBLE] = store.with_step_versions(held[store.ENSEMBLE], current)
        wanted = {m: store.with_version_policy(before[m], version) for m in models}
        if store.ENSEMBLE in models:
            wanted[store.ENSEMBLE] = store.with_step_versions(wanted[store.ENSEMBLE], version)
        both = {m: store.with_version_policy(before[m], version, *live.get(m, [])) for m in steps}
        return cls(version, configs, live, {**before, **held}, wanted, both)


def _ensemble_steps_version(live: dict[str, list[int]], steps: list[str]) -> int:
    """The version to pin the live ensemble's steps to first: the newest every step serves (one
    version, but for a rollout interrupted earlier, which left some steps serving two)."""
    served = {m: live.get(m, []) for m in steps}
    shared = set.intersection(*(set(v) for v in served.values())) if steps else set()
    if not shared:
        raise RolloutError(
            f"the {store.ENSEMBLE} ensemble's steps serve no version in common ({served}); "
            "nothing was changed"
        )
    return max(shared)


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
        A model that fails to load undoes the rollout before the error is raised: the models go
        back to what was live, and the configs pin it."""
        try:
            manifest = store.verify_version(repository, version)
        except store.StoreIntegrityError as exc:
            raise RolloutError(f"{exc}; not loaded") from exc
        models = [m for m in LOAD_ORDER if m in manifest["models"]]
        with _one_at_a_time(repository):
            plan = _Plan.of(Path(repository), models, version, self.live_versions())
            _same_user_key(Path(repository), version, plan.live)
            self._hold(plan)
            attempted: dict[str, str | None] = {}  # model -> the config it last loaded from
            try:
                self._forward(plan, attempted)
            except BaseException as exc:
                failures = self._undo(plan, attempted)
                if failures and isinstance(exc, RolloutError):
                    undo = "; ".join(failures)
                    raise RolloutError(f"{exc}; undoing it failed too: {undo}") from exc
                raise
        live = self.live_versions()
        wrong = {m: live.get(m) for m in models if live.get(m) != [version]}
        if wrong:
            raise RolloutError(f"after the rollout the server reports {wrong}, not {version}")
        return live

    def _hold(self, plan: _Plan) -> None:
        """Pin what is live on disk, and load the ensemble so pinned (its steps at -1 would take
        each step's newest loaded version, request by request, as soon as a step serves two)."""
        for model, text in plan.held.items():
            _write(plan.configs[model], text)
        if store.ENSEMBLE in plan.wanted and plan.live.get(store.ENSEMBLE):
            self._load(store.ENSEMBLE, plan.held[store.ENSEMBLE])

    def _forward(self, plan: _Plan, attempted: dict[str, str | None]) -> None:
        """The ensemble's steps serve both versions, then the ensemble and the other models
        switch, then the steps serve the new version alone: a request through the ensemble meets
        one version's steps, whichever it started on."""
        loads = [(m, plan.both[m]) for m in plan.steps]
        loads += [(m, plan.wanted[m]) for m in plan.others + plan.steps]
        for model, text in loads:
            _write(plan.configs[model], text)
            attempted.setdefault(model, None)
            self._load(model, text, plan.version)
            attempted[model] = text

    def _undo(self, plan: _Plan, attempted: dict[str, str | None]) -> list[str]:
        """Serve again what was live before, the same three moves backwards; return what failed
        (logged too). A model that was not live before is unloaded."""
        if attempted:
            log.warning("rollout failed: loading %s as they were", ", ".join(attempted))
        failures: list[str] = []

        def load(model: str, text: str) -> bool:
            _write(plan.configs[model], text)
            try:
                if plan.live.get(model):
                    self._load(model, text)
                else:  # it was not served before the rollout
                    self._unload(model)
            except RolloutError as exc:
                log.error("undoing the rollout: %s", exc)
                failures.append(str(exc))
                return False
            return True

        # Both versions again, for the ensemble (a narrowing may have finished on the server after
        # the client gave up on it); a step that never loaded keeps what it served.
        widened = True
        for model in (m for m in plan.steps if m in attempted):
            if attempted[model] is None:
                _write(plan.configs[model], plan.both[model])  # should Triton reload it
            else:
                widened &= load(model, plan.both[model])
        ensemble_back = True
        for model in (m for m in plan.others if m in attempted):
            if model == store.ENSEMBLE and not widened:
                ensemble_back = False  # it stays where its steps are sure to be
                continue
            back = load(model, plan.held[model])
            ensemble_back &= back or model != store.ENSEMBLE
        if not ensemble_back:
            log.error("the ensemble did not go back: its steps go on serving both versions")
            failures.append(f"{store.ENSEMBLE} did not go back; its steps serve both versions")
            return failures
        for model in (m for m in plan.steps if m in attempted):
            load(model, plan.held[model])
        return failures

    def _load(self, model: str, text: str, version: int | None = None) -> None:
        """Load ``model`` from its config ``text`` (for the rollout to ``version``, if given)."""
        serving = _serving(text)
        log.info("loading %s %s", model, serving)
        try:
            self.client.load_model(model, client_timeout=self.timeout, **self._admin())
        except InferenceServerException as exc:
            name = model if version is None else f"{model} version {version}"
            raise RolloutError(f"{name} did not load ({serving}): {exc.message()}") from exc

    def _unload(self, model: str) -> None:
        try:
            self.client.unload_model(model, client_timeout=self.timeout, **self._admin())
        except InferenceServerException as exc:
            raise RolloutError(f"{model} did not unload: {exc.message()}") from exc

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


def _serving(config: str) -> str:
    """The versions a config serves, in words (for logs and errors)."""
    listed = re.search(r"versions\s*:\s*\[([^\]]*)\]", store.version_policy(config) or "")
    if not listed:
        return "at its newest version"
    versions = [v.strip() for v in listed[1].split(",")]
    return f"version{'s' * (len(versions) > 1)} {', '.join(versions)}"
