"""Offline evaluation on held-out queries: the served system against its baselines.

Full-catalogue metrics rank every product; unjudged products count as gain 0, so they are lower
bounds. Re-ranking metrics order only each query's judged products.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
from shopserve.ensemble.lexical import LexicalIndex
from shopserve.ensemble.models import OnnxRanker
from shopserve.ensemble.retrieve import Retriever
from tqdm.auto import tqdm

from .data import Judgments
from .metrics import ndcg_at_k, rank_by_score, recall_at_k
from .scoring import QueryScores

log = logging.getLogger("shopserve.export.evaluate")

RELEVANT_AT = 2.5  # raw relevance for Recall@100
SYSTEMS = ("bm25", "encoder", "zscore_fusion", "encoder_ranker")


@dataclass(frozen=True)
class SystemMetrics:
    ndcg10: float  # full catalogue
    recall100: float  # products with relevance >= RELEVANT_AT, full catalogue
    rerank_ndcg10: float  # over each query's judged products

    def as_dict(self) -> dict:
        return asdict(self)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.lexsort((top, -scores[top]))]


def evaluate(
    lexical: LexicalIndex,
    embeddings: np.ndarray,
    retriever: Retriever,
    ranker: OnnxRanker,
    product_ids: np.ndarray,
    judgments: Judgments,
    query_embeddings: np.ndarray,
    seed: int = 0,
) -> dict:
    """Mean metrics over ``judgments``' queries for every system in SYSTEMS."""
    row_of = {pid: row for row, pid in enumerate(product_ids.tolist())}
    sums = {name: np.zeros(3) for name in SYSTEMS}
    random_rerank = 0.0
    rng = np.random.default_rng(seed)
    queries = judgments.queries
    for query, q_emb in tqdm(
        list(zip(queries, query_embeddings, strict=True)), desc="evaluate", unit="q"
    ):
        gains = judgments.gains(query)
        relevant = {pid for pid, rel in judgments.by_query[query].items() if rel >= RELEVANT_AT}
        judged_ids = np.fromiter(gains, dtype=np.int64)
        judged_rows = np.array([row_of[p] for p in judged_ids], dtype=np.int64)
        scores = QueryScores.compute(lexical, embeddings, query, q_emb)
        candidates = retriever(query, q_emb)
        served_order = rank_by_score(product_ids[candidates.rows], ranker(candidates.features))
        full_scores = {
            "bm25": scores.bm25,
            "encoder": scores.cosine,
            "zscore_fusion": scores.fused(),
        }
        rerank_scores = {name: s[judged_rows] for name, s in full_scores.items()}
        rerank_scores["encoder_ranker"] = ranker(scores.features(lexical, judged_rows))
        for name in SYSTEMS:
            if name == "encoder_ranker":
                ranked = served_order
            else:
                ranked = product_ids[_top(full_scores[name], 100)].tolist()
            reranked = rank_by_score(judged_ids, rerank_scores[name])
            sums[name] += (
                ndcg_at_k(ranked, gains, 10),
                recall_at_k(ranked, relevant, 100),
                ndcg_at_k(reranked, gains, 10),
            )
        random_rerank += ndcg_at_k(rng.permutation(judged_ids).tolist(), gains, 10)
    n = len(queries)
    result = {
        "queries": n,
        "relevant_at": RELEVANT_AT,
        "random_rerank_ndcg10": random_rerank / n,
        "systems": {name: SystemMetrics(*(sums[name] / n)).as_dict() for name in SYSTEMS},
    }
    for name, metrics in result["systems"].items():
        log.info("%-15s %s", name, metrics)
    return result


def rerank_ndcg_by_cosine(
    judgments: Judgments,
    row_of: dict[int, int],
    title_embeddings: np.ndarray,
    query_embeddings: np.ndarray,
) -> float:
    """Mean re-ranking nDCG@10 when judged products are ordered by encoder cosine alone."""
    total = 0.0
    for query, q_emb in zip(judgments.queries, query_embeddings, strict=True):
        gains = judgments.gains(query)
        ids = np.fromiter(gains, dtype=np.int64)
        cosine = title_embeddings[[row_of[p] for p in ids]] @ q_emb
        total += ndcg_at_k(rank_by_score(ids, cosine), gains, 10)
    return total / len(judgments)
