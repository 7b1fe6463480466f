"""The rollout's own logic against a stand-in for the server's model control (the real server's
rollouts and rollbacks under traffic are in test_operations.py): a model that fails to load undoes
the rollout, and two rollouts of one repository take turns."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
from shopserve.client import Security
from shopserve.ensemble import store
from shopserve.ensemble.profiles import UserKeys
from tritonclient.utils import InferenceServerException

from shopserve.rollout import MANIFESTS_DIR, Rollout, RolloutError

MODELS = [store.TOKENIZE, store.ENCODER, store.RETRIEVE, store.RANKER, store.SEARCH]
STEPS_AND_ENSEMBLE = [*store.STEPS, store.ENSEMBLE, store.SEARCH]
ENSEMBLE_CONFIG = "".join(
    f'step {{ model_name: "{step}" model_version: -1 }}\n' for step in store.STEPS
)  # as the build writes it: each step's newest loaded version


def _repository(folder: Path, models: list[str] = MODELS, pinned: bool = True) -> Path:
    """Two versions of every model, the configs serving version 1 (``pinned``), or as a build
    writes them: no version policy (the newest), the ensemble's steps at -1."""
    (folder / MANIFESTS_DIR).mkdir(parents=True)
    for model in models:
        (folder / model).mkdir()
        text = f'name: "{model}"\n'
        if pinned:
            text += "version_policy: { specific: { versions: [ 1 ] } }\n"
        if model == store.ENSEMBLE:
            text += ENSEMBLE_CONFIG
        (folder / model / "config.pbtxt").write_text(text)
    for version in (1, 2):
        manifest = {"models": models, "files": {}}
        (folder / MANIFESTS_DIR / f"v{version}.json").write_text(json.dumps(manifest))
    return folder


def _never(model: str, versions: list[int]) -> bool:
    return False


class ModelControl:
    """A stand-in for Triton's model control. A load serves the versions the model's config names
    (without a policy, the newest: 2); a load that fails leaves the model as it was. As in Triton,
    loading the ensemble reloads its steps from their configs, and loading a step reloads the
    ensemble. ``refuse(model, versions)`` says which loads fail. Records the loads asked for, and
    every moment the ensemble would have met a step version not served, or steps of two
    versions (what a request through it meets)."""

    def __init__(self, repository: Path, refuse=_never, live: int = 1) -> None:
        self.repository, self.refuse, self.loads = repository, refuse, []
        self.live = {p.name: [live] for p in repository.iterdir() if (p / "config.pbtxt").exists()}
        self.ensemble = self._config(store.ENSEMBLE) if store.ENSEMBLE in self.live else ""
        self.mixed: list[dict] = []

    def get_model_repository_index(self, **_: object) -> dict:
        return {
            "models": [
                {"name": model, "version": str(v), "state": "READY"}
                for model, versions in self.live.items()
                for v in versions
            ]
        }

    def _config(self, model: str) -> str:
        return (self.repository / model / "config.pbtxt").read_text()

    def _versions(self, model: str) -> list[int]:
        found = re.search(r"versions: \[ ([\d, ]+) \]", self._config(model))
        return [int(v) for v in found[1].split(",")] if found else [2]

    def load_model(self, model: str, **_: object) -> None:
        self.loads.append((model, self._versions(model)))
        if not self._reload(model):
            raise InferenceServerException(f"{model}: initialize failed")
        dependents = store.STEPS if model == store.ENSEMBLE else ()
        dependents = (store.ENSEMBLE,) if model in store.STEPS else dependents
        for other in dependents:
            if other in self.live:
                self._reload(other)

    def unload_model(self, model: str, **_: object) -> None:
        self.live.pop(model, None)

    def _reload(self, model: str) -> bool:
        versions = self._versions(model)
        if self.refuse(model, versions):
            return False
        self.live[model] = versions
        if model == store.ENSEMBLE:
            self.ensemble = self._config(model)
        self._check_ensemble()
        return True

    def _check_ensemble(self) -> None:
        pins = re.findall(r'model_name: "(\w+)" model_version: (-?\d+)', self.ensemble)
        met = {step: max(self.live[step]) if asked == "-1" else int(asked) for step, asked in pins}
        if len(set(met.values())) > 1 or any(v not in self.live[s] for s, v in met.items()):
            self.mixed.append(dict(self.live))


def _rollout(control: ModelControl) -> Rollout:
    rollout = Rollout.__new__(Rollout)
    rollout.security, rollout.timeout, rollout.client = Security(), 5.0, control
    return rollout


def test_a_model_that_fails_to_load_undoes_the_rollout(tmp_path) -> None:
    repository = _repository(tmp_path / "store")
    before = {m: (repository / m / "config.pbtxt").read_text() for m in MODELS}
    control = ModelControl(
        repository, lambda model, versions: model == store.RANKER and 2 in versions
    )
    with pytest.raises(RolloutError, match="ranker version 2 did not load"):
        _rollout(control).roll_to(repository, 2)
    assert {m: (repository / m / "config.pbtxt").read_text() for m in MODELS} == before
    switched = [store.TOKENIZE, store.ENCODER, store.RETRIEVE, store.RANKER]
    assert control.loads == [(m, [2]) for m in switched] + [(m, [1]) for m in switched]
    assert control.live == {m: [1] for m in MODELS}
    assert sorted(p.name for p in (repository / store.RANKER).iterdir()) == ["config.pbtxt"]


