"""The rollout's own logic against a stand-in for the server's model control (the real server's
rollouts and rollbacks under traffic are in test_operations.py): a model that fails to load undoes
the rollout, and two rollouts of one repository take turns."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from shopserve.client import Security
from shopserve.ensemble import store
from tritonclient.utils import InferenceServerException

from shopserve.rollout import MANIFESTS_DIR, Rollout, RolloutError

MODELS = [store.TOKENIZE, store.ENCODER, store.RETRIEVE, store.RANKER, store.SEARCH]


def _repository(folder: Path) -> Path:
    """Two versions of every model, the configs serving version 1."""
    (folder / MANIFESTS_DIR).mkdir(parents=True)
    for model in MODELS:
        (folder / model).mkdir()
        text = f'name: "{model}"\nversion_policy: {{ specific: {{ versions: [ 1 ] }} }}\n'
        (folder / model / "config.pbtxt").write_text(text)
    for version in (1, 2):
        manifest = {"models": MODELS, "files": {}}
        (folder / MANIFESTS_DIR / f"v{version}.json").write_text(json.dumps(manifest))
    return folder


class ModelControl:
    """Records the loads; refuses to load ``failing`` at any version but 1."""

    def __init__(self, repository: Path, failing: str = "") -> None:
        self.repository, self.failing, self.loads = repository, failing, []

    def load_model(self, model: str, **_: object) -> None:
        config = (self.repository / model / "config.pbtxt").read_text()
        self.loads.append((model, "[ 1 ]" in config))
        if model == self.failing and "[ 1 ]" not in config:
            raise InferenceServerException(f"{model}: initialize failed")


def _rollout(control: ModelControl) -> Rollout:
    rollout = Rollout.__new__(Rollout)
    rollout.security, rollout.timeout, rollout.client = Security(), 5.0, control
    return rollout


def test_a_model_that_fails_to_load_undoes_the_rollout(tmp_path) -> None:
    repository = _repository(tmp_path / "store")
    before = {m: (repository / m / "config.pbtxt").read_text() for m in MODELS}
    control = ModelControl(repository, failing=store.RANKER)
    with pytest.raises(RolloutError, match="ranker version 2 did not load"):
        _rollout(control).roll_to(repository, 2)
    assert {m: (repository / m / "config.pbtxt").read_text() for m in MODELS} == before
    switched = [store.TOKENIZE, store.ENCODER, store.RETRIEVE, store.RANKER]
    assert control.loads == [(m, False) for m in switched] + [(m, True) for m in switched]
    assert sorted(p.name for p in (repository / store.RANKER).iterdir()) == ["config.pbtxt"]


def test_two_rollouts_of_one_repository_take_turns(tmp_path) -> None:
    """Each rollout pins and loads every model while the other waits (no interleaved configs)."""
    repository = _repository(tmp_path / "store")
    inside, overlapped, outcomes = threading.Event(), [], []

    class Slow(ModelControl):
        def load_model(self, model: str, **options: object) -> None:
            overlapped.append(inside.is_set())
            inside.set()
            threading.Event().wait(0.01)
            super().load_model(model, **options)
            inside.clear()

    def roll() -> None:
        rollout = _rollout(Slow(repository))
        rollout.live_versions = lambda: {m: [2] for m in MODELS}  # type: ignore[method-assign]
        try:
            outcomes.append(rollout.roll_to(repository, 2)[store.SEARCH])
        except Exception as exc:  # any failure, reported below
            outcomes.append(exc)

    threads = [threading.Thread(target=roll) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == [[2], [2]]
    assert len(overlapped) == 2 * len(MODELS) and not any(overlapped)


def test_a_restart_after_a_rollback_starts_from_the_pinned_versions_build(tmp_path) -> None:
    """The launcher seeds the live profiles from the version the configs pin (a rollback's), not
    from the newest build: its snapshot and its namespace."""
    from shopserve.ensemble.personal import PROFILES_FILE, profile_namespace, snapshot_path

    repository = _repository(tmp_path / "store")
    for version in (1, 2):
        (repository / store.SEARCH / str(version)).mkdir()
        snapshot = f"{store.RECOMMEND}/{version}/{PROFILES_FILE}"
        manifest = {"models": MODELS, "files": {snapshot: f"{version}" * 64}}
        store.version_manifest(repository, version).write_text(json.dumps(manifest))
        (repository / store.RECOMMEND / str(version)).mkdir(parents=True)
    (repository / store.MANIFEST_FILE).write_text(store.version_manifest(repository, 2).read_text())
    assert store.served_version(repository) == 1  # the configs pin version 1
    assert snapshot_path(repository, 1).parent.name == "1"
    assert profile_namespace(repository, 1) == "profiles-" + "1" * 16
    assert profile_namespace(repository) == "profiles-" + "2" * 16  # the newest build's
    config = repository / store.SEARCH / "config.pbtxt"
    config.write_text(f'name: "{store.SEARCH}"\n')  # a new build's config: no pin
    assert store.served_version(repository) == 2
