"""End-to-end tests against the real tritonserver serving a fully built repository, over gRPC."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    PROJECT,
    assert_hits_match,
    assert_same_ranking,
    ensure_installed,
    raw_infer,
    tensor,
)
from shopserve.client import AsyncSearchClient, Exposure, InvalidRequestError, SearchClient
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


@pytest.fixture(scope="module")
def dev_answers(pipeline, dev_queries) -> dict:
    """The in-process pipeline's top 10 for 200 dev queries, each embedded alone."""
    return {query: pipeline.search(query, 10) for query in dev_queries[:200]}


def test_served_ids_equal_the_in_process_pipeline(endpoint, dev_answers) -> None:
    """One request at a time, each endpoint answers every query as the in-process pipeline does."""
    served = endpoint.search_many(list(dev_answers), top_k=10, max_in_flight=1)
    for (query, reference), hits in zip(dev_answers.items(), served, strict=True):
        assert_hits_match(hits, reference, query)
        titles = dict(zip(reference.product_ids.tolist(), reference.titles, strict=True))
        assert all(titles.get(h.product_id, h.title) == h.title for h in hits)


# A query embedded in one call with others differs from the same query alone by float rounding
# (2e-8 measured), and approximate nearest-neighbour search can turn that into another dense
# candidate, which shifts every candidate's normalised features: on one store, 1 of 2,000 dev
# queries embedded in groups of 4 moved its scores by 1.1e-4 (and none on another store).
BATCHED_SCORE_BOUND = 1e-3
BATCHED_DIFFERING_SHARE = 0.01


def test_batched_answers_stay_within_float_rounding_of_the_pipeline(endpoint, dev_answers) -> None:
    """Up to 4 in flight, an endpoint may embed a query in one call with others: almost every
    answer still equals the pipeline's, and none moves by more than the bound."""
    served = endpoint.search_many(list(dev_answers), top_k=10, max_in_flight=4)
    differing = []
    for (query, reference), hits in zip(dev_answers.items(), served, strict=True):
        try:
            assert_hits_match(hits, reference, query)
        except AssertionError:
            differing.append(query)
            common = set(reference.product_ids.tolist()) & {h.product_id for h in hits}
            assert len(common) >= 8, query
            scores = dict(zip(reference.product_ids.tolist(), reference.scores, strict=True))
            moved = max(abs(h.score - scores[h.product_id]) for h in hits if h.product_id in common)
            assert moved <= BATCHED_SCORE_BOUND, (query, moved)
    assert len(differing) <= BATCHED_DIFFERING_SHARE * len(dev_answers), differing


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
    ("🔨 ★ ™".encode(), "no letter or digit"),  # every token unknown: it matched arbitrary titles
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


def test_an_exposure_aware_answer_is_drawn_reproducibly_and_checked(server, client, pipeline):
    """EXPOSURE, TEMPERATURE and SEED through the real server, sync and async: a seed replays the
    in-process draw; the draw differs from the ranker's order; bad values are INVALID_ARGUMENT."""
    query = "cordless drill"
    drawn = Exposure(temperature=1.0, seed=11)

    def ids(hits) -> list[int]:
        return [hit.product_id for hit in hits]

    hits = ids(client.search(query, top_k=10, exposure=drawn))
    assert hits == ids(client.search(query, top_k=10, exposure=drawn))
    expected = pipeline.search(
        query, 10, exposure={"EXPOSURE": "plackett-luce", "TEMPERATURE": 1.0, "SEED": 11}
    )
    assert hits == expected.product_ids.tolist()

    async def async_search():
        async with AsyncSearchClient(server.grpc_url, timeout=30) as aclient:
            return await aclient.search(query, top_k=10, exposure=drawn)

    assert ids(asyncio.run(async_search())) == hits
    ranked = ids(client.search(query, top_k=10))
    draws = {tuple(ids(client.search(query, 10, exposure=Exposure(seed=s)))) for s in range(8)}
    assert len(draws) > 1 and any(list(d) != ranked for d in draws)
    for bad, problem in (
        (Exposure(mode="shuffle"), "EXPOSURE must be one of"),
        (Exposure(temperature=0.0), "TEMPERATURE must be between"),
        (Exposure(seed=-2), "SEED must be"),
    ):
        with pytest.raises(InvalidRequestError, match=problem):
            client.search(query, top_k=10, exposure=bad)


