"""Judgment-free checks of a store's search ranker, derived from its own catalogue.

A shop without judgments still gets a gate. Two families of check queries are cut from the catalogue:

* **known item**: two or three words of a product's title (never all of them), in title order; the
  product itself (and any product with the same title) is the one relevant answer;
* **category** (when the catalogue has a ``category`` column): the category's leaf name
  ("frozen / frozen pizza" -> "frozen pizza"); every product of that category is relevant.

Each candidate scorer (the transferred ranker, the z-score fusion) answers every check query through
the served retrieval and features; the mean nDCG@10 per family, averaged over the families, decides. The
learned ranker is kept only when it does at least as well as the fusion.

The checks also put the fusion's logits on the learned ranker's scale: the learned ranker is trained
listwise (its softmax over a query's candidates is what it optimises), so the fusion is scaled to the
factor whose softmax fits the checks' relevant answers best (:func:`softmax_scale`). The ranking is
the same at any scale; what reads logit differences (personalised search's history margin, the
served probabilities) then means the same with either ranker.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from bm25s.stopwords import STOPWORDS_EN
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from shopserve.ensemble.features import FEATURE_NAMES
from shopserve.ensemble.filters import category_path
from shopserve.ensemble.retrieve import Retriever
from tqdm.auto import tqdm

from .metrics import ndcg_at_k, rank_by_score

log = logging.getLogger("shopserve.export.selfcheck")

SCALE_BOUNDS = (0.05, 50.0)  # the fusion's softmax scale is fitted within these
KNOWN_ITEM_QUERIES = 400
CATEGORY_QUERIES = 200
MIN_CATEGORY_PRODUCTS = 5
KNOWN_ITEM = "known_item"
CATEGORY = "category"
_WORD = re.compile(r"[^\W\d_]{3,}")  # words of three or more letters
_UNINFORMATIVE = {"", "other", "others", "misc", "missing", "unknown", "none"}
_STOPWORDS = set(STOPWORDS_EN)

Scorer = Callable[[np.ndarray], np.ndarray]  # FEATURES [n, NUM_FEATURES] -> scores [n]
ScoredList = tuple[np.ndarray, np.ndarray]  # one query's candidates: scores, and which are relevant


@dataclass(frozen=True)
class CheckSet:
    family: str
    queries: list[str]
    relevant: list[frozenset[int]]  # product ids

    def __len__(self) -> int:
        return len(self.queries)


class LinearScorer:
    """A weighted sum of named feature columns (the fusion, or one signal alone)."""

    def __init__(self, weights: Mapping[str, float], names: Sequence[str] = FEATURE_NAMES) -> None:
        self.columns = [list(names).index(name) for name in weights]
        self.weights = np.array(list(weights.values()), dtype=np.float32)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return features[:, self.columns] @ self.weights


def _title_key(title: str) -> str:
    return " ".join(title.lower().split())


def known_item_checks(
    product_ids: np.ndarray, titles: Sequence[str], rng: np.random.Generator, count: int
) -> CheckSet:
    """Up to ``count`` queries of 2-3 title words each, from products drawn at random."""
    same_title: dict[str, list[int]] = defaultdict(list)
    for pid, title in zip(product_ids.tolist(), titles, strict=True):
        same_title[_title_key(title)].append(pid)
    queries, relevant = [], []
    for row in rng.permutation(len(titles)).tolist():
        words = list(
            dict.fromkeys(w for w in _WORD.findall(titles[row].lower()) if w not in _STOPWORDS)
        )
        if len(words) < 3:
            continue
        size = min(int(rng.integers(2, 4)), len(words) - 1)
        picked = sorted(rng.choice(len(words), size=size, replace=False).tolist())
        queries.append(" ".join(words[i] for i in picked))
        relevant.append(frozenset(same_title[_title_key(titles[row])]))
        if len(queries) == count:
            break
    return CheckSet(KNOWN_ITEM, queries, relevant)


def category_leaf(category: object) -> str:
    """The last level of a category path, lower-cased: 'Frozen / Frozen Pizza' -> 'frozen pizza'."""
    path = category_path(category)
    return path[-1] if path else ""


def category_checks(
    product_ids: np.ndarray, categories: Sequence[object], rng: np.random.Generator, count: int
) -> CheckSet:
    """Up to ``count`` category names as queries; a category's products are its relevant answers."""
    members: dict[str, list[int]] = defaultdict(list)
    for pid, category in zip(product_ids.tolist(), categories, strict=True):
        members[category_leaf(category)].append(pid)
    names = sorted(
        name
        for name, ids in members.items()
        if len(ids) >= MIN_CATEGORY_PRODUCTS and name not in _UNINFORMATIVE
    )
    chosen = sorted(rng.choice(len(names), size=min(count, len(names)), replace=False).tolist())
    return CheckSet(
        CATEGORY, [names[i] for i in chosen], [frozenset(members[names[i]]) for i in chosen]
    )


