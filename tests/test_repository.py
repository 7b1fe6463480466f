"""The shipped model repository is a set of templates: a build never writes into it. One build at
a time writes into a repository, and one that died (kill -9) leaves it as it was."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SOURCE_REPOSITORY, documented_commands
from shopserve.ensemble import store
from shopserve.export.repository import TEMPLATES, RepositoryError, RepositoryWriter


def test_the_templates_are_the_projects_model_repository() -> None:
    assert TEMPLATES.resolve() == SOURCE_REPOSITORY.resolve()


def test_a_build_into_the_shipped_templates_is_refused() -> None:
    with pytest.raises(RepositoryError, match="never writes into"):
        RepositoryWriter(SOURCE_REPOSITORY)


def test_a_new_folder_gets_the_templates(tmp_path) -> None:
    with RepositoryWriter(tmp_path / "shop") as writer:
        for model in store.MODELS:
            assert (writer.stage / model / "config.pbtxt").exists()
    assert not (tmp_path / "shop").exists()  # left without a commit: nothing written


def test_a_second_build_into_one_repository_is_refused_while_the_first_runs(tmp_path) -> None:
    with RepositoryWriter(tmp_path / "shop"):
        with pytest.raises(RepositoryError, match="another process is writing into"):
            RepositoryWriter(tmp_path / "shop")
        with RepositoryWriter(tmp_path / "other-shop"):  # another repository: no conflict
            pass
    with RepositoryWriter(tmp_path / "shop"):  # the first has finished: the lock is free
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no stage, no lock file left


def test_a_build_killed_with_kill_9_leaves_nothing_the_next_build_keeps(tmp_path, caplog) -> None:
    """A build process killed mid-build holds the lock while it lives; once dead, the repository is
    as it was (here: not created) and the next build removes its staging folder, and only that."""
    repository = tmp_path / "shop"
    unrelated = tmp_path / ".shop.venv"  # named like a stage, but not one
    unrelated.mkdir()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from shopserve.export.repository import RepositoryWriter; "
            f"writer = RepositoryWriter(Path({str(repository)!r}), version=3); "
            "print(writer.stage, flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        stage = Path(child.stdout.readline().strip())
        assert (stage / "search" / "3").is_dir()
        with pytest.raises(RepositoryError, match="another process is writing into"):
            RepositoryWriter(repository)
    finally:
        child.kill()
        child.wait()
    assert stage.is_dir() and not repository.exists()
    assert (tmp_path / ".shop.build-lock").exists()  # a killed writer cannot remove it
    with (
        caplog.at_level(logging.WARNING, "shopserve.export.repository"),
        RepositoryWriter(repository) as writer,
    ):
        assert not stage.exists() and unrelated.is_dir()
        writer.commit({})
    assert f"removed {stage}, left by a build of {repository} that did not finish" in caplog.text
    assert json.loads((repository / store.MANIFEST_FILE).read_text())["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shop.venv", "shop"]


def test_milvus_detach_is_refused_while_a_build_writes(tmp_path) -> None:
    """Tools that rewrite a built version in place take the same lock as a build."""
    from shopserve.export import milvus

    repository = tmp_path / "shop"
    with RepositoryWriter(repository) as writer:
        writer.commit({})
    with (
        RepositoryWriter(repository, version=2),
        pytest.raises(RepositoryError, match="another process is writing into"),
    ):
        milvus.detach(repository, 1)
    assert milvus.detach(repository, 1) == repository / store.RETRIEVE / "1"


def _built(folder: Path) -> Path:
    """What a build commits: the templates and a ranker, every version file checksummed."""
    with RepositoryWriter(folder) as writer:
        (writer.version_dir(store.RANKER) / store.ONNX_FILE).write_bytes(b"ranker weights")
        writer.commit({})
    return folder


def test_a_version_is_checked_file_by_file_against_its_manifest(tmp_path) -> None:
    repository = _built(tmp_path / "shop")
    # Shared configs are rewritten by rollouts and later builds, and Python's bytecode caches are
    # not the build's: neither is checked.
    config = repository / store.RANKER / "config.pbtxt"
    config.write_text(config.read_text() + "version_policy: { specific: { versions: [ 1 ] } }\n")
    (repository / store.SEARCH / "1" / "__pycache__").mkdir()
    (repository / store.SEARCH / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"x")
    assert store.verify_version(repository, 1)["version"] == 1
    ranker = repository / store.RANKER / "1" / store.ONNX_FILE
    ranker.write_bytes(b"ranker weight")  # a copy cut short
    with pytest.raises(store.StoreIntegrityError, match=r"ranker/1/model\.onnx fails its manifest"):
        store.verify_version(repository, 1)
    ranker.unlink()
    with pytest.raises(store.StoreIntegrityError, match=r"ranker/1/model\.onnx is missing"):
        store.verify_version(repository, 1)
    with pytest.raises(store.StoreIntegrityError, match="no manifest for version 2"):
        store.verify_version(repository, 2)


def test_shopserve_serve_refuses_a_damaged_store_before_starting_anything(tmp_path) -> None:
    repository = _built(tmp_path / "shop")
    (repository / store.SEARCH / "1" / "model.py").write_text("# half a copy\n")
    work = tmp_path / "work"
    command = ["serve", "--model-repository", str(repository), "--work-dir", str(work)]
    run = subprocess.run(
        [sys.executable, "-m", "shopserve", *command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1, run.stderr
    assert "search/1/model.py fails its manifest checksum" in run.stderr
    assert "copy it again, or build it again; the server did not start" in run.stderr
    assert not work.exists()  # no backend laid out, no live store seeded, no tritonserver


def test_the_documented_verify_command_finds_a_damaged_file(tmp_path) -> None:
    """docs/serving.md's ``shopserve verify``: the served version's files pass, then a file changed
    on disk (as under a running server) fails, named; so do a version never built and a folder
    that is not a store."""
    (command,) = documented_commands("serving.md", "verify")
    assert command[:2] == ["shopserve", "verify"], command
    repository = _built(tmp_path / "shop")

    def verify(*more: str) -> subprocess.CompletedProcess:
        argv = [str(repository) if word == "stores/homedepot" else word for word in command[1:]]
        return subprocess.run(
            [sys.executable, "-m", "shopserve", *argv, *more],
            capture_output=True,
            text=True,
            timeout=60,
        )

    passed = verify()
    assert passed.returncode == 0, passed.stderr
    assert f"{repository} version 1: every file matches its manifest checksum" in passed.stdout
    ranker = repository / store.RANKER / "1" / store.ONNX_FILE
    ranker.write_bytes(b"ranker weightz")
    damaged = verify()
    assert damaged.returncode == 1
    assert "version 1: ranker/1/model.onnx fails its manifest checksum" in damaged.stderr
    missing = verify("--version", "2")
    assert missing.returncode == 1 and "no manifest for version 2" in missing.stderr
    repository = tmp_path  # a folder, not a store
    not_a_store = verify()
    assert not_a_store.returncode == 1 and "not a built store" in not_a_store.stderr
