"""One suite for both clients: SearchClient and AsyncSearchClient against the same real server (a
personalised store that requires an inference key and has an operator's key), with the same calls,
the same answers and the same typed errors."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ADMIN_KEY, start_server
from shopserve.client import (
    AsyncSearchClient,
    CatalogueApplied,
    Event,
    ModelNotServedError,
    PermissionDeniedError,
    ProductChange,
    RequestTimeoutError,
    SearchClient,
    Security,
)
from shopserve.ensemble import store

pytestmark = [pytest.mark.slow, pytest.mark.server]

INFERENCE_KEY = "faces-inference-key-0123456789"
SHOPPER = "7"
NEW_PRODUCT = {"sync": 990_100_001, "async": 990_100_002}  # not in the catalogue


class Face:
    """A client's calls made blocking: the sync client as it is, the async one on its own loop."""

    def __init__(self, kind: str, url: str, security: Security, timeout: float = 30) -> None:
        self.kind = kind
        if kind == "sync":
            self.client = SearchClient(url, timeout=timeout, security=security)
        else:
            self.loop = asyncio.new_event_loop()
            self.client = AsyncSearchClient(url, timeout=timeout, security=security)

    def __getattr__(self, name: str):
        method = getattr(self.client, name)
        if self.kind == "sync":
            return method
        return lambda *args, **kwargs: self.loop.run_until_complete(method(*args, **kwargs))

    def close(self) -> None:
        self.close_client()
        if self.kind == "async":
            self.loop.close()

    def close_client(self) -> None:
        result = self.client.close()
        if self.kind == "async":
            self.loop.run_until_complete(result)


@pytest.fixture(scope="module")
def keyed_server(personal_repository, module_folder):
    work = module_folder("faces")
    with start_server(personal_repository, work, inference_key=INFERENCE_KEY) as server:
        yield server


@pytest.fixture(params=["sync", "async"])
def face(request, keyed_server):
    def make(**security) -> Face:
        made = Face(request.param, keyed_server.grpc_url, Security(**security))
        opened.append(made)
        return made

    opened: list[Face] = []
    yield make
    for made in opened:
        made.close()


def ids(hits) -> list[int]:
    return [hit.product_id for hit in hits]


def test_both_clients_send_the_inference_key_and_get_the_same_answers(face, keyed_server) -> None:
    client = face(inference_key=INFERENCE_KEY)
    with SearchClient(
        keyed_server.grpc_url, timeout=30, security=Security(inference_key=INFERENCE_KEY)
    ) as reference:
        assert ids(client.search("yogurt", top_k=5)) == ids(reference.search("yogurt", top_k=5))
        assert ids(client.recommend(SHOPPER, top_k=5)) == ids(reference.recommend(SHOPPER, 5))
        personal = client.search("yogurt", top_k=5, user_id=SHOPPER)
        assert ids(personal) == ids(reference.search("yogurt", top_k=5, user_id=SHOPPER))
    assert client.ready()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_both_clients_say_a_store_without_events_serves_no_recommend(kind, server) -> None:
    """The search-only store's server has no recommend or events: an error that says why, and
    one not to retry (record, which retries transient failures, fails at once)."""
    client = Face(kind, server.grpc_url, Security())
    try:
        with pytest.raises(ModelNotServedError, match="built without --events") as missing:
            client.recommend(SHOPPER)
        assert not missing.value.retryable and "'recommend'" in missing.value.message
        started = time.monotonic()
        with pytest.raises(ModelNotServedError, match="'events'"):
            client.record(SHOPPER, 196, "purchase")
        assert time.monotonic() - started < 0.05  # the first retry would wait 0.05 s
    finally:
        client.close()


def test_both_clients_are_refused_without_the_inference_key(face) -> None:
    client = face()
    with pytest.raises(PermissionDeniedError) as refused:
        client.search("yogurt", top_k=5)
    assert not refused.value.retryable


