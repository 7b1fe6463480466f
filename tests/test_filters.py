"""Product filters: request parsing, the catalogue's attributes, and retrieval inside the allowed
rows (k results whenever k products pass; recall against exact filtered search)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from shopserve.ensemble.dense import EXACT_FILTER_ROWS, DenseIndex
from shopserve.ensemble.filters import (
    Attributes,
    CatalogueAttributeError,
    ProductFilter,
    category_path,
    parse_filter,
)
from shopserve.ensemble.retrieve import Retriever
from shopserve.ensemble.validation import InvalidRequest
from shopserve.export.lexical import build_lexical_index

from shopserve.formats import in_stock

COLUMNS = {
    "price": ["9.99", "", "120", "49.5", "0"],
    "in_stock": ["1", "0", "yes", "", "true"],
    "category": ["Tools / Drills", "Tools / Saws", "Garden", "", "tools/drills/bits"],
}


def attributes() -> Attributes:
    return Attributes.from_columns(COLUMNS)


def rows(mask: np.ndarray | None) -> list[int]:
    assert mask is not None
    return np.flatnonzero(mask).tolist()


def test_filters_select_by_stock_price_and_category_path() -> None:
    shop = attributes()
    assert shop.allowed(ProductFilter()) is None
    assert rows(shop.allowed(ProductFilter(in_stock=True))) == [0, 2, 4]
    assert rows(shop.allowed(ProductFilter(price_max=50.0))) == [0, 3, 4]  # no price: never
    assert rows(shop.allowed(ProductFilter(price_min=10.0))) == [2, 3]
    assert rows(shop.allowed(ProductFilter(category=("tools",)))) == [0, 1, 4]
    assert rows(shop.allowed(ProductFilter(category=category_path("TOOLS > Drills")))) == [0, 4]
    asked = parse_filter({"CATEGORY": np.array([b" tools > drills > "], np.object_)}).category
    assert asked == parse_filter({"CATEGORY": np.array([b"Tools//Drills"], np.object_)}).category
    assert rows(shop.allowed(ProductFilter(category=asked))) == [0, 4]
    both = ProductFilter(in_stock=True, price_max=50.0, category=("tools", "drills"))
    assert rows(shop.allowed(both)) == [0, 4]
    assert rows(shop.allowed(ProductFilter(in_stock=True, price_min=200.0))) == []


def test_a_filter_on_a_missing_attribute_or_an_unknown_category_is_refused() -> None:
    only_price = Attributes.from_columns({"price": ["1", "2"]})
    with pytest.raises(InvalidRequest, match="in_stock, which this store's catalogue does not"):
        only_price.allowed(ProductFilter(in_stock=True))
    with pytest.raises(InvalidRequest, match="no product is in the category 'tools / hammers'"):
        attributes().allowed(ProductFilter(category=("tools", "hammers")))


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [
        (
            {"PRICE_MIN": np.array([5.0], np.float32), "PRICE_MAX": np.array([1.0], np.float32)},
            "PRICE_MIN \\(5.0\\) is above PRICE_MAX",
        ),
        ({"PRICE_MAX": np.array([-1.0], np.float32)}, "finite number ≥ 0"),
        ({"PRICE_MIN": np.array([np.nan], np.float32)}, "finite number ≥ 0"),
        ({"PRICE_MIN": np.array([5], np.int32)}, "PRICE_MIN must be a float"),
        ({"PRICE_MIN": np.array([1.0, 2.0], np.float32)}, "exactly one number"),
        ({"IN_STOCK": np.array([1], np.int32)}, "IN_STOCK must be a boolean"),
        ({"CATEGORY": np.array([b"\xff"], np.object_)}, "CATEGORY is not valid UTF-8"),
        ({"CATEGORY": np.array([b"  "], np.object_)}, "CATEGORY is empty"),
        ({"CATEGORY": np.array([b" > / "], np.object_)}, "CATEGORY names no category"),
    ],
)
def test_bad_filter_inputs_are_named(inputs, problem) -> None:
    with pytest.raises(InvalidRequest, match=problem):
        parse_filter(inputs)


def test_filter_inputs_parse() -> None:
    parsed = parse_filter(
        {
            "IN_STOCK": np.array([True]),
            "PRICE_MIN": None,
            "PRICE_MAX": np.array([[50.0]], np.float32),
            "CATEGORY": np.array([b"Tools / Drills"], np.object_),
        }
    )
    assert parsed == ProductFilter(True, None, 50.0, ("tools", "drills"))
    assert parse_filter(None).empty and parse_filter({"IN_STOCK": np.array([False])}).empty


def test_bad_catalogue_columns_name_their_lines() -> None:
    with pytest.raises(CatalogueAttributeError, match=r"price .* lines 3, 4 \(2 in all\)"):
        Attributes.from_columns({"price": ["1", "cheap", "-2", ""]})
    # served as float32: a price beyond its range would become infinite
    with pytest.raises(CatalogueAttributeError, match=r"from 0 to 3.4e\+38 .* lines 2, 3 \(2 in"):
        Attributes.from_columns({"price": ["1e39", "inf", "3e38"]})
    with pytest.raises(CatalogueAttributeError, match=r"in_stock .* lines 2 \(1 in all\)"):
        Attributes.from_columns({"in_stock": ["maybe", "1"]})


@pytest.mark.parametrize(
    ("cell", "stock"),
    [
        ("1", True), ("Yes", True), ("in_stock", True), ("In Stock", True), ("InStock", True),
        ("https://schema.org/InStock", True), ("0", False), ("out_of_stock", False),
        ("OutOfStock", False), ("sold out", False), ("", None), (None, None),
    ],
)  # fmt: skip
def test_stock_reads_ours_and_schema_orgs_and_merchant_feeds_values(cell, stock) -> None:
    assert in_stock(cell) is stock


def test_a_stock_value_that_says_neither_is_refused() -> None:
    for cell in ("preorder", "backorder", "maybe", "2"):
        with pytest.raises(ValueError, match=f"in_stock must be one of .* not '{cell}'"):
            in_stock(cell)
    shop = Attributes.from_columns({"in_stock": ["InStock", "out_of_stock", ""]})
    assert shop.allowed(ProductFilter(in_stock=True)).tolist() == [True, False, False]


def test_attributes_round_trip(tmp_path) -> None:
    shop = attributes()
    shop.save(tmp_path / "attributes.npz")
    again = Attributes.load(tmp_path / "attributes.npz")
    for name in ("price", "in_stock", "category_codes"):
        np.testing.assert_array_equal(getattr(again, name), getattr(shop, name))
    assert again.categories == shop.categories
    assert (
        again.summary()
        == shop.summary()
        == {
            "price": {"known": 4, "min": 0.0, "max": 120.0},
            "in_stock": {"in_stock": 3, "rows": 5},
            "category": {"paths": 4, "known": 4},
        }
    )
    assert Attributes.load(tmp_path / "none.npz").summary() == {}  # a store built before filters


@functools.cache
def synthetic_index(n: int, dim: int = 16, seed: int = 0) -> tuple[DenseIndex, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return DenseIndex.build(vectors, m=16, ef_search=64), vectors


def exact_top(vectors: np.ndarray, query: np.ndarray, allowed: np.ndarray, n: int) -> np.ndarray:
    rows = np.flatnonzero(allowed)
    return rows[np.argsort(-(vectors[rows] @ query), kind="stable")[:n]]


@pytest.mark.parametrize("share", [0.003, 0.05, 0.5])
def test_dense_search_within_returns_n_allowed_rows(share) -> None:
    dense, vectors = synthetic_index(EXACT_FILTER_ROWS * 2)
    rng = np.random.default_rng(1)
    allowed = rng.random(dense.size) < share
    for query in vectors[:5]:
        found = dense.search_within(query, 20, allowed)
        assert len(found) == min(20, int(allowed.sum())) and allowed[found].all()
        exact = exact_top(vectors, query, allowed, 20)
        if share < 0.1:  # scanned exactly
            np.testing.assert_array_equal(found, exact)
        else:
            assert len(set(found) & set(exact)) >= 18


def test_the_retriever_keeps_to_the_allowed_rows() -> None:
    titles = [f"cordless drill {i}" if i % 2 else f"garden hose {i}" for i in range(400)]
    dense, _ = synthetic_index(len(titles), seed=2)
    retriever = Retriever(dense, build_lexical_index(titles), 50, 50)
    allowed = np.zeros(len(titles), dtype=bool)
    allowed[::4] = True  # hoses only
    everything = retriever("cordless drill", dense.stored[1])
    inside = retriever("cordless drill", dense.stored[1], allowed)
    assert allowed[inside.rows].all() and not allowed[everything.rows].all()
    assert len(inside.rows) == 50  # the dense side fills in what the words cannot


@pytest.mark.slow
def test_filtered_recall_against_exact_filtered_search_on_home_depot(pipeline, dev_queries) -> None:
    """recall@100 ≥ 0.95 at every share of the catalogue, with masks drawn at random (the hard
    case: a real filter follows the catalogue's structure, which HNSW's graph shares)."""
    dense = pipeline.retriever.dense
    queries = dev_queries[:100]
    embeddings = pipeline.encoder(*pipeline.tokenizer.batch(queries))
    rng = np.random.default_rng(0)
    for share in (0.5, 0.2, 0.12, 0.05, 0.01):
        allowed = rng.random(dense.size) < share
        recall = np.mean(
            [
                len(
                    set(dense.search_within(q, 100, allowed))
                    & set(exact_top(dense.stored, q, allowed, 100))
                )
                / 100
                for q in embeddings
            ]
        )
        assert recall >= 0.95, (share, recall)
