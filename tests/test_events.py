"""Live events against the real server, on both profile-store backends (SQLite and a real Redis):
read-your-writes, idempotence, all-or-nothing bad batches, forget, durability through kill -9, two
servers sharing one Redis, and no personal data in the logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import (
    ADMIN_KEY,
    export,
    make_certificates,
    raw_infer,
    running_redis,
    start_server,
    tensor,
    tls_in_front_of,
)
from shopserve.client import (
    AsyncSearchClient,
    Event,
    InvalidRequestError,
    PermissionDeniedError,
    SearchClient,
    Security,
)
from shopserve.client._cli import events_main, forget_main
from shopserve.ensemble import store
from shopserve.ensemble.personal import RecommendPipeline, profile_namespace, snapshot_path
from shopserve.ensemble.profile_store import PROFILE_STORE_ENV

from shopserve.memory import process_tree

pytestmark = [pytest.mark.slow, pytest.mark.server]

# Distinctive ids and queries: the log check greps for them.
SHOPPER = "live-shopper-7f3a91"
OTHER = "live-shopper-c0ffee"
QUERY = "zesty lemon sparkling water"


@pytest.fixture(scope="module")
def catalogue(personal_repository) -> np.ndarray:
    return store.load_catalogue(personal_repository).product_ids


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def live(request, personal_repository, module_folder):
    """A server with its own live profile store of each backend."""
    work = module_folder(f"live-{request.param}")
    location = None
    if request.param == "redis":
        location = request.getfixturevalue("redis_url") + "?namespace=" + request.param
    with start_server(personal_repository, work, location) as server:
        yield server


OPERATOR = Security(admin_key=ADMIN_KEY)


@pytest.fixture(scope="module")
def client(live) -> SearchClient:
    with SearchClient(live.grpc_url, timeout=30, security=OPERATOR) as shopper_client:
        yield shopper_client


def ids(hits) -> list[int]:
    return [h.product_id for h in hits]


def test_the_next_recommendation_sees_an_event(client, catalogue) -> None:
    shopper = f"{SHOPPER}-ryw"
    before = client.recommend(shopper, top_k=10)  # an unknown shopper: the best sellers
    item = before[0].product_id
    assert client.record(shopper, item, "add_to_cart") == 1
    after = client.recommend(shopper, top_k=10)
    assert item not in ids(after)  # what is in the cart is never recommended
    bought = [int(p) for p in catalogue[:3]]
    assert client.record_many([Event(shopper, p, "purchase") for p in bought]) == 3
    history = client.recommend(shopper, top_k=20)
    assert set(bought) <= set(ids(history))  # the shopper's own purchases come back


def test_the_next_personalised_search_sees_an_event(client) -> None:
    shopper = f"{SHOPPER}-search"
    first = client.search(QUERY, top_k=10, user_id=shopper)
    assert ids(first) == ids(client.search(QUERY, top_k=10))  # unknown: the anonymous answer
    last = first[-1].product_id
    client.record_many([Event(shopper, last, "purchase") for _ in range(3)])
    again = client.search(QUERY, top_k=10, user_id=shopper)
    assert ids(again)[0] == last  # what they buy rises to the top of their search


def test_a_retried_batch_counts_once(client, catalogue) -> None:
    batch = [
        Event(OTHER, int(p), "click", event_id=f"retry-{i}") for i, p in enumerate(catalogue[:5])
    ]
    assert client.record_many(batch) == 5
    assert client.record_many(batch) == 0
    assert client.record_many([*batch[:2], Event(OTHER, int(catalogue[9]), "view")]) == 1


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"product_id": 10**12}, "PRODUCT_IDS[1] = 1000000000000 is not in the catalogue"),
        ({"event": "like"}, "EVENT_TYPES[1] = 'like' is not one of view, click, add_to_cart"),
        ({"user_id": ""}, "USER_IDS[1] is empty"),
        ({"event_id": ""}, "EVENT_IDS[1] is empty"),
        ({"timestamp": time.time() + 2 * 86400}, "TIMESTAMPS[1] = "),
    ],
)
def test_a_bad_event_rejects_its_whole_batch(client, catalogue, change, problem) -> None:
    shopper = f"{SHOPPER}-bad-{len(problem)}"
    good = Event(shopper, int(catalogue[0]), "add_to_cart")
    fields = {
        "user_id": shopper,
        "product_id": int(catalogue[1]),
        "event": "add_to_cart",
        "timestamp": time.time(),
        "event_id": "second",
        **change,
    }
    with pytest.raises(InvalidRequestError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        client.record_many([good, Event(**fields)])
    # nothing of the batch was written: the good event is still new
    assert client.record_many([good]) == 1


def test_mismatched_arrays_and_oversized_batches_are_refused(live, client, catalogue) -> None:
    arrays = [
        ("USER_IDS", np.array([[b"a", b"b"]], dtype=object), "BYTES"),
        ("PRODUCT_IDS", np.array([[int(catalogue[0])]], np.int64), "INT64"),
        ("EVENT_TYPES", np.array([[b"view", b"view"]], dtype=object), "BYTES"),
        ("TIMESTAMPS", np.array([[time.time(), time.time()]]), "FP64"),
        ("EVENT_IDS", np.array([[b"x", b"y"]], dtype=object), "BYTES"),
    ]
    error = raw_infer(live.grpc_url, store.EVENTS, [tensor(*a) for a in arrays])
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "differ in length" in error.message()
    too_many = [Event(f"{SHOPPER}-big", int(catalogue[0]), "view") for _ in range(1025)]
    with pytest.raises(InvalidRequestError, match="a batch holds 1 to 1024 events, got 1025"):
        client.record_many(too_many)
    assert client.record(f"{SHOPPER}-big", int(catalogue[0]), "view") == 1


def test_forget_erases_a_shopper(client, catalogue) -> None:
    shopper = f"{SHOPPER}-forget"
    cold = ids(client.recommend("nobody-at-all", top_k=10))
    client.record_many([Event(shopper, int(p), "purchase") for p in catalogue[10:20]])
    assert ids(client.recommend(shopper, top_k=10)) != cold
    assert client.forget(shopper) is True
    assert ids(client.recommend(shopper, top_k=10)) == cold
    assert client.forget(shopper) is False


def test_forget_needs_the_operators_key(live, catalogue) -> None:
    shopper = f"{SHOPPER}-keyed"
    with SearchClient(live.grpc_url, timeout=30) as anyone:
        anyone.record(shopper, int(catalogue[0]), "purchase")
        with pytest.raises(ValueError, match="operator's key"):
            anyone.forget(shopper)  # the client will not even ask without a key
    wrong = Security(admin_key="not-the-operator-key-at-all")
    with (
        SearchClient(live.grpc_url, timeout=30, security=wrong) as intruder,
        pytest.raises(PermissionDeniedError, match="requires the operator's key"),
    ):
        intruder.forget(shopper)
    with SearchClient(live.grpc_url, timeout=30, security=OPERATOR) as operator:
        assert operator.forget(shopper) is True


def test_events_import_and_forget_cli(live, catalogue, tmp_path, capsys) -> None:
    path = tmp_path / "events.csv"
    rows = [
        f"{SHOPPER}-cli,{int(p)},2024-05-01T10:00:0{i}Z,purchase,b1"
        for i, p in enumerate(catalogue[:4])
    ]
    path.write_text("user_id,product_id,timestamp,event,basket_id\n" + "\n".join(rows) + "\n")
    url = ["--url", live.grpc_url]
    assert events_main(["import", str(path), "--batch-size", "3", *url]) == 0
    assert events_main(["import", str(path), *url]) == 0  # again: nothing new
    key = tmp_path / "admin.key"
    key.write_text(ADMIN_KEY)
    assert forget_main([f"{SHOPPER}-cli", *url, "--admin-key-file", str(key)]) == 0
    out = capsys.readouterr().out
    assert "sent 4 events" in out and "4 new" in out and "0 new, 4 recorded before" in out
    assert "forgotten" in out


def test_the_in_process_pipeline_reads_the_live_store(live, client, catalogue, personal_repository):
    shopper = f"{SHOPPER}-inproc"
    client.record_many([Event(shopper, int(p), "purchase") for p in catalogue[30:36]])
    os.environ[PROFILE_STORE_ENV] = live_location(live)
    try:
        pipeline = RecommendPipeline.from_repository(personal_repository)
        reference = pipeline.recommend(shopper, 10).product_ids.tolist()
    finally:
        del os.environ[PROFILE_STORE_ENV]
    assert ids(client.recommend(shopper, top_k=10)) == reference


def live_location(server) -> str:
    from shopserve.server import default_live_profiles

    return server.config.profile_store or str(default_live_profiles(server.config.work_dir))


def _kill_everything(server) -> None:
    """kill -9 tritonserver and every backend stub it started."""
    pid = server.process.pid
    stubs = [
        int(child)
        for child in os.listdir("/proc")
        if child.isdigit() and _parent(int(child)) == pid
    ]
    for target in [pid, *stubs]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)
    server.process.wait()


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_acknowledged_events_survive_kill_9(
    backend, request, personal_repository, catalogue, tmp_path
) -> None:
    location = None
    if backend == "redis":
        location = request.getfixturevalue("redis_url") + "?namespace=kill9"
    products = [int(p) for p in catalogue[100:160]]
    batches = [
        [
            Event(f"{SHOPPER}-k{u}", products[j], "add_to_cart", event_id=f"k{u}-{j}")
            for j in range(u, 60, 7)
        ]
        for u in range(7)
    ]
    server = start_server(personal_repository, tmp_path, location).start()
    try:
        with SearchClient(server.grpc_url, timeout=30) as client:
            acknowledged = [client.record_many(batch) for batch in batches]
        _kill_everything(server)
        assert server.shm_regions()  # the killed backends could not remove their own
    finally:
        server.stop()
    assert acknowledged == [len(b) for b in batches]
    assert server.shm_regions() == []  # stop() removed what the killed server left
    with (
        start_server(personal_repository, tmp_path, location) as again,
        SearchClient(again.grpc_url, timeout=30) as client,
    ):
        assert [client.record_many(batch) for batch in batches] == [0] * len(batches)
        assert_each_cart_event_once(personal_repository, live_location(again), batches)


def assert_each_cart_event_once(repository, location: str, batches: list[list[Event]]) -> None:
    """Each batch (one shopper's add-to-cart events) is in the live store at ``location``, each
    event exactly once."""
    os.environ[PROFILE_STORE_ENV] = location
    try:
        personal = RecommendPipeline.from_repository(repository).personal
        for batch in batches:
            profile = personal.profiles.get(personal.keys.key(batch[0].user_id))
            carts = {p: s.carts for p, s in profile.items.items() if s.carts}
            assert carts == {e.product_id: 1 for e in batch}, batch[0].user_id
    finally:
        del os.environ[PROFILE_STORE_ENV]


def test_two_servers_share_one_redis(personal_repository, redis_url, catalogue, tmp_path) -> None:
    """The second server reaches Redis over TLS (rediss://, its certificate checked against our
    CA): redis-py loads ssl inside the backend stub. What one server records, the other serves
    and explains."""
    location = redis_url + "?namespace=shared"
    shopper = f"{SHOPPER}-shared"
    files = make_certificates(tmp_path)
    with (
        tls_in_front_of(redis_url, files["server_cert"], files["server_key"]) as tls_port,
        start_server(personal_repository, tmp_path / "a", location) as first,
        start_server(
            personal_repository,
            tmp_path / "b",
            f"rediss://localhost:{tls_port}/0?ca_file={files['ca_cert']}&namespace=shared",
        ) as second,
        SearchClient(first.grpc_url, timeout=30, security=OPERATOR) as to_first,
        SearchClient(second.grpc_url, timeout=30, security=OPERATOR) as to_second,
    ):
        cold = ids(to_second.recommend(shopper, top_k=10))
        bought = [int(p) for p in catalogue[200:210]]
        to_first.record_many([Event(shopper, p, "purchase") for p in bought])
        warm = to_second.recommend(shopper, top_k=10, explain=True)
        assert ids(warm) != cold
        # the second server explains with the purchases the first one recorded, and so does the
        # async client
        words = [
            {r.signal: r.text for r in hit.explanation.reasons}
            for hit in warm
            if hit.product_id in bought
        ]
        assert words and all(w["your_purchases"].startswith("you bought it once,") for w in words)

        async def explained() -> list:
            async with AsyncSearchClient(second.grpc_url, timeout=30) as aio:
                return await aio.recommend(shopper, top_k=10, explain=True)

        assert [h.explanation for h in asyncio.run(explained())] == [h.explanation for h in warm]
        assert to_second.forget(shopper) is True
        assert ids(to_first.recommend(shopper, top_k=10)) == cold


def _searches_answered(server) -> float:
    """How many ``search`` requests ``server`` has answered (its Prometheus metrics)."""
    return server.metric_by_model("nv_inference_request_success").get("search", 0.0)


def _spread(servers, before: list[float], sent: int) -> list[float]:
    """How many of ``sent`` searches each server answered since ``before``. A server counts a
    request just after it answers: wait (up to 10 s) until the counts add up."""
    deadline = time.monotonic() + 10
    while True:
        spread = [_searches_answered(s) - b for s, b in zip(servers, before, strict=True)]
        if sum(spread) >= sent or time.monotonic() > deadline:
            return spread
        time.sleep(0.05)


def test_one_client_over_two_replicas_balances_and_survives_a_kill(
    personal_repository, redis_url, catalogue, tmp_path, capfd
) -> None:
    """Two servers on one Redis, one client given both addresses: gRPC's round robin uses both;
    an event sent through either is served by both; one server killed (-9) under load costs no
    request (gRPC retries it on the other). Nothing of gRPC's reaches the caller's stderr (asked
    for client-side health checks, which Triton cannot answer, it wrote an error line)."""
    location = redis_url + "?namespace=replicas"
    shopper = f"{SHOPPER}-replicas"
    with (
        start_server(personal_repository, tmp_path / "a", location) as first,
        start_server(personal_repository, tmp_path / "b", location) as second,
        SearchClient([first.grpc_url, second.grpc_url], timeout=30, security=OPERATOR) as replicas,
        SearchClient(second.grpc_url, timeout=30) as to_second,
    ):
        before = [_searches_answered(s) for s in (first, second)]
        for _ in range(20):
            assert len(replicas.search(QUERY, top_k=5)) == 5
        spread = _spread((first, second), before, 20)
        assert sum(spread) == 20 and min(spread) >= 5, spread  # both replicas answered

        async def search_both_async() -> list[int]:
            async with AsyncSearchClient([first.grpc_url, second.grpc_url], timeout=30) as aio:
                return [len(await aio.search(QUERY, top_k=5)) for _ in range(12)]

        before = [_searches_answered(s) for s in (first, second)]
        assert asyncio.run(search_both_async()) == [5] * 12  # the async client over both
        spread = _spread((first, second), before, 12)
        assert sum(spread) == 12 and min(spread) >= 1, spread

        cold = ids(to_second.recommend(shopper, top_k=10))
        for _ in range(2):  # each event reaches one replica or the other
            replicas.record_many([Event(shopper, int(p), "purchase") for p in catalogue[300:305]])
        assert ids(to_second.recommend(shopper, top_k=10)) != cold

        answered: list[int] = []  # appends are atomic: one per answer
        failed: list[Exception] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    answered.append(len(replicas.search(QUERY, top_k=5)))
                except Exception as exc:  # every failure counts
                    failed.append(exc)

        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(2)
        processes = process_tree(first.process.pid)
        first.process.kill()  # -9: no drain, connections cut with requests in flight
        killed_at = len(answered)
        time.sleep(3)
        stop.set()
        for worker in workers:
            worker.join()
        for orphan in processes[1:]:  # a model process can outlive a killed tritonserver
            with contextlib.suppress(ProcessLookupError):
                os.kill(orphan, signal.SIGKILL)
        assert failed == [], failed[:3]
        assert len(answered) - killed_at >= 20 and set(answered) == {5}  # the other kept answering
        assert len(replicas.search(QUERY, top_k=5)) == 5
    assert "health_check_client" not in capfd.readouterr().err


def test_no_personal_data_in_the_logs(live, client, catalogue) -> None:
    client.search(QUERY, top_k=5, user_id=SHOPPER)
    client.recommend(SHOPPER, top_k=5)
    with pytest.raises(InvalidRequestError):
        client.record_many([Event(SHOPPER, 10**12, "view")])
    logs = [live.log_file, *live.config.work_dir.rglob("*.log")]
    text = "\n".join(p.read_text(errors="replace") for p in logs if p.exists())
    assert text  # the server did log
    for secret in (SHOPPER, "live-shopper", QUERY, "lemon"):
        assert secret not in text, secret


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_logged_events_and_erasures_outlive_a_new_build_and_a_rollback(
    backend, personal_repository, newer_personal_repository, catalogue, tmp_path
) -> None:
    """Events recorded on one build are served after a restart on a newer build (built again,
    into its own folder, from a newer events file), and again after a restart back on the older one; a
    forgotten shopper stays forgotten on both."""
    with contextlib.ExitStack() as stack:
        location = None
        if backend == "redis":  # a Redis of its own: the erasure is logged for the whole shop
            (tmp_path / "redis").mkdir()
            location = stack.enter_context(running_redis(tmp_path / "redis"))
        builds = {"v1": personal_repository, "v2": newer_personal_repository}
        _release_rollback_restart(location, builds, catalogue, tmp_path)


def _release_rollback_restart(location, builds, catalogue, tmp_path) -> None:
    shopper, forgotten = f"{SHOPPER}-release", "1"  # "1" is in both builds' snapshots
    bought = int(catalogue[-7])
    with (
        start_server(builds["v1"], tmp_path / "work", location) as server,
        SearchClient(server.grpc_url, timeout=30, security=OPERATOR) as client,
    ):
        cold = ids(client.recommend("nobody-at-all", top_k=10))
        assert ids(client.recommend(forgotten, top_k=10)) != cold
        assert client.record_many([Event(shopper, bought, "purchase") for _ in range(5)]) == 5
        assert client.forget(forgotten)
    for build in ("v2", "v1", "v2"):
        with (
            start_server(builds[build], tmp_path / "work", location) as server,
            SearchClient(server.grpc_url, timeout=30) as client,
        ):
            assert bought in ids(client.recommend(shopper, top_k=10)), build
            assert ids(client.recommend(forgotten, top_k=10)) == cold, build


def second_version(repository, folder, newer=None):
    """A copy of ``repository`` with version 2 beside version 1 and its own manifest (the server
    starts on the newest): the files of the build ``newer`` (a repository built with the same
    configs and secret), or by default the same files, as a rebuild from the same inputs writes
    them."""
    import json
    import shutil

    copy = shutil.copytree(repository, folder / "two-versions")
    source = copy if newer is None else newer
    manifest = json.loads((source / store.MANIFEST_FILE).read_text())
    for model in manifest["models"]:
        shutil.copytree(source / model / "1", copy / model / "2")
    manifest["version"] = 2
    manifest["models"] = dict.fromkeys(manifest["models"], 2)
    manifest["files"] = {
        name.replace("/1/", "/2/", 1): digest for name, digest in manifest["files"].items()
    }
    for path in (copy / store.MANIFEST_FILE, copy / "manifests" / "v2.json"):
        path.write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_restart_after_an_in_place_rollback_serves_version_1_and_every_event(
    backend, personal_repository, newer_personal_repository, catalogue, tmp_path
) -> None:
    """Version 2 (a build from a newer events file) served, rolled back in place to version 1, the
    server restarted: it starts on version 1 (its snapshot, under its own name), and the events
    recorded before and after the rollback are served on it and after a rollout to version 2."""
    from shopserve.rollout import Rollout

    repository = second_version(personal_repository, tmp_path, newer_personal_repository)
    shopper, products = f"{SHOPPER}-in-place", [int(catalogue[-11]), int(catalogue[-13])]
    with contextlib.ExitStack() as stack:
        location = None
        if backend == "redis":
            (tmp_path / "redis").mkdir()
            location = stack.enter_context(running_redis(tmp_path / "redis"))

        def served(expected: int):
            """A server started on ``repository`` (checked to serve ``expected`` of every model):
            its rollout control and a client."""
            server = stack.enter_context(start_server(repository, tmp_path / "work", location))
            control = stack.enter_context(Rollout(server.grpc_url, Security(admin_key=ADMIN_KEY)))
            client = stack.enter_context(SearchClient(server.grpc_url, timeout=30))
            assert set(map(tuple, control.live_versions().values())) == {(expected,)}
            return control, client

        control, client = served(2)
        assert client.record_many([Event(shopper, products[0], "purchase") for _ in range(3)]) == 3
        live = control.roll_to(repository, 1)
        assert set(map(tuple, live.values())) == {(1,)}
        assert client.record_many([Event(shopper, products[1], "purchase") for _ in range(3)]) == 3
        assert set(products) <= set(ids(client.recommend(shopper, top_k=10)))
        stack.close()  # the server stops, and Redis (restarted below from its append-only file)

        if location is not None:
            location = stack.enter_context(running_redis(tmp_path / "redis"))
        control, client = served(1)
        assert set(products) <= set(ids(client.recommend(shopper, top_k=10)))
        live = control.roll_to(repository, 2)
        assert set(map(tuple, live.values())) == {(2,)}
        assert set(products) <= set(ids(client.recommend(shopper, top_k=10)))


class EventStream:
    """Batches of 4 cart events for new shoppers, back to back in a thread: what was acknowledged,
    and every failure."""

    def __init__(self, url: str, products: list[int]) -> None:
        self.url, self.products = url, products
        self.acknowledged: list[list[Event]] = []
        self.failed: list[list[Event]] = []
        self.failures: list[Exception] = []
        self._running = True

    def run(self) -> None:
        with SearchClient(self.url, timeout=30) as client:
            number = 0
            while self._running:
                batch = [
                    Event(f"{SHOPPER}-rel{number}", p, "add_to_cart", event_id=f"r{number}-{p}")
                    for p in self.products[number % 10 : number % 10 + 4]
                ]
                try:
                    client.record_many(batch)
                    self.acknowledged.append(batch)
                except Exception as exc:  # every failure is the finding
                    self.failed.append(batch)
                    self.failures.append(exc)
                number += 1

    def stop(self) -> None:
        self._running = False


def test_a_release_while_events_stream_in_loses_no_event(
    personal_repository, catalogue, tmp_path
) -> None:
    """Roll back from version 2 to 1, forward and back again while events stream in: no request
    fails and every acknowledged event is in the live store afterwards, once."""
    import threading

    from shopserve.rollout import Rollout

    repository = second_version(personal_repository, tmp_path)
    stream = EventStream("", [int(p) for p in catalogue[300:320]])
    with start_server(repository, tmp_path / "work") as server:
        stream.url = server.grpc_url
        streaming = threading.Thread(target=stream.run)
        streaming.start()
        with Rollout(server.grpc_url, Security(admin_key=ADMIN_KEY)) as control:
            try:
                assert control.live_versions()[store.EVENTS] == [2]
                for version in (1, 2, 1):
                    live = control.roll_to(repository, version)
                    assert all(versions == [version] for versions in live.values()), live
            finally:
                stream.stop()
                streaming.join()
        assert stream.failures == [] and len(stream.acknowledged) > 20
        assert_each_cart_event_once(repository, live_location(server), stream.acknowledged)


@pytest.fixture(scope="module")
def small_personal_shop(
    instacart_files, built_repository, personal_repository, user_key_file, module_folder
):
    """A small shop's first build: its files, the rankers it takes from the session's stores (no
    training: the builds are about the event log), and the repository at version 1."""
    from test_recommend_gate import small_shop

    folder = module_folder("export-release")
    items, events = small_shop(instacart_files, folder)
    rankers = (
        "--ranker", store.model_file(built_repository, store.RANKER),
        "--rec-ranker", store.model_file(personal_repository, store.REC_RANKER),
    )  # fmt: skip
    run = export(
        "build", "--catalogue", items, "--events", events, *rankers,
        "--repository", folder / "shop",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return items, events, rankers, folder / "shop"


def _stored_profile(location, user_id: str):
    """A shopper's profile in a profile store (a live store, SQLite or a Redis namespace, or a
    build's snapshot), read beside the server."""
    from shopserve.ensemble.profile_store import open_store
    from shopserve.ensemble.profiles import UserKeys

    stored = open_store(location, readonly=True)
    try:
        return stored.get(UserKeys.from_environment().key(user_id))
    finally:
        stored.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_build_from_the_running_servers_exported_log_rolls_out_and_back(
    backend, small_personal_shop, tmp_path, capsys
) -> None:
    """The release the docs describe, on a running server: export its event log, build version 2
    from the shop's file and the export, roll out, back and out again, restart (on version 2).
    The events the build folded count once, those sent after the export are replayed, and a
    shopper forgotten before the export stays forgotten, keeping what they sent after it. On Redis
    the restart seeds version 2's own namespace from its snapshot and the shop's log."""
    with contextlib.ExitStack() as stack:
        redis = None
        if backend == "redis":  # a Redis of its own: the erasure is logged for the whole shop
            (tmp_path / "redis").mkdir()
            redis = stack.enter_context(running_redis(tmp_path / "redis"))
        _release_from_an_exported_log(redis, small_personal_shop, tmp_path, capsys)


def _release_from_an_exported_log(redis, small_personal_shop, tmp_path, capsys) -> None:
    import csv
    import shutil

    from shopserve.cli import main
    from shopserve.rollout import Rollout

    items, events, rankers, built = small_personal_shop
    repository = shutil.copytree(built, tmp_path / "shop")
    with events.open() as handle:
        rows = list(csv.DictReader(handle))
    forgotten = rows[0]["user_id"]
    history = {int(r["product_id"]) for r in rows if r["user_id"] == forgotten}
    products = [int(p) for p in store.load_catalogue(repository).product_ids]
    comeback = next(p for p in products if p not in history)
    before, after = f"{SHOPPER}-exported", f"{SHOPPER}-after-export"
    bought = {before: products[-3], after: products[-5], forgotten: comeback}

    def check(client, live_store: str, version: int) -> None:
        for shopper, product in bought.items():
            assert product in ids(client.recommend(shopper, top_k=10)), (shopper, version)
            profile = _stored_profile(live_store, shopper)
            expected = {comeback: 1} if shopper == forgotten else {product: 5}
            assert {p: s.purchases for p, s in profile.items.items()} == expected, version

    def live_store(server, started_on: int) -> str:
        """Where the server keeps its live profiles: on Redis, the namespace of the version it
        started on (kept for its life)."""
        if redis is None:
            return live_location(server)
        return f"{redis}?namespace={profile_namespace(repository, started_on)}"

    with (
        start_server(repository, tmp_path / "work", redis) as server,
        SearchClient(server.grpc_url, timeout=30, security=OPERATOR) as client,
        Rollout(server.grpc_url, OPERATOR) as control,
    ):
        assert (
            client.record_many([Event(before, bought[before], "purchase") for _ in range(5)]) == 5
        )
        assert client.forget(forgotten)
        assert client.record_many([Event(forgotten, comeback, "purchase")]) == 1
        log = tmp_path / "log.csv"
        assert main(["events", "export", "--profile-store", live_store(server, 1), str(log)]) == 0
        assert "wrote 6 events and 1 erasures" in capsys.readouterr().out
        assert client.record_many([Event(after, bought[after], "purchase") for _ in range(5)]) == 5
        run = export(
            "build", "--catalogue", items, "--events", events, "--events-log", log, *rankers,
            "--encoder-from", repository, "--repository", repository, "--version", 2,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        manifest = json.loads((repository / store.MANIFEST_FILE).read_text())
        assert manifest["personalization"]["event_log"]["erased_shoppers"] == 1
        snapshot = snapshot_path(repository, 2)  # what the build folded: the export, no more
        assert set(_stored_profile(snapshot, forgotten).items) == {comeback}
        assert set(_stored_profile(snapshot, before).items) == {bought[before]}
        assert _stored_profile(snapshot, after) is None
        for version in (2, 1, 2):  # in place: the live store stays the one the server began with
            live = control.roll_to(repository, version)
            assert set(map(tuple, live.values())) == {(version,)}
            check(client, live_store(server, 1), version)
    with (  # a restart on version 2: its snapshot (which folded the export) and the log replayed
        start_server(repository, tmp_path / "work", redis) as server,
        SearchClient(server.grpc_url, timeout=30) as client,
        Rollout(server.grpc_url, OPERATOR) as control,
    ):
        assert set(map(tuple, control.live_versions().values())) == {(2,)}
        check(client, live_store(server, 2), 2)
