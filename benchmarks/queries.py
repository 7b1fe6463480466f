"""The benchmark traffic: distinct queries of the real Home Depot query log, in log order."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shopserve.export.data import (
    DEFAULT_DATA_DIR,
    Judgments,
    load_catalogue,
    load_judgments,
    split_queries,
)

from .common import BenchmarkError

DEFAULT_QUERIES = 2000
TOP_K = 10


@dataclass(frozen=True)
class Traffic:
    """The benchmark queries (log order) and the judged dev split used for nDCG@10."""

    queries: list[str]
    judgments: Judgments
    dev_queries: list[str]


def load_traffic(
    manifest: dict, count: int = DEFAULT_QUERIES, data_dir: Path = DEFAULT_DATA_DIR
) -> Traffic:
    """The first ``count`` distinct queries of judgments.csv and the repository's dev split."""
    if not (data_dir / "judgments.csv").exists():
        raise BenchmarkError(f"the Home Depot data is not at {data_dir}; set DATA_DIR")
    judgments = load_judgments(
        data_dir / "judgments.csv", load_catalogue(data_dir / "products.csv")
    )
    if len(judgments) < count:
        raise BenchmarkError(f"the log has {len(judgments)} distinct queries, asked for {count}")
    split = manifest["split"]
    _, dev = split_queries(judgments.queries, split["dev_fraction"], split["seed"])
    return Traffic(judgments.queries[:count], judgments, dev)


def write_perf_analyzer_data(queries: list[str], path: Path, top_k: int = TOP_K) -> Path:
    """perf_analyzer ``--input-data`` JSON: one step per query, sent in this order."""
    steps = [{"QUERY": [query], "TOP_K": [top_k]} for query in queries]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": steps}, ensure_ascii=False))
    return path


def worker_order(count: int, concurrency: int, worker: int) -> Iterator[int]:
    """Query indices that closed-loop worker ``worker`` of ``concurrency`` sends, endlessly.

    perf_analyzer's concurrency mode starts its worker ``t`` at data step ``t`` and advances it by
    the number of workers after each request, modulo the number of steps; the load generator here
    does the same, so both send the same queries in the same order.
    """
    return (step % count for step in itertools.count(worker, concurrency))
