"""Catalogue updates without a server: request checks, the log on both backends (idempotence,
all or nothing) and the live catalogue folded over a small built index."""

from __future__ import annotations

import math

import numpy as np
import pytest
from shopserve.client._cli import CatalogueFileError, read_catalogue_changes
from shopserve.ensemble.catalogue import (
    MAX_PRODUCTS_PER_UPDATE,
    CatalogueRecord,
    LiveCatalogue,
    ProductUpdate,
    parse_update,
)
from shopserve.ensemble.catalogue_log import RedisCatalogueLog, SqliteCatalogueLog
from shopserve.ensemble.dense import DenseIndex
from shopserve.ensemble.filters import Attributes, ProductFilter
from shopserve.ensemble.retrieve import Retriever
from shopserve.ensemble.store import Catalogue
from shopserve.ensemble.validation import InvalidRequest
from shopserve.export.lexical import build_lexical_index

from benchmarks.local_redis import running_redis


def strings(*values: str) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=np.object_)


def update(update_id: str, operations, ids, titles, **optional):
    return parse_update(
        np.array([update_id.encode()], dtype=np.object_),
        strings(*operations),
        np.array(ids, dtype=np.int64),
        strings(*titles),
        **optional,
    )


def test_an_update_is_read_whole() -> None:
    parsed = update(
        "u1",
        ["upsert", "DELETE"],
        [7, 8],
        ["Cordless drill", "ignored"],
        prices=np.array([19.5, np.nan]),
        in_stock=np.array([1, -1], dtype=np.int32),
        categories=strings("Tools / Power", ""),
    )
    assert parsed.update_id == "u1"
    assert parsed.products[0] == ProductUpdate(
        "upsert", 7, "Cordless drill", 19.5, 1, "Tools / Power"
    )
    deleted = parsed.products[1]
    assert (deleted.operation, deleted.product_id, deleted.title) == ("delete", 8, "")
    assert math.isnan(deleted.price) and deleted.in_stock == -1
    assert [p.title for p in parsed.upserts()] == ["Cordless drill"]


def test_an_updates_html_character_references_are_decoded() -> None:
    """As the build reads a catalogue file: the title and category a web shop's export escaped."""
    parsed = update(
        "u1",
        ["upsert"],
        [7],
        ["Black &amp; Decker Kid&#39;s Drill"],
        categories=strings("Tools &amp; Hardware"),
    )
    assert parsed.products[0].title == "Black & Decker Kid's Drill"
    assert parsed.products[0].category == "Tools & Hardware"
    with pytest.raises(InvalidRequest, match="title without a letter or digit: rows 1"):
        update("u2", ["upsert", "upsert"], [8, 9], ["Saw", "&#128296;"])


def test_bad_rows_are_named_and_nothing_is_taken() -> None:
    with pytest.raises(InvalidRequest) as raised:
        update(
            "u2",
            ["upsert", "upsert", "rename", "upsert", "upsert", "upsert"],
            [1, 2, 3, 2, 5, 6],
            ["fine", "", "x", "y", "z" * 2000, "🔥🔥 ★"],
            prices=np.array([1.0, 2.0, 3.0, -4.0, 5.0, 6.0]),
        )
    message = str(raised.value)
    assert message.startswith("nothing applied")
    assert "upsert without a title: rows 1" in message
    assert "unknown operation (not upsert or delete): rows 2" in message
    assert "product id repeated in the update: rows 1, 3" in message
    assert "price not a number ≥ 0 (NaN: unknown): rows 3" in message
    assert "title over 1024 bytes: rows 4" in message
    assert "title without a letter or digit: rows 5" in message
    assert "rows 0" not in message


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ((["upsert"], [1, 2], ["a", "b"]), "differ in length"),
        ((["upsert"] * 2, [1.5, 2.5], ["a", "b"]), "PRODUCT_IDS must be integers"),
        (
            (["upsert"] * (MAX_PRODUCTS_PER_UPDATE + 1),
             list(range(MAX_PRODUCTS_PER_UPDATE + 1)),
             ["t"] * (MAX_PRODUCTS_PER_UPDATE + 1)),
            f"1 to {MAX_PRODUCTS_PER_UPDATE} products",
        ),
    ],
)  # fmt: skip
def test_malformed_updates_are_refused(arguments, problem) -> None:
    operations, ids, titles = arguments
    with pytest.raises(InvalidRequest, match=problem):
        parse_update(
            np.array([b"u"], dtype=np.object_),
            strings(*operations),
            np.array(ids),
            strings(*titles),
        )