def catalogue_checks(
    product_ids: np.ndarray,
    titles: Sequence[str],
    categories: Sequence[object] | None,
    seed: int,
    known_items: int = KNOWN_ITEM_QUERIES,
    category_queries: int = CATEGORY_QUERIES,
) -> list[CheckSet]:
    rng = np.random.default_rng(seed)
    checks = [known_item_checks(product_ids, titles, rng, known_items)]
    if categories is not None:
        found = category_checks(product_ids, categories, rng, category_queries)
        if len(found):
            checks.append(found)
    return [c for c in checks if len(c)]


def served_ndcg(
    retriever: Retriever,
    product_ids: np.ndarray,
    scorers: Mapping[str, Scorer],
    queries: Sequence[str],
    query_embeddings: np.ndarray,
    gains: Sequence[Mapping[int, float]],
    desc: str = "checks",
    lists: Mapping[str, list[ScoredList]] | None = None,
) -> dict[str, float]:
    """Mean nDCG@10 of each scorer over the served candidates of every query. Each scorer named
    in ``lists`` also gets every query's scored candidates appended there."""
    sums = dict.fromkeys(scorers, 0.0)
    for query, embedding, query_gains in tqdm(
        list(zip(queries, query_embeddings, gains, strict=True)), desc=desc, unit="q"
    ):
        candidates = retriever(query, embedding)
        ids = product_ids[candidates.rows]
        for name, scorer in scorers.items():
            scores = scorer(candidates.features)
            sums[name] += ndcg_at_k(rank_by_score(ids, scores), query_gains, 10)
            if lists is not None and name in lists:
                lists[name].append((scores, np.isin(ids, list(query_gains))))
    return {name: total / max(len(queries), 1) for name, total in sums.items()}


def softmax_scale(lists: Sequence[ScoredList]) -> dict:
    """The factor ``s`` whose softmax of ``s x scores`` over each query's candidates best fits its
    relevant ones (cross-entropy against the uniform distribution over them, as the learned ranker's
    listwise training fits its judgments), within SCALE_BOUNDS; lists without a relevant candidate
    say nothing about it and are left out. Returns the scale and how many lists it rests on."""
    used = [(scores - scores.max(), relevant / relevant.sum()) for scores, relevant in lists
            if relevant.any()]  # fmt: skip
    if not used:
        log.warning("no check query has a relevant candidate: the fusion keeps its scale, 1")
        return {"scale": 1.0, "lists": 0}

    def cross_entropy(log_scale: float) -> float:
        scale = np.exp(log_scale)
        return float(
            np.mean([logsumexp(scale * s) - scale * (t @ s) for s, t in used], dtype=np.float64)
        )

    found = minimize_scalar(cross_entropy, bounds=np.log(SCALE_BOUNDS), method="bounded")
    return {"scale": round(float(np.exp(found.x)), 4), "lists": len(used)}


def run_checks(
    checks: Sequence[CheckSet],
    retriever: Retriever,
    product_ids: np.ndarray,
    scorers: Mapping[str, Scorer],
    embed: Callable[[list[str]], np.ndarray],
    scale: str | None = None,
) -> dict:
    """nDCG@10 per family and scorer, and the mean over families; with ``scale``, that scorer's
    softmax scale (:func:`softmax_scale`) over every check query."""
    lists: dict[str, list[ScoredList]] = {scale: []} if scale else {}
    by_family = {}
    for check in checks:
        by_family[check.family] = {
            "queries": len(check),
            "ndcg10": served_ndcg(
                retriever,
                product_ids,
                scorers,
                check.queries,
                embed(check.queries),
                [dict.fromkeys(ids, 1.0) for ids in check.relevant],
                desc=f"{check.family} checks",
                lists=lists,
            ),
        }
    mean = {
        name: float(np.mean([family["ndcg10"][name] for family in by_family.values()]))
        for name in scorers
    }
    for family, result in by_family.items():
        log.info("catalogue checks, %s: %s", family, result)
    scales = {name: softmax_scale(found) for name, found in lists.items()}
    if scales:
        log.info("softmax scale on the catalogue checks: %s", scales)
    return {"families": by_family, "mean_ndcg10": mean} | (
        {"softmax_scale": scales} if scales else {}
    )


def choose(scores: Mapping[str, float], learned: str, fallback: str) -> str:
    """The learned scorer when it does at least as well as the fallback, else the fallback."""
    return learned if scores[learned] >= scores[fallback] else fallback
