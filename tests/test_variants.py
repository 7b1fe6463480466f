"""The benchmark harness's store variants (benchmarks/variants.py): a variant is a whole store, its
versions' manifests included, so that a personalised variant can be served."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import PROJECT
from shopserve.ensemble import store
from shopserve.ensemble.personal import PROFILES_FILE, profile_namespace

if str(PROJECT) not in sys.path:  # benchmarks/ is a directory of the project, not installed
    sys.path.insert(0, str(PROJECT))


def _store(folder: Path) -> Path:
    """Two versions of a recommend model with their snapshots, as a build leaves them."""
    for version in (1, 2):
        directory = folder / store.RECOMMEND / str(version)
        directory.mkdir(parents=True)
        (directory / PROFILES_FILE).write_bytes(b"snapshot %d" % version)
        manifest = {
            "version": version,
            "models": {store.RECOMMEND: version},
            "files": {f"{store.RECOMMEND}/{version}/{PROFILES_FILE}": f"{version}" * 64},
        }
        store.version_manifest(folder, version).parent.mkdir(exist_ok=True)
        store.version_manifest(folder, version).write_text(json.dumps(manifest))
    (folder / store.RECOMMEND / "config.pbtxt").write_text(f'name: "{store.RECOMMEND}"\n')
    (folder / store.MANIFEST_FILE).write_text(store.version_manifest(folder, 2).read_text())
    (folder / store.MANIFESTS_DIR / ".rollout.lock").touch()
    return folder


def test_a_variant_keeps_every_versions_manifest(tmp_path, monkeypatch) -> None:
    from benchmarks import variants

    monkeypatch.setattr(variants, "REPOS_DIR", tmp_path / "repos")
    source = _store(tmp_path / "store")
    made = variants.materialize(variants.Variant("plain", "no edits"), source)
    assert sorted(p.name for p in (made / store.MANIFESTS_DIR).iterdir()) == ["v1.json", "v2.json"]
    for version in (1, 2):  # what the launcher asks of the version it serves
        assert profile_namespace(made, version) == profile_namespace(source, version)


def test_each_personal_run_serves_its_stores_as_built(tmp_path) -> None:
    """A run's events must not reach the next run's servers: a rerun that kept the held-out
    server's live profiles measured the real-time gain as zero."""
    from benchmarks.personal import _as_built
    from shopserve.server import default_live_profiles

    work = tmp_path / "held-out"
    live = default_live_profiles(work)
    live.parent.mkdir(parents=True)
    live.write_bytes(b"the previous run's profiles and events")
    assert _as_built(work) == work
    assert not live.exists()
    assert _as_built(tmp_path / "never-served") == tmp_path / "never-served"