@pytest.fixture(params=["sqlite", "redis"])
def catalogue_log(request, tmp_path):
    if request.param == "sqlite":
        log = SqliteCatalogueLog(tmp_path / "catalogue.sqlite")
        yield log
        log.close()
        return
    with running_redis(tmp_path) as url:
        log = RedisCatalogueLog(url)
        yield log
        log.close()


def test_the_log_applies_an_update_once(catalogue_log) -> None:
    first = update(
        "a", ["upsert", "delete"], [11, 12], ["Red kettle", ""], prices=np.array([9.0, np.nan])
    )
    vectors = np.array([[0.6, 0.8]], dtype=np.float32)
    assert catalogue_log.append(first, vectors, "enc") is True
    assert catalogue_log.append(first, vectors, "enc") is False  # a retry: nothing again
    other = update("a", ["upsert"], [11], ["Blue kettle"])
    with pytest.raises(InvalidRequest, match="applied before with other rows"):
        catalogue_log.append(other, vectors, "enc")
    records = list(catalogue_log.records())
    assert [(r.update_id, r.product.operation, r.product.product_id) for r in records] == [
        ("a", "upsert", 11),
        ("a", "delete", 12),
    ]
    upsert, delete = records
    assert upsert.product.title == "Red kettle" and upsert.product.price == 9.0
    assert upsert.encoder == "enc" and np.allclose(upsert.vector, vectors[0])
    assert delete.vector is None and delete.encoder == ""
    assert list(catalogue_log.records(upsert.position)) == [delete]
    second = update("b", ["upsert"], [13], ["Green kettle"])
    assert catalogue_log.append(second, vectors, "enc")
    assert [r.product.product_id for r in catalogue_log.records(delete.position)] == [13]


TITLES = [
    "cordless drill 18 volt",
    "claw hammer steel",
    "garden hose 50 ft",
    "paint roller kit",
    "ladder aluminium 6 ft",
    "led light bulb",
]


def unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    return vector / np.linalg.norm(vector)


@pytest.fixture
def small_shop():
    rng = np.random.default_rng(0)
    vectors = np.stack([unit(v) for v in rng.normal(size=(len(TITLES), 8))])
    dense = DenseIndex.build(vectors)
    retriever = Retriever(dense, build_lexical_index(TITLES, show_progress=False), 3, 3)
    catalogue = Catalogue(np.arange(100, 100 + len(TITLES), dtype=np.int64), list(TITLES))
    attributes = Attributes(price=np.arange(1, len(TITLES) + 1, dtype=np.float32))
    embedded: list[str] = []

    def embed(titles: list[str]) -> np.ndarray:
        embedded.extend(titles)
        return np.stack([unit(rng.normal(size=8)) for _ in titles])

    live = LiveCatalogue(catalogue, attributes, "enc", dense.vectors, retriever.lexical, embed)
    retriever.live = live
    return live, retriever, vectors, embedded


def record(position: int, product: ProductUpdate, vector=None, encoder="enc") -> CatalogueRecord:
    return CatalogueRecord(str(position), 1.0, f"u{position}", product, encoder, vector)


