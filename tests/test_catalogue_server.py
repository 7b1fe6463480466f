"""Live catalogue updates against the real server (the personalised Instacart store, two versions):
add, change, delete and reprice while serving, seen by search, recommend, personalised search and
events; idempotent retries, bad rows, the CLI, a rollback and a roll forward, kill -9, and two
servers sharing the updates through Redis."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import ADMIN_KEY, start_server
from shopserve.client import (
    AsyncSearchClient,
    Event,
    Filters,
    InvalidRequestError,
    PermissionDeniedError,
    ProductChange,
    SearchClient,
    Security,
)
from shopserve.client._cli import catalogue_main
from shopserve.ensemble import store
from test_events import _kill_everything, second_version

pytestmark = [pytest.mark.slow, pytest.mark.server]

OPERATOR = Security(admin_key=ADMIN_KEY)
SHOPPER = "catalogue-shopper-5e2d"
NEW_PRODUCT = 990_000_001


@pytest.fixture(scope="module")
def repository(personal_repository, module_folder):
    """The personal store with a second version beside the first (the server serves the newest)."""
    return second_version(personal_repository, module_folder("catalogue-store"))


@pytest.fixture(scope="module")
def work(module_folder):
    return module_folder("catalogue-work")


@pytest.fixture(scope="module")
def server(repository, work):
    with start_server(repository, work) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with SearchClient(server.grpc_url, timeout=30, security=OPERATOR) as connected:
        yield connected


@pytest.fixture(scope="module")
def catalogue(repository) -> store.Catalogue:
    return store.load_catalogue(repository)


def ids(hits) -> list[int]:
    return [hit.product_id for hit in hits]


def test_an_added_product_is_found_by_its_title(client, server) -> None:
    title = "Zorblax smoked paprika crackers"
    applied = client.update_catalogue([ProductChange(NEW_PRODUCT, title, 3.49, True)], "add-1")
    assert (applied.applied, applied.duplicate) == (1, False)
    hits = client.search("zorblax paprika crackers", top_k=5)
    assert hits[0].product_id == NEW_PRODUCT and hits[0].title == title

    async def from_async() -> list[int]:
        async with AsyncSearchClient(server.grpc_url, timeout=30) as other:
            return ids(await other.search("zorblax crackers", top_k=5))

    assert asyncio.run(from_async())[0] == NEW_PRODUCT
    personalised = client.search("zorblax paprika crackers", top_k=5, user_id=SHOPPER)
    assert personalised[0].product_id == NEW_PRODUCT


def test_a_changed_title_is_found_by_the_new_one_only(client, catalogue) -> None:
    product, old_title = int(catalogue.product_ids[40]), catalogue.titles[40]
    assert product in ids(client.search(old_title, top_k=10))
    client.update_catalogue([ProductChange(product, "Quillberry velvet tea biscuits")])
    assert ids(client.search("quillberry velvet biscuits", top_k=3))[0] == product
    assert product not in ids(client.search(old_title, top_k=10))


def test_a_deleted_product_is_never_returned(client, catalogue) -> None:
    shopper = "1"  # a shopper of the build's history
    favourite = ids(client.recommend(shopper, top_k=10))[0]
    title = catalogue.titles[catalogue.product_ids.tolist().index(favourite)]
    assert favourite in ids(client.search(title, top_k=10, user_id=shopper))
    result = client.update_catalogue([ProductChange(favourite, delete=True)])
    assert result.applied == 1
    assert favourite not in ids(client.recommend(shopper, top_k=100))
    assert favourite not in ids(client.recommend(shopper, top_k=100, new_only=True))
    assert favourite not in ids(client.search(title, top_k=100))
    assert favourite not in ids(client.search(title, top_k=100, user_id=shopper))
    with pytest.raises(InvalidRequestError, match="not in the catalogue"):
        client.record_many([Event(SHOPPER, favourite, "purchase")])


def test_filters_follow_stock_and_price_updates(client) -> None:
    product = NEW_PRODUCT + 1
    title = "Plumbrix organic fig spread"
    client.update_catalogue([ProductChange(product, title, 4.25, True, "Pantry / Spreads")])
    wanted = Filters(in_stock=True, price_min=4.0, price_max=4.5)
    assert ids(client.search("plumbrix fig spread", top_k=5, filters=wanted))[0] == product
    in_category = Filters(category="Pantry")
    assert ids(client.search("plumbrix fig spread", top_k=5, filters=in_category))[0] == product
    client.update_catalogue([ProductChange(product, title, 4.25, False, "Pantry / Spreads")])
    assert product not in ids(client.search("plumbrix fig spread", top_k=100, filters=wanted))
    client.update_catalogue([ProductChange(product, title, 6.0, True, "Pantry / Spreads")])
    assert product not in ids(client.search("plumbrix fig spread", top_k=100, filters=wanted))
    assert (
        ids(client.search("plumbrix fig spread", top_k=5, filters=Filters(price_min=5.5)))[0]
        == product
    )


def test_a_retried_update_applies_once(client) -> None:
    change = [ProductChange(NEW_PRODUCT + 2, "Grellow lime seltzer")]
    assert client.update_catalogue(change, "retry-1").applied == 1
    again = client.update_catalogue(change, "retry-1")
    assert (again.applied, again.duplicate) == (0, True)
    with pytest.raises(InvalidRequestError, match="applied before with other rows"):
        client.update_catalogue([ProductChange(NEW_PRODUCT + 2, "Other title")], "retry-1")
    assert ids(client.search("grellow lime seltzer", top_k=3))[0] == NEW_PRODUCT + 2


def test_bad_rows_are_refused_and_nothing_is_applied(client) -> None:
    good = ProductChange(NEW_PRODUCT + 3, "Snorvel maple granola")
    rows = [good, ProductChange(NEW_PRODUCT + 4, ""), ProductChange(NEW_PRODUCT + 3, "Twice")]
    with pytest.raises(InvalidRequestError) as refused:
        client.update_catalogue(rows)
    message = refused.value.message
    assert "upsert without a title: rows 1" in message
    assert "product id repeated in the update: rows 0, 2" in message
    assert NEW_PRODUCT + 3 not in ids(client.search("snorvel maple granola", top_k=10))
    with pytest.raises(InvalidRequestError, match="price not a number"):
        client.update_catalogue([ProductChange(NEW_PRODUCT + 3, "Snorvel", price=-1.0)])


def test_an_update_needs_the_operators_key(server) -> None:
    with (
        SearchClient(server.grpc_url, timeout=30) as anonymous,
        pytest.raises(PermissionDeniedError, match="operator's key"),
    ):
        anonymous.update_catalogue([ProductChange(NEW_PRODUCT + 5, "Vexlin oat milk")])


def test_the_cli_applies_a_file_once(server, client, tmp_path, capsys) -> None:
    path = tmp_path / "updates.csv"
    path.write_text(
        "product_id,title,price,in_stock,category,operation\n"
        f"{NEW_PRODUCT + 6},Brindle sour cherry jam,3.99,yes,Pantry,\n"
        f"{NEW_PRODUCT + 2},,,,,delete\n"
    )
    key = tmp_path / "admin.key"
    key.write_text(ADMIN_KEY)
    arguments = ["apply", str(path), "--url", server.grpc_url, "--admin-key-file", str(key)]
    assert catalogue_main(arguments) == 0
    assert "sent 2 products" in capsys.readouterr().out
    assert catalogue_main(arguments) == 0  # the same file again: the same update ids
    assert "0 applied, 2 applied before" in capsys.readouterr().out
    assert ids(client.search("brindle cherry jam", top_k=3))[0] == NEW_PRODUCT + 6
    assert NEW_PRODUCT + 2 not in ids(client.search("grellow lime seltzer", top_k=100))


def test_updates_outlive_a_rollback_and_a_roll_forward(server, client, repository) -> None:
    from shopserve.rollout import Rollout

    client.update_catalogue([ProductChange(NEW_PRODUCT + 7, "Truffwick hazelnut wafers")])
    with Rollout(server.grpc_url, OPERATOR) as control:
        for version in (1, 2):
            live = control.roll_to(repository, version)
            assert live[store.CATALOGUE] == [version] and live[store.SEARCH] == [version]
            assert ids(client.search("truffwick hazelnut wafers", top_k=3))[0] == NEW_PRODUCT + 7


def test_updates_are_carried_to_a_new_build(
    personal_repository, newer_personal_repository, tmp_path
) -> None:
    """A release to another build (built again from newer events) on the same work folder
    serves every update logged while the old one served."""
    with (
        start_server(personal_repository, tmp_path) as old,
        SearchClient(old.grpc_url, timeout=30, security=OPERATOR) as client,
    ):
        client.update_catalogue([ProductChange(NEW_PRODUCT + 30, "Wendlebrook rye sourdough")])
        delisted = ids(client.recommend("1", top_k=10))[0]
        client.update_catalogue([ProductChange(delisted, delete=True)])
    with (
        start_server(newer_personal_repository, tmp_path) as new,
        SearchClient(new.grpc_url, timeout=30) as client,
    ):
        assert ids(client.search("wendlebrook rye sourdough", top_k=3))[0] == NEW_PRODUCT + 30
        assert delisted not in ids(client.recommend("1", top_k=100))


def test_acknowledged_updates_survive_kill_9(server, repository, work) -> None:
    """Last in the module: kills the module's server, then starts it again on the same folder."""
    with SearchClient(server.grpc_url, timeout=30, security=OPERATOR) as client:
        acknowledged = [
            client.update_catalogue([ProductChange(NEW_PRODUCT + 10 + n, f"Kestrix biscuit {n}")])
            for n in range(5)
        ]
    _kill_everything(server)
    assert [a.applied for a in acknowledged] == [1] * 5
    with (
        start_server(repository, work) as again,
        SearchClient(again.grpc_url, timeout=30) as client,
    ):
        found = ids(client.search("kestrix biscuit", top_k=10))
        assert set(range(NEW_PRODUCT + 10, NEW_PRODUCT + 15)) <= set(found)


def test_two_servers_share_updates_through_redis(personal_repository, redis_url, tmp_path) -> None:
    location = redis_url + "?namespace=catalogue-shared&catalogue=catalogue-test"
    with (
        start_server(personal_repository, tmp_path / "a", location) as first,
        start_server(personal_repository, tmp_path / "b", location) as second,
        SearchClient(first.grpc_url, timeout=30, security=OPERATOR) as to_first,
        SearchClient(second.grpc_url, timeout=30) as to_second,
    ):
        to_first.update_catalogue([ProductChange(NEW_PRODUCT + 20, "Morvath ginger kombucha")])
        assert ids(to_second.search("morvath ginger kombucha", top_k=3))[0] == NEW_PRODUCT + 20
        shopper_favourite = ids(to_second.recommend("1", top_k=10))[0]
        to_first.update_catalogue([ProductChange(shopper_favourite, delete=True)])
        assert shopper_favourite not in ids(to_second.recommend("1", top_k=100))
        assert np.int64(shopper_favourite) not in ids(to_first.recommend("1", top_k=100))
