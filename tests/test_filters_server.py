"""Filtered search against the real server: a store built from a catalogue with price, stock and
category columns, searched through both clients and the CLI, and checked against the in-process
pipeline and exact filtered search."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import export, start_server, write_cut
from shopserve.client import AsyncSearchClient, Filters, InvalidRequestError, SearchClient
from shopserve.client._cli import main as search_cli
from shopserve.ensemble import SearchPipeline, store
from shopserve.ensemble.filters import category_path

pytestmark = pytest.mark.slow

CATEGORIES = ("Tools / Power Tools", "Tools / Hand Tools", "Garden", "Paint")


def attributes_of(product_id: int) -> dict[str, str]:
    """Deterministic attributes: every third product out of stock, prices 1 to 200."""
    return {
        "price": f"{product_id % 200 + 1}.99",
        "in_stock": "0" if product_id % 3 == 0 else "1",
        "category": CATEGORIES[product_id % len(CATEGORIES)],
    }


@pytest.fixture(scope="module")
def shop(module_folder, data_dir, built_repository) -> tuple[Path, dict[int, dict]]:
    folder = module_folder("filtered")
    items, _ = write_cut(data_dir, folder)
    with items.open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row.update(attributes_of(int(row["product_id"])))
    with (folder / "items_attributes.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ranker = store.model_file(built_repository, store.RANKER)
    run = export(
        "build", "--catalogue", "items_attributes.csv", "--ranker", ranker, "--repository",
        "shop", cwd=folder,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return folder / "shop", {int(r["product_id"]): r for r in rows}


@pytest.fixture(scope="module")
def server(shop, module_folder):
    with start_server(shop[0], module_folder("triton")) as running:
        yield running


CHEAP_DRILLS = Filters(in_stock=True, price_max=50.0, category="Tools / Power Tools")


def passes(row: dict, filters: Filters) -> bool:
    price = float(row["price"])
    return (
        (not filters.in_stock or row["in_stock"] == "1")
        and (filters.price_min is None or price >= filters.price_min)
        and (filters.price_max is None or price <= filters.price_max)
        and (
            filters.category is None
            or category_path(row["category"])[: len(category_path(filters.category))]
            == category_path(filters.category)
        )
    )


def test_the_manifest_lists_the_filterable_attributes(shop) -> None:
    manifest = json.loads((shop[0] / "manifest.json").read_text())
    assert manifest["filters"]["category"] == {"paths": 4, "known": len(shop[1])}
    assert manifest["filters"]["price"]["min"] == 1.99


@pytest.mark.parametrize(
    "filters",
    [CHEAP_DRILLS, Filters(price_min=150.0), Filters(category="garden"), Filters(in_stock=True)],
)
def test_a_filtered_search_returns_k_products_that_pass(shop, server, filters) -> None:
    repository, products = shop
    with SearchClient(server.grpc_url, timeout=30) as client:
        hits = client.search("cordless drill", top_k=20, filters=filters)
        unfiltered = client.search("cordless drill", top_k=20)
    assert len(hits) == 20
    assert all(passes(products[h.product_id], filters) for h in hits)
    assert not all(passes(products[h.product_id], filters) for h in unfiltered)
    inputs = {
        "IN_STOCK": np.array([filters.in_stock]),
        "PRICE_MIN": None if filters.price_min is None else np.float32([filters.price_min]),
        "PRICE_MAX": None if filters.price_max is None else np.float32([filters.price_max]),
        "CATEGORY": None if filters.category is None else filters.category,
    }
    local = SearchPipeline.from_repository(repository).search("cordless drill", 20, None, inputs)
    assert [h.product_id for h in hits] == local.product_ids.tolist()


def test_the_async_client_filters_too(shop, server) -> None:
    async def both() -> tuple[list[int], list[int]]:
        async with AsyncSearchClient(server.grpc_url, timeout=30) as client:
            hits = await client.search("paint roller", top_k=10, filters=CHEAP_DRILLS)
        with SearchClient(server.grpc_url, timeout=30) as client:
            same = client.search("paint roller", top_k=10, filters=CHEAP_DRILLS)
        return [h.product_id for h in hits], [h.product_id for h in same]

    asynchronous, synchronous = asyncio.run(both())
    assert asynchronous == synchronous and len(asynchronous) == 10


def test_the_cli_filters(server, shop, capsys) -> None:
    url = server.grpc_url
    code = search_cli(
        ["drill", "--url", url, "--in-stock", "--price-max", "20", "--category", "Tools", "--json"]
    )
    assert code == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hits) == 10
    assert all(passes(shop[1][h["product_id"]], Filters(True, None, 20.0, "Tools")) for h in hits)


@pytest.mark.parametrize(
    ("filters", "problem"),
    [
        (Filters(price_min=60.0, price_max=50.0), "PRICE_MIN \\(60.0\\) is above PRICE_MAX"),
        (Filters(price_max=-1.0), "PRICE_MAX must be a finite number"),
        (Filters(category="Kitchen"), "no product is in the category 'kitchen'"),
    ],
)
def test_bad_filters_are_invalid_argument(server, filters, problem) -> None:
    with (
        SearchClient(server.grpc_url, timeout=30) as client,
        pytest.raises(InvalidRequestError, match=problem),
    ):
        client.search("drill", top_k=5, filters=filters)


def test_a_store_without_the_attribute_refuses_its_filter(built_repository) -> None:
    """The Home Depot store has no price column: a price filter is refused, naming it."""
    local = SearchPipeline.from_repository(built_repository)
    with pytest.raises(ValueError, match="price, which this store's catalogue does not have"):
        local.search("drill", 5, None, {"PRICE_MAX": np.float32([5.0])})