def test_the_live_catalogue_adds_changes_and_deletes(small_shop) -> None:
    live, retriever, vectors, _ = small_shop
    assert not live.changed
    new_vector = unit(np.ones(8))
    live.apply(
        [
            record(1, ProductUpdate("upsert", 900, "zorblax welding mask", 12.5, 1), new_vector),
            record(2, ProductUpdate("upsert", 101, "velvet garden gnome"), vectors[1]),
            record(3, ProductUpdate("delete", 102)),
        ]
    )
    assert live.state() == {"position": "3", "applied": 3, "added": 1, "changed": 2, "deleted": 1}
    assert live.product_ids.tolist()[-1] == 900 and live.titles[6] == "zorblax welding mask"
    assert live.known(900) and live.known(101) and not live.known(102)
    listed = live.listed_in_build(np.array([100, 102, 105, 900, 7]))  # 900: added since the build
    assert listed.tolist() == [True, False, True, False, False]

    found = retriever("zorblax mask", new_vector)
    assert 6 in found.rows.tolist()
    assert found.features[found.rows.tolist().index(6), 0] == pytest.approx(1.0, abs=1e-5)
    by_new_title = retriever("velvet gnome", vectors[1])
    assert 1 in by_new_title.rows.tolist()
    bm25 = by_new_title.features[by_new_title.rows.tolist().index(1), 1]
    assert bm25 == pytest.approx(1.0)  # the best BM25 for the query, scored by the new title
    by_old_title = retriever("claw hammer", unit(np.arange(8)))
    position = by_old_title.rows.tolist().index(1) if 1 in by_old_title.rows else None
    assert position is None or by_old_title.features[position, 1] == 0.0  # old words: no BM25
    for query, vector in (("garden hose", vectors[2]), ("hose", vectors[2])):
        assert 2 not in retriever(query, vector).rows.tolist()  # deleted: never a candidate

    assert np.allclose(live.vectors(np.array([6, 1, 0])), [new_vector, vectors[1], vectors[0]])
    cheap = live.attributes.allowed(ProductFilter(price_max=13.0))
    # An upsert is the whole product: 101 came without a price (unknown: no price range takes
    # it), the new product with its own.
    assert cheap.tolist() == [True, False, True, True, True, True, True]
    for query, vector in (("velvet garden gnome hose", vectors[1]), ("zorblax", new_vector)):
        filtered = retriever(query, vector, cheap).rows.tolist()
        assert filtered and not {1, 2} & set(filtered)  # no price, and deleted: never candidates
    assert live.base_allowed(None).tolist() == [True, False, False, True, True, True]


def test_a_live_title_is_folded_as_the_builds_titles(small_shop) -> None:
    """A title added since the build is analysed as the build's titles are: "crème brûlée"
    finds it without its accents, by words and by trigrams."""
    live, retriever, _, _ = small_shop
    vector = unit(np.ones(8))
    live.apply([record(1, ProductUpdate("upsert", 901, "Crème Brûlée Torch", 20.0, 1), vector)])
    found = retriever("creme brulee", -vector)  # the vector points away: only words can find it
    assert 6 in found.rows.tolist()
    assert found.features[found.rows.tolist().index(6), 1] == pytest.approx(1.0)  # the best BM25
    words, _, trigram_ids = live.lexicon.rows[6]
    assert words == {"creme", "brule", "torch"}
    unaccented_title = "creme brulee torch"
    analyzed = retriever.lexical.analyze(unaccented_title)
    unaccented = live.lexicon.query_terms(analyzed, unaccented_title)
    assert trigram_ids == frozenset(unaccented.trigram_ids.tolist())


def test_the_delta_bm25_follows_each_change_after_a_query(small_shop) -> None:
    """A query caches the delta postings of its words; a later retitle, new product or delete
    of a row holding them is scored by the next query."""
    live, retriever, _, _ = small_shop
    away = unit(-np.ones(8))  # a query vector far from every product: candidates by BM25 alone

    def bm25_of(query: str) -> dict[int, float]:
        found = retriever(query, away)
        return {row: found.features[i, 1] for i, row in enumerate(found.rows.tolist())}

    live.apply([record(1, ProductUpdate("upsert", 900, "zorblax welding mask"), unit(np.ones(8)))])
    assert bm25_of("zorblax")[6] == pytest.approx(1.0)
    live.apply(
        [
            record(2, ProductUpdate("upsert", 900, "plain cardboard box"), unit(np.ones(8))),
            record(3, ProductUpdate("upsert", 901, "zorblax garden hat"), unit(np.ones(8))),
        ]
    )
    scores = bm25_of("zorblax")
    assert scores[7] == pytest.approx(1.0) and scores.get(6, 0.0) == 0.0
    live.apply([record(4, ProductUpdate("delete", 901))])
    assert 7 not in bm25_of("zorblax")


def test_records_of_another_encoder_are_embedded_again(small_shop) -> None:
    live, _, _, embedded = small_shop
    logged = unit(np.ones(8))
    live.apply(
        [
            record(1, ProductUpdate("upsert", 901, "brass door knob"), logged, encoder="older"),
            record(2, ProductUpdate("upsert", 902, "oak door stop"), logged, encoder="enc"),
        ]
    )
    assert embedded == ["brass door knob"]  # only the record another encoder embedded
    assert not np.allclose(live.vectors(np.array([6]))[0], logged)
    assert np.allclose(live.vectors(np.array([7]))[0], logged)