ROLLOUTS = {  # name: (configs pinned, live version, target, the loads refused)
    "forward": (True, 1, 2, _never),
    "rollback after a build": (False, 2, 1, _never),
    "a step fails while serving both": (True, 1, 2, lambda m, v: m == store.RANKER and 2 in v),
    "an endpoint fails": (True, 1, 2, lambda m, v: m == store.SEARCH and 2 in v),
    "a step fails serving the new one alone": (
        True,
        1,
        2,
        lambda m, v: m == store.RANKER and v == [2],
    ),
}


@pytest.mark.parametrize("case", ROLLOUTS)
def test_the_ensemble_meets_one_versions_steps_throughout_a_rollout(tmp_path, case) -> None:
    """Its steps serve both versions while the ensemble switches, then the new one alone; the
    ensemble's steps are pinned to the live version first (a build's -1 would take each step's
    newest loaded version). A failed rollout goes back the same way."""
    pinned, live, target, refuse = ROLLOUTS[case]
    repository = _repository(tmp_path / "store", STEPS_AND_ENSEMBLE, pinned)
    control = ModelControl(repository, refuse, live)
    failing = refuse is not _never
    if failing:
        with pytest.raises(RolloutError, match=f"version {target} did not load"):
            _rollout(control).roll_to(repository, target)
    else:
        _rollout(control).roll_to(repository, target)
    assert control.mixed == []
    served = live if failing else target
    assert control.live == {m: [served] for m in STEPS_AND_ENSEMBLE}
    ensemble = (repository / store.ENSEMBLE / "config.pbtxt").read_text()
    assert ensemble.count(f"model_version: {served}") == len(store.STEPS)
    if case == "forward":
        assert control.loads == (
            [(store.ENSEMBLE, [1])]
            + [(m, [1, 2]) for m in store.STEPS]
            + [(store.ENSEMBLE, [2]), (store.SEARCH, [2])]
            + [(m, [2]) for m in store.STEPS]
        )


def test_an_ensemble_that_cannot_go_back_keeps_its_steps_serving_both(tmp_path) -> None:
    """search fails at version 2 after the ensemble switched, and the ensemble then refuses to
    load version 1 again: the steps go on serving both versions (never the old one alone under
    the new ensemble), and the error says the undo failed too."""
    repository = _repository(tmp_path / "store", STEPS_AND_ENSEMBLE)
    switched = []

    def refuse(model: str, versions: list[int]) -> bool:
        if model == store.ENSEMBLE and versions == [2]:
            switched.append(True)
        return (model == store.SEARCH and 2 in versions) or (
            model == store.ENSEMBLE and versions == [1] and bool(switched)
        )

    control = ModelControl(repository, refuse)
    with pytest.raises(RolloutError, match=r"undoing it failed too.*search_steps did not"):
        _rollout(control).roll_to(repository, 2)
    assert control.mixed == []
    assert control.live[store.ENSEMBLE] == [2] and control.live[store.SEARCH] == [1]
    assert all(control.live[m] == [1, 2] for m in store.STEPS)


def test_a_rollout_after_an_interrupted_one_starts_from_the_version_every_step_serves(
    tmp_path,
) -> None:
    """An earlier rollout (before the steps were pinned) stopped with the steps at version 2 and
    the ensemble at 1, its steps at -1: it meets version 2 throughout. The rollout pins the
    version the steps serve (not the ensemble's number, which they do not), and goes on."""
    repository = _repository(tmp_path / "store", STEPS_AND_ENSEMBLE)
    control = ModelControl(repository)
    control.live.update({step: [2] for step in store.STEPS})
    _rollout(control).roll_to(repository, 2)
    assert control.mixed == []
    assert control.live == {m: [2] for m in STEPS_AND_ENSEMBLE}


def test_a_model_not_served_before_a_failed_rollout_is_unloaded(tmp_path) -> None:
    repository = _repository(tmp_path / "store")
    control = ModelControl(repository, lambda m, v: m == store.SEARCH and 2 in v)
    control.unload_model(store.ENCODER)  # not served before the rollout
    with pytest.raises(RolloutError, match="search version 2 did not load"):
        _rollout(control).roll_to(repository, 2)
    assert (store.ENCODER, [2]) in control.loads and store.ENCODER not in control.live
    assert control.live == {m: [1] for m in MODELS if m != store.ENCODER}


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


def test_a_version_hashed_under_another_secret_is_refused(tmp_path) -> None:
    """The server hashes shoppers with the secret it started with: a version built with another
    one would serve every shopper as unknown, so the rollout refuses it before changing anything."""
    models = [*MODELS, store.RECOMMEND]
    repository = _repository(tmp_path / "store", models)
    for version, secret in ((1, b"a" * 32), (2, b"b" * 32)):
        path = repository / MANIFESTS_DIR / f"v{version}.json"
        manifest = json.loads(path.read_text())
        manifest["personalization"] = {store.USER_KEY_FINGERPRINT: UserKeys(secret).fingerprint()}
        path.write_text(json.dumps(manifest))
    before = {m: (repository / m / "config.pbtxt").read_text() for m in models}
    control = ModelControl(repository)
    with pytest.raises(RolloutError, match="built with another user-id secret"):
        _rollout(control).roll_to(repository, 2)
    assert control.loads == []
    assert {m: (repository / m / "config.pbtxt").read_text() for m in models} == before
