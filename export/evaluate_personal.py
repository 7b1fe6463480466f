"""Evaluation of recommendations and personalised search on held-out baskets, with the baselines
computed in the same run and 95 % confidence intervals (normal approximation over cases).

* recommendations, over every shopper with history before their last basket: Recall@20 and nDCG@20 of
  global popularity, of the baselines (the shopper's own purchase frequency, TIFU-KNN) and of the
  served ranker, each ranking the recommend endpoint's candidates; the repeat / explore split:
  Recall@20 of the items the shopper bought before, and of the items new to them (shoppers whose last
  basket has one, previously bought items removed: each list is a NEW_ONLY answer; popularity's is
  the best sellers the shopper never bought);
* personalised search: for each (shopper, category of a held-out item), the category name is the
  query and the shopper's held-out items of that category are relevant; nDCG@10 and MRR@10 of the
  anonymous search, of the shopper's purchase frequency among the query's candidates, and of the
  personalised search; and nDCG@10 with the category's other products as partly relevant.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from shopserve.ensemble.personal import fuse
from shopserve.ensemble.recommend import Recommender
from shopserve.ensemble.retrieve import Retriever
from tqdm.auto import tqdm

from .history import BasketQuery, Case, bought_before, ranked, recall
from .metrics import binary_ndcg_at_k, dcg

RECOMMEND_K = 20
SEARCH_K = 10
Scorer = Callable[[np.ndarray], np.ndarray]


def interval(values: Sequence[float]) -> dict:
    """Mean and 95 % confidence interval (normal approximation)."""
    data = np.asarray(values, dtype=np.float64)
    if not len(data):
        return {"mean": None, "ci95": None, "n": 0}
    half = 1.96 * data.std(ddof=1) / np.sqrt(len(data)) if len(data) > 1 else 0.0
    return {
        "mean": round(float(data.mean()), 4),
        "ci95": [round(float(data.mean() - half), 4), round(float(data.mean() + half), 4)],
        "n": len(data),
    }


# nDCG with the query's category as partial relevance: a product of the queried category gains 1,
# the basket's items of it 2. It tells a search that ranks the category's products below ones
# the shopper buys elsewhere (history overriding the query) from one that keeps to the query.
CATEGORY_GAIN, BASKET_GAIN = 1.0, 2.0


def category_ndcg(top: Sequence[int], query: BasketQuery, k: int) -> float:
    def gain(pid: int) -> float:
        if pid in query.relevant:
            return BASKET_GAIN
        return CATEGORY_GAIN if pid in query.category else 0.0

    basket = min(len(query.relevant), k)
    ideal = [BASKET_GAIN] * basket + [CATEGORY_GAIN] * (min(len(query.category), k) - basket)
    return dcg([gain(pid) for pid in top[:k]]) / dcg(ideal)


def _mrr(top: Sequence[int], relevant: frozenset[int], k: int) -> float:
    return next((1.0 / rank for rank, pid in enumerate(top[:k], 1) if pid in relevant), 0.0)


def evaluate_recommendations(
    cases: Sequence[Case],
    recommender: Recommender,
    served: Scorer,
    served_new_only: Scorer,
    baselines: Mapping[str, Scorer],
) -> dict:
    """Popularity, each baseline and the served rankers (``served_new_only`` ranks NEW_ONLY
    answers), each ranking the endpoint's candidates."""
    popular = recommender.product_ids[recommender.items.popular(len(recommender.product_ids))]
    scorers = {**baselines, "recommend": served}
    metrics: dict[str, dict[str, list[float]]] = {
        name: {"recall20": [], "ndcg20": [], "repeat_recall20": [], "explore_recall20": []}
        for name in ("popularity", *scorers)
    }
    for case in tqdm(cases, desc="evaluate recommendations", unit="user"):
        bought = bought_before(case, recommender)
        repeat, new = case.label & bought, case.label - bought
        unseen = popular[~np.isin(popular, list(bought))][:RECOMMEND_K].tolist()
        lists = {"popularity": (popular[:RECOMMEND_K].tolist(), unseen)}
        for name, scorer in scorers.items():
            discover = served_new_only if name == "recommend" else scorer
            lists[name] = (
                ranked(case, recommender, scorer, RECOMMEND_K),
                ranked(case, recommender, discover, RECOMMEND_K, new_only=True) if new else [],
            )
        for name, (top, discovery) in lists.items():
            metrics[name]["recall20"].append(recall(top, case.label))
            metrics[name]["ndcg20"].append(binary_ndcg_at_k(top, case.label, RECOMMEND_K))
            if repeat:
                metrics[name]["repeat_recall20"].append(recall(top, repeat))
            if new:
                metrics[name]["explore_recall20"].append(recall(discovery, new))
    return {
        "users": len(cases),
        "k": RECOMMEND_K,
        "systems": {
            name: {metric: interval(values) for metric, values in by_metric.items()}
            for name, by_metric in metrics.items()
        },
    }


