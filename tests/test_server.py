"""End-to-end tests against the real tritonserver serving a fully built repository, over gRPC."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import PROJECT, raw_infer, tensor
from shopserve.client import AsyncSearchClient, InvalidRequestError, SearchClient
from shopserve.client._cli import main as search_cli
from shopserve.ensemble import store

from shopserve.server import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.fixture(scope="module")
def client(server) -> SearchClient:
    with SearchClient(server.grpc_url, timeout=30) as search_client:
        yield search_client


@pytest.fixture(scope="module", params=[store.SEARCH, store.ENSEMBLE])
def endpoint(request, server) -> SearchClient:
    """A client of each endpoint: the one-model graph and the five-model ensemble."""
    with SearchClient(server.grpc_url, model_name=request.param, timeout=30) as search_client:
        yield search_client


def test_served_ids_equal_the_in_process_pipeline(endpoint, pipeline, dev_queries) -> None:
    queries = dev_queries[:200]
    served = endpoint.search_many(queries, top_k=10, max_in_flight=4)
    for query, hits in zip(queries, served, strict=True):
        reference = pipeline.search(query, 10)
        assert [h.product_id for h in hits] == reference.product_ids.tolist(), query
        np.testing.assert_allclose([h.score for h in hits], reference.scores, atol=1e-5)
        assert [h.title for h in hits] == reference.titles


def test_search_returns_ranked_real_products(client) -> None:
    hits = client.search("cordless drill", top_k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
    assert sum("drill" in h.title.lower() for h in hits) >= 4
    assert len(client.search("angle bracket", top_k=100)) == 100


def test_long_queries_are_truncated_not_rejected(client) -> None:
    hits = client.search("drill " * 170, top_k=3)  # 1020 bytes, far past 256 tokens
    assert len(hits) == 3


BAD_QUERIES = [
    (b"", "empty"),
    (b"   ", "empty"),
    (b"x" * 1025, "limit"),
    (b"drill \xff\xfe", "not valid UTF-8"),
]


@pytest.mark.parametrize(("query", "problem"), BAD_QUERIES)
def test_bad_query_is_invalid_argument_and_server_keeps_serving(endpoint, query, problem) -> None:
    with pytest.raises(InvalidRequestError, match=problem) as caught:
        endpoint.search(query, top_k=5)
    assert caught.value.status == "StatusCode.INVALID_ARGUMENT"
    assert len(endpoint.search("paint roller", top_k=5)) == 5


@pytest.mark.parametrize("top_k", [0, -1, 101, 10_000])
def test_bad_top_k_is_invalid_argument(endpoint, top_k) -> None:
    with pytest.raises(InvalidRequestError, match="TOP_K must be between 1 and 100"):
        endpoint.search("drill", top_k=top_k)
    assert len(endpoint.search("drill", top_k=2)) == 2


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [
        ([("QUERY", np.array([b"drill"], dtype=object), "BYTES")], "missing required input"),
        (
            [
                ("QUERY", np.array([b"drill"], dtype=object), "BYTES"),
                ("TOP_K", np.array([5.0], np.float32), "FP32"),
            ],
            "expects 'INT32'",
        ),
        (
            [
                ("QUERY", np.array([b"a", b"b"], dtype=object), "BYTES"),
                ("TOP_K", np.array([5], np.int32), "INT32"),
            ],
            "unexpected shape|batch size does not match",
        ),
        (
            [
                ("QUERY", np.array([b"drill"], dtype=object), "BYTES"),
                ("TOP_K", np.array([[5]], np.int32), "INT32"),
            ],
            "unexpected shape",
        ),
    ],
)
def test_malformed_requests_are_invalid_argument(server, endpoint, inputs, problem) -> None:
    error = raw_infer(server.grpc_url, endpoint.model_name, [tensor(*spec) for spec in inputs])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert re.search(problem, error.message())
    assert len(endpoint.search("drill", top_k=1)) == 1


def test_async_client_and_batched_search(server) -> None:
    async def run() -> list:
        async with AsyncSearchClient(server.grpc_url, timeout=30) as async_client:
            assert await async_client.ready()
            return await async_client.search_many(["hammer", "garden hose", "ceiling fan"], top_k=3)

    results = asyncio.run(run())
    assert [len(r) for r in results] == [3, 3, 3]
    assert any("hose" in h.title.lower() for h in results[1])


def test_search_cli_prints_a_table(server, capsys) -> None:
    assert search_cli(["cordless drill", "-k", "5", "--url", server.grpc_url]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 6 and "drill" in "\n".join(lines).lower()
    assert search_cli(["", "--url", server.grpc_url]) == 2


def test_response_cache_counts_hits_on_the_anonymous_ensemble(server) -> None:
    """search_steps (anonymous only) caches; search does not (its answers follow live events)."""
    import urllib.request

    def stats(model: str) -> dict:
        url = f"http://{server.http_url}/v2/models/{model}/stats"
        with urllib.request.urlopen(url) as response:
            return json.loads(response.read())["model_stats"][0]["inference_stats"]

    with SearchClient(server.grpc_url, model_name=store.ENSEMBLE, timeout=30) as steps:
        steps.search("unique cache probe query", top_k=4)
        before = stats(store.ENSEMBLE)["cache_hit"]["count"]
        steps.search("unique cache probe query", top_k=4)
    assert stats(store.ENSEMBLE)["cache_hit"]["count"] == before + 1
    assert stats(store.SEARCH)["cache_hit"]["count"] == 0


def test_serve_command_starts_and_stops_cleanly(built_repository, tmp_path) -> None:
    ports = dict(zip(("grpc", "http", "metrics"), free_ports(3), strict=True))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shopserve",
            "serve",
            "--model-repository",
            str(built_repository),
            "--grpc-port",
            str(ports["grpc"]),
            "--http-port",
            str(ports["http"]),
            "--metrics-port",
            str(ports["metrics"]),
            "--log-file",
            str(tmp_path / "triton.log"),
        ],
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 180
        line = ""
        while "ready" not in line and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line or process.poll() is None, "serve exited before it was ready"
        assert f"127.0.0.1:{ports['grpc']}" in line
        with SearchClient(f"127.0.0.1:{ports['grpc']}", timeout=30) as serve_client:
            assert serve_client.ready()
            assert len(serve_client.search("drill", top_k=3)) == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_client_errors_against_the_real_server(server, client) -> None:
    from shopserve.client import RequestTimeoutError, ServerUnavailableError

    with pytest.raises(RequestTimeoutError):
        client.search("cordless drill with two batteries and charger", top_k=10, timeout=1e-5)
    with pytest.raises(InvalidRequestError, match="empty"):
        client.search_many(["drill", "", "saw"], top_k=3)
    assert client.search_many([], top_k=3) == []
    with SearchClient(server.grpc_url, model_name="no_such_model") as missing:
        assert not missing.ready()
        with pytest.raises(ServerUnavailableError):
            missing.search("drill")
