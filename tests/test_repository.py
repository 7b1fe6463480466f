"""The shipped model repository is a set of templates: a build never writes into it."""

from __future__ import annotations

import pytest
from conftest import SOURCE_REPOSITORY
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