@dataclass(frozen=True)
class ScoredQuery:
    """A basket query's served candidates with everything the systems rank them by."""

    query: BasketQuery
    product_ids: np.ndarray
    search_logits: np.ndarray
    affinity: np.ndarray
    purchases: np.ndarray  # the shopper's purchases of each candidate
    categories: np.ndarray | None = None  # each candidate's category code (-1: none)


def score_queries(
    queries: Sequence[BasketQuery],
    embed: Callable[[str], np.ndarray],
    retriever: Retriever,
    search_ranker: Scorer,
    recommender: Recommender,
    rec_ranker: Scorer,
    desc: str,
) -> list[ScoredQuery]:
    out = []
    for item in tqdm(queries, desc=desc, unit="q"):
        candidates = retriever(item.query, embed(item.query))
        view = item.case.view
        history = dict(zip(view.rows.tolist(), view.purchases.tolist(), strict=True))
        out.append(
            ScoredQuery(
                item,
                recommender.product_ids[candidates.rows],
                search_ranker(candidates.features),
                rec_ranker(recommender.features(view, candidates.rows)),
                np.array([history.get(r, 0) for r in candidates.rows.tolist()], dtype=np.float64),
                recommender.items.categories[candidates.rows],
            )
        )
    return out


def _top(ids: np.ndarray, scores: np.ndarray) -> list[int]:
    return ids[np.lexsort((ids, -scores))][:SEARCH_K].tolist()


def personal_top(scored: ScoredQuery, weight: float) -> list[int]:
    """The personalised search's top 10, fused as serving fuses."""
    fused = fuse(scored.search_logits, scored.affinity, weight, scored.categories)
    return _top(scored.product_ids, fused.logits)


def fit_search_weight(scored: Sequence[ScoredQuery], grid: Sequence[float]) -> tuple[float, dict]:
    """The weight of the shopper's affinity, by nDCG@10 over ``scored`` (see smallest_near_best),
    and each weight's mean nDCG@10."""
    per_query = {
        w: np.array(
            [binary_ndcg_at_k(personal_top(s, w), s.query.relevant, SEARCH_K) for s in scored]
        )
        for w in grid
    }
    table = {str(w): round(float(values.mean()), 4) for w, values in per_query.items()}
    return smallest_near_best(per_query), table


def smallest_near_best(per_query: Mapping[float, np.ndarray]) -> float:
    """The smallest weight whose per-query metric is, paired with the best weight's, at most one
    standard error of the mean below it (the one-standard-error rule). Where the metric is flat
    across a range of weights, the shopper's history then weighs no more than the queries show it
    must, rather than wherever the noise of the plateau peaks."""
    means = {w: float(values.mean()) for w, values in per_query.items()}
    best = max(means, key=lambda w: (round(means[w], 6), -w))

    def near(w: float) -> bool:
        gaps = per_query[w] - per_query[best]
        error = gaps.std(ddof=1) / np.sqrt(len(gaps)) if len(gaps) > 1 else 0.0
        return float(gaps.mean()) >= -error

    return min(w for w in means if near(w))


def evaluate_personal_search(scored: Sequence[ScoredQuery], weight: float) -> dict:
    systems: dict[str, Callable[[ScoredQuery], list[int]]] = {
        "anonymous_search": lambda s: _top(s.product_ids, s.search_logits),
        # frequency first, the anonymous order among equals
        "frequency_among_candidates": lambda s: [
            int(s.product_ids[i])
            for i in np.lexsort((s.product_ids, -s.search_logits, -s.purchases))[:SEARCH_K]
        ],
        "personalised_search": lambda s: personal_top(s, weight),
    }
    results = {}
    for name, rank in systems.items():
        tops = [rank(s) for s in scored]
        results[name] = {
            "ndcg10": interval(
                [
                    binary_ndcg_at_k(t, s.query.relevant, SEARCH_K)
                    for t, s in zip(tops, scored, strict=True)
                ]
            ),
            "mrr10": interval(
                [_mrr(t, s.query.relevant, SEARCH_K) for t, s in zip(tops, scored, strict=True)]
            ),
            "category_ndcg10": interval(
                [category_ndcg(t, s.query, SEARCH_K) for t, s in zip(tops, scored, strict=True)]
            ),
        }
    return {"queries": len(scored), "weight": weight, "systems": results}
