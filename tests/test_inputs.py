"""A shop too small, or with too little history, to build stops before any work is spent on it,
with a message that says what it has and what it needs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import export
from shopserve.export.data import CatalogueData, load_events
from shopserve.export.history import split_users, timelines
from shopserve.export.personalize import ThinHistoryError, _check_history


def write_catalogue(path, products: int) -> None:
    rows = "".join(f"{i},Product number {i}\n" for i in range(1, products + 1))
    path.write_text("product_id,title\n" + rows)


def test_a_catalogue_too_small_to_gate_the_int8_encoder_is_refused(tmp_path) -> None:
    write_catalogue(tmp_path / "items.csv", 1300)
    run = export("build", "--catalogue", tmp_path / "items.csv", "--repository", tmp_path / "shop")
    assert run.returncode == 1, run.stderr[-2000:]
    assert (
        "error: too few texts for the INT8 encoder: its accuracy gate needs 1000 real texts (titles "
        "and judged queries) and its calibration 768 others, but 1300 titles and 0 judged queries "
        "give 1000 and 300. A catalogue of at least 1768 products builds"
    ) in run.stderr
    assert not (tmp_path / "shop").exists()


def test_judgments_that_leave_no_dev_query_are_refused(tmp_path) -> None:
    write_catalogue(tmp_path / "items.csv", 2000)
    (tmp_path / "judged.csv").write_text("query,product_id,relevance\ndrill,1,3\ndrill,2,1\n")
    run = export(
        "build",
        "--catalogue",
        tmp_path / "items.csv",
        "--judgments",
        tmp_path / "judged.csv",
        "--repository",
        tmp_path / "shop",
    )
    assert run.returncode == 1, run.stderr[-2000:]
    assert (
        "error: 1 judged queries split into 1 for training and 0 for evaluation (--dev-fraction "
        "0.2); each part needs at least one"
    ) in run.stderr


@pytest.mark.parametrize(
    ("baskets", "shoppers", "refused"),
    [(1, 20, True), (3, 1, True), (3, 20, False)],
    ids=["one basket each", "a single shopper", "repeat shoppers"],
)
def test_recommendations_need_repeat_shoppers_in_both_parts(
    tmp_path, baskets: int, shoppers: int, refused: bool
) -> None:
    path = tmp_path / "events.csv"
    rows = [
        f"u{user},{1 + (user + basket) % 4},{100 * basket + user},purchase,b{basket}"
        for user in range(shoppers)
        for basket in range(baskets)
    ]
    path.write_text("user_id,product_id,timestamp,event,basket_id\n" + "\n".join(rows) + "\n")
    catalogue = CatalogueData(np.arange(1, 5, dtype=np.int64), ["a", "b", "c", "d"])
    events = load_events(path, catalogue)
    lines = timelines(events)
    train, validation = split_users(events, lines, 0.2, seed=13)
    if not refused:
        _check_history(lines, train, validation)
        return
    with pytest.raises(ThinHistoryError, match="too little purchase history for recommendations"):
        _check_history(lines, train, validation)