def test_a_later_upsert_brings_a_deleted_product_back(small_shop) -> None:
    live, retriever, vectors, _ = small_shop
    live.apply([record(1, ProductUpdate("delete", 103))])
    assert not live.known(103)
    live.apply([record(2, ProductUpdate("upsert", 103, "paint roller kit 9 in"), vectors[3])])
    assert live.known(103)
    assert 3 in retriever("paint roller", vectors[3]).rows.tolist()


def test_an_update_file_reads_in_batches_with_stable_ids(tmp_path) -> None:
    path = tmp_path / "updates.csv"
    path.write_text(
        "product_uid,product_title,price,in_stock,category,operation\n"
        "1,Red kettle,9.5,yes,Kitchen,\n"
        "2,,,,,delete\n"
        "3,Blue kettle,,no,,upsert\n"
    )
    batches = list(read_catalogue_changes(path, batch_size=2))
    assert [(lines, len(changes)) for _, lines, changes in batches] == [([2, 3], 2), ([4], 1)]
    (first_id, _, first), (second_id, _, second) = batches
    assert first_id.endswith(":2") and second_id.endswith(":4")
    assert first_id.split(":")[0] == second_id.split(":")[0]  # the file's digest
    kettle, deleted = first
    assert (kettle.product_id, kettle.title, kettle.price, kettle.in_stock) == (
        1,
        "Red kettle",
        9.5,
        True,
    )
    assert kettle.category == "Kitchen" and not kettle.delete
    assert deleted.delete and deleted.product_id == 2
    assert second[0].in_stock is False and second[0].price is None
    assert list(read_catalogue_changes(path, batch_size=2)) == batches  # the same ids again
    path.write_text("product_id,title,operation\n1,Red kettle,rename\n")
    with pytest.raises(CatalogueFileError, match=f"{path}: line 2: operation 'rename'"):
        list(read_catalogue_changes(path, batch_size=2))
    path.write_text("product_id,title,in_stock\n1,Red kettle,OutOfStock\n2,Pan,preorder\n")
    with pytest.raises(CatalogueFileError, match=r"line 3: in_stock must be one of .*'preorder'"):
        list(read_catalogue_changes(path, batch_size=2))


def test_the_log_exports_for_the_next_build_which_serving_then_skips(tmp_path) -> None:
    from shopserve.ensemble.catalogue_log import export_updates
    from shopserve.export.data import CatalogueData, fold_catalogue_updates

    log = SqliteCatalogueLog(tmp_path / "catalogue.sqlite")
    vector = np.full((1, 2), 0.5, dtype=np.float32)
    log.append(update("a", ["upsert"], [7], ["Red kettle"], prices=np.array([9.5])), vector, "e")
    log.append(update("b", ["delete"], [8], [""]), None, "e")
    log.append(update("c", ["upsert"], [7], ["Red kettle 2 l"]), vector, "e")
    log.append(update("d", ["upsert"], [1], ["Blue mug"], in_stock=np.array([0])), vector, "e")
    written = export_updates(log, tmp_path / "updates.csv")
    through = max(r.logged_at for r in log.records())
    assert written == {"products": 3, "deletes": 1, "through": through}
    lines = (tmp_path / "updates.csv").read_text().splitlines()
    assert lines[0] == "product_id,title,price,in_stock,category,operation,logged_at"
    assert [line.split(",")[:6] for line in lines[1:]] == [
        ["8", "", "", "", "", "delete"],
        ["7", "Red kettle 2 l", "", "", "", "upsert"],  # the latest state only
        ["1", "Blue mug", "", "0", "", "upsert"],
    ]

    built = CatalogueData(
        np.array([1, 8, 9], dtype=np.int64),
        ["Mug", "Teapot", "Spoon"],
        {"brand": ["A", "B", "C"], "price": ["2", "30", "1"]},
    )
    folded, summary = fold_catalogue_updates(built, tmp_path / "updates.csv")
    assert summary == {"upserts": 2, "deletes": 1, "through": through, "products": 3}
    assert folded.product_ids.tolist() == [1, 9, 7]  # changed in place, added at the end
    assert folded.titles == ["Blue mug", "Spoon", "Red kettle 2 l"]
    assert folded.extra == {
        "brand": ["A", "C", ""],  # a column updates do not set is kept
        "price": ["", "1", ""],  # an upsert is the whole product: no price now
        "in_stock": ["0", "", ""],  # a column the build lacked, which an update gives
    }  # no update gives a category: none is made up (filters on it stay refused, as when serving)

    served = Catalogue(folded.product_ids, folded.titles, log_through=through)
    live = LiveCatalogue(served, Attributes(), log=log)
    assert live.refresh() == 4 and not live.changed  # every record is in the build already
    log.append(update("e", ["delete"], [9], [""]), None, "e")
    assert live.refresh() == 1 and not live.known(9)
    log.close()


