"""Catalogue indexes: dense HNSW (with its recall checked against exact search) and lexical BM25."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
from shopserve.ensemble.dense import DenseIndex
from tqdm.auto import tqdm

log = logging.getLogger("shopserve.export.index")

MIN_ANN_RECALL = 0.98
MIN_RECALL_QUERIES = 500
RECALL_DEPTH = 100


class IndexQualityError(RuntimeError):
    """The ANN index misses too many of the exact nearest neighbours."""


@dataclass(frozen=True)
class AnnReport:
    queries: int
    depth: int
    recall: float
    ef_search: int
    m: int

    def as_dict(self) -> dict:
        return asdict(self)


def exact_top(embeddings: np.ndarray, queries: np.ndarray, depth: int) -> np.ndarray:
    """Exact inner-product top-``depth`` rows for each query, best first."""
    out = np.empty((len(queries), depth), dtype=np.int64)
    for start in range(0, len(queries), 256):
        scores = queries[start : start + 256] @ embeddings.T
        top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        out[start : start + 256] = np.take_along_axis(top, order, axis=1)
    return out


def ann_recall(
    index: DenseIndex, embeddings: np.ndarray, queries: np.ndarray, depth: int = RECALL_DEPTH
) -> AnnReport:
    """recall@depth of the ANN index against exact search, on real query embeddings."""
    if len(queries) < MIN_RECALL_QUERIES:
        raise IndexQualityError(
            f"ANN recall needs at least {MIN_RECALL_QUERIES} queries, got {len(queries)}"
        )
    exact = exact_top(embeddings, queries, depth)
    approx, _ = index.search(queries, depth)
    hits = sum(len(np.intersect1d(a, e)) for a, e in zip(approx, exact, strict=True))
    recall = hits / exact.size
    report = AnnReport(
        len(queries), depth, recall, index.ef_search, index.index.hnsw.nb_neighbors(1)
    )
    log.info("ANN recall@%d vs exact on %d queries: %.4f", depth, len(queries), recall)
    if recall < MIN_ANN_RECALL:
        raise IndexQualityError(
            f"ANN recall@{depth} is {recall:.4f} (< {MIN_ANN_RECALL}); raise ef_search "
            f"(now {index.ef_search}) in model_repository/retrieve/config.pbtxt"
        )
    return report


def build_dense_index(embeddings: np.ndarray, ef_search: int) -> DenseIndex:
    with tqdm(total=1, desc="HNSW index", unit="index") as bar:
        index = DenseIndex.build(embeddings, ef_search=ef_search)
        bar.update()
    return index
