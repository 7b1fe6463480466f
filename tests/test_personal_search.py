"""Personalised search's fusion: the shopper's history re-orders the query's good matches and
never lifts a poor one (fast, no store)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from shopserve.ensemble.explain import Explanation, Reason
from shopserve.ensemble.personal import (
    HISTORY_CATEGORY_MATCHES,
    HISTORY_MARGIN,
    fuse,
    history_weights,
)
from shopserve.export.evaluate_personal import (
    ScoredQuery,
    category_ndcg,
    personal_top,
    smallest_near_best,
)
from shopserve.export.history import BasketQuery


def test_history_weighs_only_the_candidates_within_the_margin_of_the_best() -> None:
    logits = np.array([9.0, 9.0 - HISTORY_MARGIN, 9.0 - HISTORY_MARGIN - 0.01], dtype=np.float32)
    weights = history_weights(logits, 16.0)
    assert weights.tolist() == [16.0, 16.0, 0.0]
    assert weights.dtype == np.float32
    assert history_weights(np.empty(0, np.float32), 16.0).size == 0


def test_a_poor_match_the_shopper_buys_every_week_stays_below_the_good_matches() -> None:
    # 1: the query's best match, never bought; 2: a good match bought now and then;
    # 3: a poor match (chocolate almonds for "eggs") bought every week.
    scored = ScoredQuery(
        query=None,
        product_ids=np.array([1, 2, 3]),
        search_logits=np.array([9.0, 6.0, 9.0 - HISTORY_MARGIN - 1.0]),
        affinity=np.array([0.0, 1.0, 50.0]),
        purchases=np.array([0.0, 2.0, 40.0]),
    )
    assert personal_top(scored, 0.0) == [1, 2, 3]
    assert personal_top(scored, 16.0) == [2, 1, 3]


def test_a_shopper_the_ranker_scores_below_zero_keeps_the_good_matches_on_top() -> None:
    """A learned ranker's logit can be negative. 1 and 2 are the query's good matches, which the
    shopper's ranker scores -3 and -1; 3 is a poor match it scores 0. Adding ``w x affinity``
    alone would put 3 first (9 - 48 and 8 - 16 against 3); the lift keeps history's order of the
    good matches (2, then 1) above it."""
    scored = ScoredQuery(
        query=None,
        product_ids=np.array([1, 2, 3]),
        search_logits=np.array([9.0, 8.0, 9.0 - HISTORY_MARGIN - 1.0], dtype=np.float32),
        affinity=np.array([-3.0, -1.0, 0.0], dtype=np.float32),
        purchases=np.zeros(3),
    )
    assert personal_top(scored, 16.0) == [2, 1, 3]
    fused = fuse(scored.search_logits, scored.affinity, 16.0)
    assert fused.lift == -3.0 and fused.logits.tolist() == [9.0, 40.0, 3.0]
    assert fused.logits.dtype == np.float32
    # Affinities of 0 or more are not moved: query + w x affinity, as before
    fused = fuse(scored.search_logits, np.array([0.5, 0.0, 2.0], np.float32), 16.0)
    assert fused.lift == 0.0 and fused.logits.tolist() == [17.0, 8.0, 3.0]
    assert fuse(scored.search_logits, scored.affinity, 0.0).logits.tolist() == [9.0, 8.0, 3.0]


def test_history_lifts_only_categories_the_querys_best_matches_show() -> None:
    """A small shop's candidates for "organic milk": its milks (category 0) on top and, within the
    margin, every organic product (category 1, strawberries the shopper buys every week)."""
    best = HISTORY_CATEGORY_MATCHES
    logits = np.concatenate([np.linspace(9.0, 8.0, best), [6.5, 6.0]]).astype(np.float32)
    categories = np.array([0] * best + [1, 0], dtype=np.int32)
    affinity = np.zeros(best + 2, dtype=np.float32)
    affinity[[best, best + 1]] = [5.0, 0.5]  # the strawberries; a milk bought now and then
    scored = ScoredQuery(
        None, np.arange(best + 2), logits, affinity, np.zeros(best + 2), categories
    )
    top = personal_top(scored, 16.0)
    assert top[0] == best + 1 and best not in top[:best]  # the milk first, no strawberries
    weights = history_weights(logits, 16.0, categories)
    assert weights[best] == 0.0 and (weights[categories == 0] == 16.0).all()
    # A product without a category (or added since the build) is of no known kind, even where one
    # of the best matches has none either
    uncategorised = categories.copy()
    uncategorised[[0, best]] = -1
    assert personal_top(replace(scored, categories=uncategorised), 16.0)[0] == best + 1
    # Without categories (none in the catalogue: all -1) the margin alone decides
    assert personal_top(replace(scored, categories=np.full(best + 2, -1)), 16.0)[0] == best
    assert personal_top(replace(scored, categories=None), 16.0)[0] == best


def test_a_lifted_explanation_still_adds_up_to_its_logit() -> None:
    history = Explanation(-1.0, -2.5, (Reason("your_purchases", 1.5, "you bought it once"),))
    lifted = history.moved(3.0).scaled(16.0)
    assert lifted.logit == 32.0 and lifted.reference == 8.0
    assert lifted.logit == pytest.approx(
        lifted.reference + sum(r.contribution for r in lifted.reasons)
    )


def test_category_ndcg_counts_the_category_as_partly_relevant() -> None:
    # "eggs": the basket held product 2; products 1, 2 and 3 are eggs; 9 is chocolate almonds.
    query = BasketQuery(None, "eggs", frozenset({2}), frozenset({1, 2, 3}))
    discount = 1 / np.log2([2, 3, 4])
    ideal = 2 * discount[0] + discount[1] + discount[2]
    assert category_ndcg([2, 1, 3], query, 10) == 1.0
    assert category_ndcg([9, 2, 1], query, 10) == pytest.approx(
        (2 * discount[1] + discount[2]) / ideal
    )
    assert category_ndcg([1, 3, 2], query, 2) == pytest.approx(
        (discount[0] + discount[1]) / (2 * discount[0] + discount[1])
    )


def test_the_search_weight_is_the_smallest_within_one_standard_error_of_the_best() -> None:
    """On a plateau (weights 4 to 64 within noise of each other) the smallest of it is chosen; a
    weight clearly below the best is not, nor is 0 (anonymous search)."""
    rng = np.random.default_rng(2)
    queries = 400
    base = rng.uniform(0.0, 1.0, queries)
    per_query = {0.0: base - 0.2, 1.0: base - 0.05}
    for w, lift in ((4.0, 0.0), (16.0, 0.0), (64.0, 0.003)):  # the plateau's best: 64, by noise
        per_query[w] = base + lift + rng.normal(0.0, 0.05, queries)
    assert max(per_query, key=lambda w: per_query[w].mean()) == 64.0
    assert smallest_near_best(per_query) == 4.0
    # a single query has no standard error: only the best itself is near it
    assert smallest_near_best({w: values[:1] for w, values in per_query.items()}) == max(
        per_query, key=lambda w: per_query[w][0]
    )