def assert_same_explanations(hits, expected) -> None:
    """Served explanations equal the in-process ones, and each adds up to its logit."""
    assert len(hits) == len(expected.explanations)
    for hit, explanation in zip(hits, expected.explanations, strict=True):
        served = hit.explanation
        assert [(r.signal, r.text) for r in served.reasons] == [
            (r.signal, r.text) for r in explanation.reasons
        ]
        np.testing.assert_allclose(
            [r.contribution for r in served.reasons],
            [r.contribution for r in explanation.reasons],
            atol=1e-4,
        )
        total = served.reference + sum(r.contribution for r in served.reasons)
        assert abs(total - served.logit) < 1e-4


def test_explanations_come_only_when_asked_and_match_the_pipeline(server, client, pipeline):
    """EXPLAIN through the real server, sync and async: each hit's reasons are the in-process
    ones and add up to its logit; the answer itself is unchanged; without EXPLAIN there are none;
    a malformed EXPLAIN is INVALID_ARGUMENT."""
    query = "cordless drill"
    explained = client.search(query, top_k=5, explain=True)
    plain = client.search(query, top_k=5)
    assert [h.product_id for h in explained] == [h.product_id for h in plain]
    assert [h.score for h in explained] == [h.score for h in plain]
    assert all(h.explanation is None for h in plain)
    assert_same_explanations(explained, pipeline.search(query, 5, explain=True))

    async def async_search():
        async with AsyncSearchClient(server.grpc_url, timeout=30) as aclient:
            return await aclient.search(query, top_k=5, explain=True)

    assert [h.explanation for h in asyncio.run(async_search())] == [
        h.explanation for h in explained
    ]
    error = raw_infer(
        server.grpc_url,
        "search",
        [
            tensor("QUERY", np.array([[b"drill"]], dtype=object), "BYTES"),
            tensor("TOP_K", np.array([[3]], np.int32), "INT32"),
            tensor("EXPLAIN", np.array([[1]], np.int32), "INT32"),
        ],
    )
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "EXPLAIN" in error.message()