def test_both_clients_record_events_with_the_key(face) -> None:
    client = face(inference_key=INFERENCE_KEY)
    event = Event("faces-shopper", 196, "add_to_cart", event_id=f"faces-{client.kind}")
    assert client.record_many([event]) == 1
    assert client.record_many([event]) == 0  # the same event id counts once


def test_both_clients_forget_with_the_operators_key(face) -> None:
    client = face(inference_key=INFERENCE_KEY, admin_key=ADMIN_KEY)
    shopper = f"faces-forget-{client.kind}"
    client.record(shopper, 196, "purchase")
    assert client.forget(shopper) is True
    assert client.forget(shopper) is False


def test_both_clients_update_the_catalogue_once_with_the_operators_key(face) -> None:
    """An update applies once (sent again under its id it is a duplicate), the next search finds
    the product, and without the operator's key the update is refused."""
    client = face(inference_key=INFERENCE_KEY, admin_key=ADMIN_KEY)
    product, title = NEW_PRODUCT[client.kind], f"Quorvane {client.kind} rye crispbread"
    change = [ProductChange(product, title, 2.5, True)]
    assert client.update_catalogue(change, f"faces-{client.kind}") == CatalogueApplied(1, False)
    assert client.update_catalogue(change, f"faces-{client.kind}") == CatalogueApplied(0, True)
    assert ids(client.search(f"quorvane {client.kind} crispbread", top_k=3))[0] == product
    without_key = face(inference_key=INFERENCE_KEY)
    with pytest.raises(PermissionDeniedError, match="operator's key") as refused:
        without_key.update_catalogue([ProductChange(product, "Another title")])
    assert not refused.value.retryable
    assert ids(client.search(f"quorvane {client.kind} crispbread", top_k=3))[0] == product


@pytest.mark.parametrize("wrong", ["a-wrong-operator-key-000000", "clé-opérateur-fausse-ü"])
def test_a_wrong_operators_key_is_a_permission_error_for_both(face, wrong) -> None:
    client = face(inference_key=INFERENCE_KEY, admin_key=wrong)
    with pytest.raises(PermissionDeniedError, match="operator's key") as refused:
        client.forget(SHOPPER)
    assert not refused.value.retryable
    assert len(client.recommend(SHOPPER, top_k=3)) == 3  # the shopper is still there


def test_forget_without_an_operators_key_is_refused_before_sending(face) -> None:
    with pytest.raises(ValueError, match="operator's key"):
        face(inference_key=INFERENCE_KEY).forget(SHOPPER)


def test_both_clients_deadlines_reach_the_server(face, keyed_server) -> None:
    """Requests whose deadline passes while they wait in the server's queue are dropped there,
    never computed (the server gets the client's deadline). Two long queries (about 30 ms each)
    occupy both search instances, one at a time so that neither is batched with the other; then 4
    probes with a 3 ms deadline wait behind them."""

    def successes() -> int:
        url = f"http://{keyed_server.http_url}/v2/models/{store.SEARCH}/stats"
        with urllib.request.urlopen(url) as response:
            stats = json.loads(response.read())["model_stats"][0]["inference_stats"]
        return int(stats["success"]["count"])

    security = Security(inference_key=INFERENCE_KEY)
    long_query = " ".join(f"cordless drill bit set {i} inch steel" for i in range(25))
    client = face(inference_key=INFERENCE_KEY)
    client.search("warm up", top_k=5)  # the model config is asked once, outside the burst
    with SearchClient(keyed_server.grpc_url, timeout=30, security=security) as blocker:
        blocker.search("warm up", top_k=5)
        before = successes()
        with ThreadPoolExecutor(2) as pool:
            blocking = []
            for _ in range(2):
                blocking.append(pool.submit(blocker.search, long_query, 5))
                time.sleep(0.005)  # an idle instance takes it before the next arrives
            with pytest.raises(RequestTimeoutError):
                client.search_many(
                    [f"deadline probe {i}" for i in range(4)], top_k=5, timeout=0.003
                )
            assert all(len(answer.result()) == 5 for answer in blocking)
    time.sleep(0.2)
    assert successes() - before == 2  # the long queries only
