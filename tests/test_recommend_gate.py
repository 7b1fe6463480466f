"""The recommendation gate in a real (small) build: a crippled recommendation ranker, given with
--rec-ranker, loses to the baselines on the validation shoppers, and the better baseline is served."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import export
from shopserve.ensemble import store
from shopserve.ensemble.recommend import REC_FEATURE_NAMES
from shopserve.export.monotone import read_contract
from shopserve.export.ranker import write_linear_ranker

pytestmark = pytest.mark.slow

SHOPPERS = 150


def small_shop(instacart_files: tuple[Path, Path], folder: Path) -> tuple[Path, Path]:
    """The first SHOPPERS shoppers' events, and a catalogue of what they bought."""
    items, events = instacart_files
    with events.open() as handle:
        rows = list(csv.DictReader(handle))
    shoppers = list(dict.fromkeys(r["user_id"] for r in rows))[:SHOPPERS]
    kept = [r for r in rows if r["user_id"] in set(shoppers)]
    bought = {r["product_id"] for r in kept}
    small_events, small_items = folder / "events.csv", folder / "items.csv"
    with small_events.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    with items.open() as source, small_items.open("w", newline="") as handle:
        catalogue = csv.DictReader(source)
        writer = csv.DictWriter(handle, fieldnames=catalogue.fieldnames)
        writer.writeheader()
        writer.writerows(r for r in catalogue if r["product_id"] in bought)
    return small_items, small_events


LOG_ONLY_SHOPPER = "a-shopper-only-the-live-log-knows"


def exported_log(events: Path, items: Path, folder: Path) -> tuple[Path, str, list[int]]:
    """A live store's event log, exported: three purchases of a shopper the events file does not
    hold, and the erasure of its first shopper. Returns the file, the erased id, the products."""
    from shopserve.ensemble.profile_store import SqliteProfileStore, StoredEvent, export_log
    from shopserve.ensemble.profiles import UserKeys

    keys = UserKeys.from_environment()
    with events.open() as handle:
        erased = next(csv.DictReader(handle))["user_id"]
    with items.open() as handle:
        products = [int(r["product_id"]) for r in csv.DictReader(handle)][:3]
    live = SqliteProfileStore(folder / "live.sqlite")
    shopper = keys.key(LOG_ONLY_SHOPPER)
    # in 2023: after the shop's file (2017), and a time the server would have taken
    bought = [StoredEvent(shopper, f"e{p}", p, 3, 1.7e9 + p, "live") for p in products]
    live.apply(bought)
    live.forget(keys.key(erased))
    export_log(live, folder / "log.csv")
    live.close()
    return folder / "log.csv", erased, products


@pytest.fixture(scope="module")
def shop(instacart_files, built_repository, user_key_file, module_folder):
    """A small shop built with a crippled recommendation ranker and an exported event log."""
    folder = module_folder("gate")
    items, events = small_shop(instacart_files, folder)
    log, erased, products = exported_log(events, items, folder)
    crippled = write_linear_ranker(
        folder / "crippled.onnx",
        {"repeat_share": -1.0, "neighbour_share": -1.0},
        "crippled",
        REC_FEATURE_NAMES,
    )
    run = export(
        "build",
        "--catalogue", items,
        "--events", events,
        "--events-log", log,
        "--ranker", store.model_file(built_repository, store.RANKER),
        "--rec-ranker", crippled,
        "--repository", folder / "shop",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return folder / "shop", crippled, erased, products


def test_a_crippled_recommendation_ranker_is_replaced_by_the_better_baseline(shop) -> None:
    repository, crippled, _, _ = shop
    personal = json.loads((repository / store.MANIFEST_FILE).read_text())["personalization"]
    ranker = personal["ranker"]
    gate = ranker["validation_recall20"]
    assert ranker["training"]["ranker"]["source"] == f"transferred from {crippled}"
    assert ranker["new_only"]["selected"] in ("popularity", "tifu_knn")
    assert gate["learned"] < gate[ranker["best_baseline"]]
    assert ranker["selected"] == ranker["best_baseline"] in ("purchase_frequency", "tifu_knn")
    served = read_contract(store.model_file(repository, store.REC_RANKER))
    assert served["form"] == ranker["selected"]
    evaluation = personal["evaluation"]["recommend_validation_shoppers"]["systems"]
    assert (
        evaluation["recommend"]["recall20"]["mean"]
        == evaluation[ranker["selected"]]["recall20"]["mean"]
    )


def test_a_build_folds_an_exported_event_log_and_honours_its_erasures(shop) -> None:
    from shopserve.ensemble.personal import snapshot_path
    from shopserve.ensemble.profile_store import SqliteProfileStore
    from shopserve.ensemble.profiles import UserKeys

    repository, _, erased, products = shop
    personal = json.loads((repository / store.MANIFEST_FILE).read_text())["personalization"]
    assert personal["event_log"] == {"events": 3, "erased_shoppers": 1, "repeated_rows": 0}
    keys = UserKeys.from_environment()
    snapshot = SqliteProfileStore(snapshot_path(repository), readonly=True)
    assert snapshot.get(keys.key(erased)) is None
    assert set(snapshot.get(keys.key(LOG_ONLY_SHOPPER)).items) == set(products)
    assert snapshot.users() == SHOPPERS  # 150 from the file, one erased, one from the log
    # What it folded from the log, so that no replay over this build counts it again:
    assert set(snapshot.applied_erasures()) == {keys.key(erased)}
    assert snapshot.seen_keys() == {keys.key(LOG_ONLY_SHOPPER): {f"e{p}" for p in products}}


def test_a_rec_ranker_without_events_is_refused(instacart_files, tmp_path) -> None:
    crippled = write_linear_ranker(
        tmp_path / "r.onnx", {"repeat_share": 1.0}, "r", REC_FEATURE_NAMES
    )
    run = export(
        "build", "--catalogue", instacart_files[0], "--rec-ranker", crippled,
        "--repository", tmp_path / "never",
    )  # fmt: skip
    assert run.returncode == 1 and "--rec-ranker needs --events" in run.stderr
    assert not (tmp_path / "never").exists()
