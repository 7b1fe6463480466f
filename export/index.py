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


EF_SEARCH_CHOICES = (64, 96, 128, 192, 256, 384, 512)


class IndexQualityError(RuntimeError):
    """The ANN index misses too many of the exact nearest neighbours."""


@dataclass(frozen=True)
class AnnReport:
    queries: int
    depth: int
    recall: float
    ef_search: int
    m: int
    recall_by_ef_search: dict[int, float]

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
    index: DenseIndex,
    embeddings: np.ndarray,
    queries: np.ndarray,
    depth: int = RECALL_DEPTH,
    ef_choices: tuple[int, ...] = (),
) -> AnnReport:
    """recall@depth of the ANN index against exact search, on real query embeddings, at the
    index's efSearch and at each of ``ef_choices`` up to it; the report's ``ef_search`` is the
    smallest that keeps recall@depth >= MIN_ANN_RECALL (each step of efSearch costs search time)."""
    if len(queries) < MIN_RECALL_QUERIES:
        raise IndexQualityError(
            f"ANN recall needs at least {MIN_RECALL_QUERIES} queries, got {len(queries)}"
        )
    exact = exact_top(embeddings, queries, depth)

    def recall_at(ef: int) -> float:
        approx, _ = index.search(queries, depth, ef_search=ef)
        hits = sum(len(np.intersect1d(a, e)) for a, e in zip(approx, exact, strict=True))
        return hits / exact.size

    efs = sorted({ef for ef in ef_choices if ef < index.ef_search} | {index.ef_search})
    recalls = {ef: recall_at(ef) for ef in efs}
    for ef, recall in recalls.items():
        log.info(
            "ANN recall@%d vs exact on %d queries, efSearch %d: %.4f",
            depth,
            len(queries),
            ef,
            recall,
        )
    if recalls[index.ef_search] < MIN_ANN_RECALL:
        raise IndexQualityError(
            f"ANN recall@{depth} is {recalls[index.ef_search]:.4f} (< {MIN_ANN_RECALL}) at efSearch "
            f"{index.ef_search}; build with a larger --ef-search"
        )
    chosen = min(ef for ef, recall in recalls.items() if recall >= MIN_ANN_RECALL)
    return AnnReport(
        len(queries),
        depth,
        recalls[chosen],
        chosen,
        index.index.hnsw.nb_neighbors(1),
        recalls,
    )


def build_dense_index(embeddings: np.ndarray, ef_search: int) -> DenseIndex:
    with tqdm(total=1, desc="HNSW index", unit="index") as bar:
        index = DenseIndex.build(embeddings, ef_search=ef_search)
        bar.update()
    return index
