"""``python -m benchmarks filters``: the cost and recall of filtered search, in-process.

The Home Depot catalogue has no price, stock or category columns, so this gives it synthetic ones
(they measure cost, not quality): a price of 1 to 500 and in stock for 2 products in 3, both drawn
from a hash of the product id, and a category: the first word of the title (its brand, mostly).
Each real query of the log runs unfiltered and with each filter, interleaved, on the in-process
pipeline (the same step logic the ``search`` model runs; the server's own hop, the same for every
request, is left out, so the ratios here are the unfavourable ones). recall@100 compares the
dense side with exact filtered search.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
from shopserve.ensemble import SearchPipeline, store
from shopserve.ensemble.filters import Attributes, parse_filter

from . import machine
from .common import cpu_lock
from .queries import load_traffic

FILTERS = {
    "in stock": {"IN_STOCK": np.array([True])},
    "in stock, 20 to 100": {
        "IN_STOCK": np.array([True]),
        "PRICE_MIN": np.float32([20.0]),
        "PRICE_MAX": np.float32([100.0]),
    },
    "under 10": {"PRICE_MAX": np.float32([10.0])},
}


def synthetic_attributes(product_ids: np.ndarray, titles: list[str]) -> Attributes:
    draws = np.array(
        [
            int.from_bytes(hashlib.sha256(str(p).encode()).digest()[:4], "little")
            for p in product_ids.tolist()
        ]
    )
    return Attributes.from_columns(
        {
            "price": [f"{1 + (d % 49900) / 100:.2f}" for d in draws],
            "in_stock": ["0" if (d >> 20) % 3 == 0 else "1" for d in draws],
            "category": [t.split()[0] if t.split() else "" for t in titles],
        }
    )


def _dense_recall(pipeline: SearchPipeline, queries: list[str], allowed: np.ndarray) -> float:
    dense = pipeline.retriever.dense
    embeddings = pipeline.encoder(*pipeline.tokenizer.batch(queries))
    rows = np.flatnonzero(allowed)
    recalls = []
    for embedding in embeddings:
        exact = rows[np.argsort(-(dense.stored[rows] @ embedding))[:100]]
        recalls.append(len(set(dense.search_within(embedding, 100, allowed)) & set(exact)) / 100)
    return float(np.mean(recalls))


def run(repository: Path, count: int, out: Path) -> Path:
    manifest = json.loads((repository / store.MANIFEST_FILE).read_text())
    queries = load_traffic(manifest, count).queries
    pipeline = SearchPipeline.from_repository(repository)
    catalogue = pipeline.postprocessor.catalogue
    pipeline.built_attributes = synthetic_attributes(catalogue.product_ids, catalogue.titles)
    cases = {"unfiltered": None, **FILTERS}
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    with cpu_lock("benchmarks filters"):
        for query in queries[:20]:  # warm-up
            pipeline.search(query, 10)
        for query in queries:
            for name, inputs in cases.items():
                started = time.perf_counter()
                pipeline.search(query, 10, None, inputs)
                seconds[name].append(time.perf_counter() - started)
    base = np.median(seconds["unfiltered"])
    lines = [
        "# Filtered search",
        "",
        f"Commit {machine.describe()['git_commit']}, {machine.describe()['date_utc']}. "
        f"In-process, {len(queries)} real queries, each case interleaved per query; synthetic "
        "attributes (benchmarks/filters.py). Written by `python -m benchmarks filters`.",
        "",
        "| filter | share of the catalogue | p50 ms | p99 ms | p50 / unfiltered | dense recall@100 |",
        "|---|---|---|---|---|---|",
    ]
    for name, inputs in cases.items():
        times = np.array(seconds[name]) * 1000
        allowed = None if inputs is None else pipeline.attributes.allowed(parse_filter(inputs))
        share = 1.0 if allowed is None else allowed.mean()
        recall = (
            "–" if allowed is None else f"{_dense_recall(pipeline, queries[:200], allowed):.3f}"
        )
        lines.append(
            f"| {name} | {share:.1%} | {np.median(times):.2f} | {np.percentile(times, 99):.2f} | "
            f"{np.median(times) / (base * 1000):.2f} | {recall} |"
        )
    path = out / "filters.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