def test_search_cli_prints_a_table(server, capsys) -> None:
    assert search_cli(["cordless drill", "-k", "5", "--url", server.grpc_url]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 6 and "drill" in "\n".join(lines).lower()
    assert search_cli(["", "--url", server.grpc_url]) == 2
    assert search_cli(["cordless drill", "-k", "2", "--explain", "--url", server.grpc_url]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    reasons = [line.split()[1] for line in lines if re.match(r"\s+[+-]\d+\.\d\d ", line)]
    assert len(lines) == 3 + 2 * 3 and len(reasons) == 6
    assert set(reasons) <= {"meaning:", "bm25:", "words:", "spelling:"}


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


def test_search_instances_share_one_copy_of_the_served_files(server, client) -> None:
    """The large artefacts are memory-mapped: the page cache holds one copy, and each search
    instance's own (anonymous) memory is smaller than the files it serves from. The encoder's
    pre-packed weights are mapped from the server's copy, and no instance loads SciPy."""
    from shopserve.ensemble.models import prepacked_model

    from shopserve.memory import file_mappings, server_memory

    repository = Path(server.config.model_repository).resolve()
    dense = store.version_dir(repository, store.RETRIEVE) / store.DENSE_INDEX_FILE
    encoder = prepacked_model(
        store.in_process_model_file(repository, store.ENCODER),
        Path(server.config.work_dir).resolve() / "prepacked",
    )
    served = [
        dense,
        store.weights_file(encoder),
        *(store.version_dir(repository, store.RETRIEVE) / store.LEXICAL_INDEX_DIR).glob("*.npy"),
        *store.version_dir(repository, store.POSTPROCESS).glob("*.npy"),
        *store.version_dir(repository, store.TOKENIZE).glob("*.npy"),
    ]
    # the index, the weights, 13 lexical arrays (BM25, two vocabularies, two term sets), 5
    # catalogue arrays (ids, titles, the id index) and the tokenizer's vocabulary
    assert len(served) == 23, served
    assert len(client.search("cordless drill", top_k=5)) == 5
    instances = [p for p in server_memory(server.process.pid) if p.model == store.SEARCH]
    assert len(instances) == 2  # the config's count
    vectors_kib = store.load_catalogue(repository).product_ids.size * 384 * 4 // 1024
    for instance in instances:
        mapped = file_mappings(instance.pid)
        for path in served:
            assert path in mapped, f"{instance.name} does not map {path.name}"
            # read-only mappings: never a private copy of a page
            assert mapped[path]["Private_Dirty"] == mapped[path]["Anonymous"] == 0
        # every vector was read at load (the index's moments), by both instances: shared pages
        assert mapped[dense]["Rss"] >= vectors_kib
        assert mapped[dense]["Shared_Clean"] >= vectors_kib
        served_kib = sum(path.stat().st_size for path in served) // 1024
        assert instance.kib["Anonymous"] < served_kib, (instance.kib, served_kib)
        assert not [path for path in mapped if "scipy" in path.parts], instance.name


def test_the_documented_nginx_proxy_serves_and_skips_a_dead_replica(server, tmp_path) -> None:
    """deploy/nginx/grpc-proxy.conf, its replicas pointed at a port where nothing listens and at
    the real server: every request through nginx is answered."""
    nginx = ensure_installed("nginx", "nginx")
    dead, listen = free_ports(2)
    config = (PROJECT / "deploy" / "nginx" / "grpc-proxy.conf").read_text(encoding="utf-8")
    for documented, ours in (
        ("127.0.0.1:8001", f"127.0.0.1:{dead}"),
        ("127.0.0.1:8011", server.grpc_url),
        ("127.0.0.1:8101", f"127.0.0.1:{listen}"),
    ):
        assert config.count(documented) == 1, documented
        config = config.replace(documented, ours)
    (tmp_path / "grpc-proxy.conf").write_text(config, encoding="utf-8")
    proxy = subprocess.Popen(
        [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "grpc-proxy.conf"), "-g", "daemon off;"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with (
            SearchClient(f"127.0.0.1:{listen}", timeout=30) as proxied,
            SearchClient(server.grpc_url, timeout=30) as direct,
        ):
            deadline = time.monotonic() + 30
            while not proxied.ready():
                assert proxy.poll() is None, proxy.stderr.read()
                assert time.monotonic() < deadline, "nginx did not come up"
                time.sleep(0.2)
            for query in ("cordless drill", "garden hose", "led light bulb", "paint brush"):
                expected = [hit.product_id for hit in direct.search(query)]
                assert [hit.product_id for hit in proxied.search(query)] == expected
    finally:
        proxy.terminate()
        proxy.wait(30)


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


def _serve_until_it_exits(
    repository: Path, log: Path, ports: list[int], *options: str | Path
) -> subprocess.CompletedProcess:
    """``shopserve serve`` that is expected to stop before it is ready."""
    grpc_port, http_port, metrics_port = ports
    return subprocess.run(
        [
            *(sys.executable, "-m", "shopserve", "serve", "--model-repository", repository),
            *("--log-file", log, "--grpc-port", str(grpc_port), "--http-port", str(http_port)),
            *("--metrics-port", str(metrics_port), *options),
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_serve_says_which_port_it_could_not_take(built_repository, tmp_path) -> None:
    """A port another process listens on is refused before Triton starts: until Triton gave up,
    that process would answer the readiness probes, and serve would say it was ready."""
    ports = free_ports(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[2]))
        taken.listen()
        result = _serve_until_it_exits(built_repository, tmp_path / "log", ports)
    assert result.returncode == 1, result.stderr
    assert f"another process listens on metrics {ports[2]}: stop it" in result.stderr
    assert "ready" not in result.stdout and "Traceback" not in result.stderr
    assert not (tmp_path / "log").exists()  # tritonserver never ran


def test_a_second_launch_in_the_work_folder_leaves_the_running_server_alone(
    server, client, built_repository, tmp_path
) -> None:
    """Until the fix, a second serve on a running server's work folder (even one then refused)
    copied the Python backend's library over the one that server had loaded, and it crashed
    (SIGSEGV) at its next request."""
    work = server.config.work_dir
    library = work / "backends" / "python" / "libtriton_python.so"
    before = library.stat().st_ino
    same_ports = [server.config.grpc_port, server.config.http_port, server.config.metrics_port]
    refused = _serve_until_it_exits(
        built_repository, tmp_path / "refused.log", same_ports, "--work-dir", work
    )
    assert refused.returncode == 1
    assert f"another process listens on gRPC {same_ports[0]}, HTTP {same_ports[1]}" in (
        refused.stderr
    )
    grpc_port, http_port, metrics_port = free_ports(3)
    second = subprocess.Popen(
        [
            *(sys.executable, "-m", "shopserve", "serve", "--model-repository"),
            *(str(built_repository), "--work-dir", str(work), "--grpc-port", str(grpc_port)),
            *("--http-port", str(http_port), "--metrics-port", str(metrics_port)),
            *("--log-file", str(tmp_path / "second.log")),
        ],
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = ""
        while "ready" not in line:
            line = second.stdout.readline()
            assert line or second.poll() is None, "the second server exited before it was ready"
        with SearchClient(f"127.0.0.1:{grpc_port}", timeout=30) as second_client:
            answer = [hit.product_id for hit in second_client.search("drill", top_k=3)]
            assert answer == [hit.product_id for hit in client.search("drill", top_k=3)]
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
    finally:
        if second.poll() is None:
            second.kill()
    assert library.stat().st_ino == before  # the loaded copy was never replaced
    assert len(client.search("drill", top_k=3)) == 3 and server.process.poll() is None


def test_serve_names_the_model_that_did_not_load(built_repository, tmp_path) -> None:
    """A model that fails to load stops Triton: the launcher names it and its reason, not the
    errors Triton writes on every start without a GPU (logged after it, in parallel loading)."""
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "catalogue").write_text("a file where the catalogue log's folder goes")
    (tmp_path / "log").write_text('E1204 09:00:00.0 1 main.cc:1] "an earlier run\'s error"\n')
    result = _serve_until_it_exits(
        built_repository, tmp_path / "log", free_ports(3), "--work-dir", tmp_path / "work"
    )
    assert result.returncode == 1, result.stderr
    reason = (
        "failed to load 'catalogue' version 1: Internal: FileExistsError: [Errno 17] File exists"
    )
    assert f"exited with code 1 before it was ready: {reason}" in result.stderr
    assert "CUDA" not in result.stderr and "Traceback" not in result.stderr
    assert "earlier run" not in result.stderr  # the log is appended to: this run's lines only
    assert "CUDA driver version is insufficient" in (tmp_path / "log").read_text()  # skipped


def test_client_errors_against_the_real_server(server, client) -> None:
    """(A call past its deadline is test_client_unit's: a 10 µs deadline on this shared server
    once crashed it, Triton 2.51's gRPC cancellation race, docs/serving.md#deadlines.)"""
    from shopserve.client import ServerUnavailableError

    with pytest.raises(InvalidRequestError, match="empty"):
        client.search_many(["drill", "", "saw"], top_k=3)
    assert client.search_many([], top_k=3) == []
    with SearchClient(server.grpc_url, model_name="no_such_model") as missing:
        assert not missing.ready()
        with pytest.raises(ServerUnavailableError):
            missing.search("drill")


def _counts(url: str, model: str) -> tuple[int, int]:
    """(inferences, executions) of ``model`` so far: fewer executions means shared calls."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as triton:
        (stats,) = triton.get_inference_statistics(model, as_json=True)["model_stats"]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


# Where each endpoint's queries share encoder calls: the encoder model of the ensemble, or the
# one-model endpoint's own executions.
BATCHED_MODEL = {store.ENSEMBLE: store.ENCODER, store.SEARCH: store.SEARCH}
# How many requests each takes at once: "search" refuses a fifth waiting request (its overload
# bound), and an instance that has just answered may not yet have taken the next one off the
# queue, so no more than 4 are sent; the ensemble takes all 8.
IN_FLIGHT = {store.ENSEMBLE: 8, store.SEARCH: 4}


@pytest.mark.parametrize("model", [store.SEARCH, store.ENSEMBLE])
def test_a_query_answers_the_same_alone_and_inside_a_batch_of_8(server, dev_queries, model) -> None:
    """The static INT8 encoder is batch-invariant: concurrent queries of different lengths share
    encoder calls, and each answer equals the query's answer alone (ids exactly wherever scores
    are more than 1e-6 apart; scores within 1e-6)."""
    queries = dev_queries[300:308]
    assert len({len(q.split()) for q in queries}) > 1  # different lengths: padded batches
    counted = BATCHED_MODEL[model]
    with SearchClient(server.grpc_url, model_name=model, timeout=30) as client:
        alone = [client.search(query, top_k=10) for query in queries]
        shared = False
        # Each round asks for a different TOP_K, so the response cache cannot answer it.
        for round_ in range(10):
            inferences, executions = _counts(server.grpc_url, counted)
            together = client.search_many(
                queries, top_k=11 + round_, max_in_flight=IN_FLIGHT[model]
            )
            more_inferences, more_executions = _counts(server.grpc_url, counted)
            assert more_inferences - inferences == len(queries)
            for query, one, batched in zip(queries, alone, together, strict=True):
                assert_same_ranking(
                    [h.product_id for h in batched[:10]],
                    [h.score for h in batched[:10]],
                    [h.product_id for h in one],
                    [h.score for h in one],
                    query,
                )
            shared = shared or more_executions - executions < len(queries)
            if shared:
                break
    assert shared, f"{counted} never ran two of the 8 concurrent queries in one execution"