def test_a_new_price_keeps_the_title_and_its_vector(tmp_path, small_shop) -> None:
    """The writer embeds only titles the catalogue does not have; readers keep the vector."""
    from shopserve.ensemble.catalogue_log import CatalogueWriter

    live, _, vectors, embedded = small_shop
    log = SqliteCatalogueLog(tmp_path / "catalogue.sqlite")
    titles = LiveCatalogue(Catalogue(live.product_ids.copy(), list(TITLES)), Attributes(), log=log)
    written: list[str] = []

    def embed(texts: list[str]) -> np.ndarray:
        written.extend(texts)
        return np.stack([unit(np.arange(1, 9)) for _ in texts])

    writer = CatalogueWriter(log, embed, "enc", titles)
    repriced = update("p1", ["upsert", "upsert"], [101, 990], ["claw hammer steel", "new drill"],
                      prices=np.array([3.5, 20.0]))  # fmt: skip
    assert writer.write([repriced]) == [True]
    assert written == ["new drill"]  # the hammer kept its title: not embedded again
    hammer, drill = log.records()
    assert hammer.vector is None and hammer.encoder == "" and drill.vector is not None
    live.log = log
    live.refresh()
    assert np.allclose(live.vectors(np.array([1]))[0], vectors[1])  # the build's vector stays
    assert live.delta_rows == [6] and embedded == []  # only the new product is in the delta
    assert live.attributes.price[1] == 3.5
    log.close()


def test_stores_sharing_a_work_folder_are_told_so(tmp_path, caplog) -> None:
    """The default work folder is the stores' parent: a second store served from it shares the
    first one's live state (right for a new build of the same shop, wrong for another shop), and
    the launcher says so."""
    from shopserve.server import _note_store

    work = tmp_path / ".triton"
    assert _note_store(work, tmp_path / "instacart") == []
    assert _note_store(work, tmp_path / "instacart") == []  # a restart
    assert "shares the work folder" not in caplog.text
    assert _note_store(work, tmp_path / "homedepot") == [str((tmp_path / "instacart").resolve())]
    assert "homedepot shares the work folder" in caplog.text and "own --work-dir" in caplog.text


def test_a_store_failure_mid_batch_keeps_what_was_written_before_it(tmp_path) -> None:
    """Updates queued together are appended one transaction each: when the store fails on the
    second, the first is written (and answered so), the second and third are not."""
    import sqlite3

    from shopserve.ensemble.catalogue_log import CatalogueWriter

    log = SqliteCatalogueLog(tmp_path / "catalogue.sqlite")
    appended = log.append

    def full_disk_on_the_second(update, vectors, encoder):
        if update.update_id == "second":
            raise sqlite3.OperationalError("database or disk is full")
        return appended(update, vectors, encoder)

    log.append = full_disk_on_the_second
    writer = CatalogueWriter(log, lambda texts: np.ones((len(texts), 2), np.float32), "e", None)
    batch = [update(name, ["upsert"], [n], [f"Kettle {n}"]) for n, name in
             enumerate(["first", "second", "third"], start=1)]  # fmt: skip
    first, second, third = writer.write(batch)
    assert first is True
    assert isinstance(second, sqlite3.OperationalError) and third is second
    assert [r.product.product_id for r in log.records()] == [1]
    log.close()


def test_records_are_timed_in_log_order_whatever_the_writers_clocks(catalogue_log, monkeypatch):
    """A build skips the records up to the latest one it folded, by that time: a writer whose
    clock runs a minute ahead (or a clock that steps back) must not time its record after one
    that comes later in the log."""
    import time as clock

    real = clock.time
    monkeypatch.setattr(clock, "time", lambda: real() + 60.0)
    catalogue_log.append(update("ahead", ["upsert"], [1], ["Kettle"]), None, "e")
    monkeypatch.setattr(clock, "time", real)
    catalogue_log.append(update("on-time", ["upsert"], [2], ["Mug"]), None, "e")
    first, second = catalogue_log.records()
    assert first.logged_at <= second.logged_at
