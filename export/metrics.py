"""Ranking metrics. Gains are graded (``relevance - min_relevance``); unjudged products gain 0."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np


def dcg(gains: Sequence[float]) -> float:
    gains = np.asarray(gains, dtype=np.float64)
    return float((gains / np.log2(np.arange(2, len(gains) + 2))).sum())


def ndcg_at_k(ranked_ids: Sequence[int], gains: Mapping[int, float], k: int = 10) -> float:
    """nDCG@k of a ranking against graded gains (linear gain, log2 discount)."""
    ideal = dcg(sorted(gains.values(), reverse=True)[:k])
    if ideal <= 0:
        return 0.0
    return dcg([gains.get(pid, 0.0) for pid in list(ranked_ids)[:k]]) / ideal


def binary_ndcg_at_k(ranked_ids: Sequence[int], relevant: Collection[int], k: int) -> float:
    """nDCG@k where every relevant product gains 1 (a held-out basket's items)."""
    return ndcg_at_k(ranked_ids, dict.fromkeys(relevant, 1.0), k)


def recall_at_k(ranked_ids: Sequence[int], relevant: set[int], k: int) -> float:
    if not relevant:
        return 0.0
    return len(relevant.intersection(list(ranked_ids)[:k])) / len(relevant)


def rank_by_score(product_ids: Sequence[int], scores: np.ndarray) -> list[int]:
    """Product ids by descending score, ties broken by ascending product id."""
    ids = np.asarray(product_ids, dtype=np.int64)
    return ids[np.lexsort((ids, -np.asarray(scores)))].tolist()
