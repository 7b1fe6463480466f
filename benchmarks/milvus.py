"""``python -m benchmarks milvus``: dense retrieval on Milvus against the store's FAISS index.

A hard-linked copy of the store is loaded into Milvus (``--uri``, or a Milvus Lite server this
benchmark starts) by ``python -m shopserve.export milvus``; then, on QUERIES real queries of the
store's traffic, in one process and one run: recall@100 of each backend against exact search,
their overlap, and the latency of the dense search alone and of the whole in-process search.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from shopserve.ensemble import SearchPipeline, store
from shopserve.export.index import exact_top
from shopserve.export.milvus import (
    linked_store_copy,
    load_into_milvus,
    milvus_lite_server,
    recall,
)

from shopserve.server import free_ports

from . import machine
from .common import WORK_DIR, cpu_lock, provenance, write_results
from .queries import load_traffic

QUERIES = 500
DEPTH = 100


def percentiles_ms(call: Callable[[int], object], count: int) -> dict[str, float]:
    """p50 and p99 of ``call(i)`` for i in 0..count-1, in ms, after 10 warm-up calls."""
    for i in range(min(10, count)):
        call(i)
    took = []
    for i in range(count):
        started = time.perf_counter()
        call(i)
        took.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": float(np.percentile(took, 50)), "p99_ms": float(np.percentile(took, 99))}


def measure_backend(
    pipeline: SearchPipeline, queries: list[str], embeddings: np.ndarray, exact: np.ndarray
) -> tuple[dict, np.ndarray]:
    """One backend's recall@100 and latencies, and its top-100 rows per query."""
    dense = pipeline.retriever.dense
    found = np.vstack([dense.search(e[None, :], DEPTH)[0] for e in embeddings])
    numbers = {
        "recall_at_100": recall(found, exact),
        "dense_search": percentiles_ms(
            lambda i: dense.search(embeddings[i : i + 1], DEPTH), len(queries)
        ),
        "whole_search": percentiles_ms(lambda i: pipeline.search(queries[i], 10), len(queries)),
    }
    return numbers, found


def compare(repository: Path, copy: Path, uri: str) -> dict:
    manifest = json.loads((repository / store.MANIFEST_FILE).read_text())
    queries = load_traffic(manifest, QUERIES).queries
    loaded = load_into_milvus(copy, uri, replace=True)
    pipelines = {"faiss": SearchPipeline.from_repository(repository)}
    pipelines["milvus"] = SearchPipeline.from_repository(copy)
    reference = pipelines["faiss"]
    embeddings = reference.encoder(*reference.tokenizer.batch(queries))
    exact = exact_top(reference.retriever.dense.stored, embeddings, DEPTH)
    backends, found = {}, {}
    for name, pipeline in pipelines.items():
        backends[name], found[name] = measure_backend(pipeline, queries, embeddings, exact)
    same_top10 = np.mean(
        [
            np.array_equal(
                pipelines["milvus"].search(q, 10).product_ids, reference.search(q, 10).product_ids
            )
            for q in queries
        ]
    )
    return {
        "repository": str(repository),
        "products": loaded.items,
        "queries": len(queries),
        "milvus_uri": uri if not uri.startswith("http://127.0.0.1") else "Milvus Lite (local)",
        "milvus_load_s": loaded.load_s,
        "ef_search": {
            "faiss": reference.retriever.dense.ef_search,
            "milvus": loaded.check.ef_search,
        },
        "overlap_at_100": recall(found["milvus"], found["faiss"]),
        "same_top10_share": float(same_top10),
        "backends": backends,
    }


def run(repository: Path, out: Path, uri: str | None = None) -> Path:
    work = WORK_DIR / "milvus"
    shutil.rmtree(work, ignore_errors=True)
    copy = linked_store_copy(repository, work / "store")
    with cpu_lock("benchmarks milvus"):
        if uri is None:
            with milvus_lite_server(work / "milvus-lite", *free_ports(1)) as lite:
                result = compare(repository, copy, lite)
        else:
            result = compare(repository, copy, uri)
    result["machine"] = machine.describe()
    return write_results(out, "milvus", result, markdown(result))


def markdown(result: dict) -> str:
    lines = [
        "# Dense retrieval: Milvus against FAISS on the same store",
        "",
        provenance(result["machine"], "milvus") + " "
        f"{result['products']:,} products, {result['queries']} real queries, one process, "
        f"Milvus: {result['milvus_uri']}, loaded in {result['milvus_load_s']:.0f} s. efSearch: "
        f"FAISS {result['ef_search']['faiss']} (the build's choice), Milvus "
        f"{result['ef_search']['milvus']} (the load's: the smallest matching FAISS's recall).",
        "",
        "| backend | recall@100 vs exact | dense search p50 / p99 (ms) | whole search p50 / p99 (ms) |",
        "|---|---|---|---|",
    ]
    for name, numbers in result["backends"].items():
        dense, whole = numbers["dense_search"], numbers["whole_search"]
        lines.append(
            f"| {name} | {numbers['recall_at_100']:.4f} | {dense['p50_ms']:.1f} / "
            f"{dense['p99_ms']:.1f} | {whole['p50_ms']:.1f} / {whole['p99_ms']:.1f} |"
        )
    lines += [
        "",
        f"Milvus returns {result['overlap_at_100']:.1%} of FAISS's top-100; the top-10 of the "
        f"whole search is the same for {result['same_top10_share']:.1%} of the queries.",
    ]
    return "\n".join(lines) + "\n"
