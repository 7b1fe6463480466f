"""Exposure metrics (shopserve.export.exposure) against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from shopserve.export.exposure import (
    attention,
    coverage,
    disparity,
    gini,
    group_totals,
    jackknife,
    lorenz,
    product_exposure,
    top_share,
)

# Two rankings of three products: brand a owns 1 and 2, brand b owns 3.
RANKINGS = [[1, 2, 3], [3, 1]]
GROUP_OF = {1: "a", 2: "a", 3: "b"}


def test_attention_is_the_log_discount_of_ndcg() -> None:
    np.testing.assert_allclose(attention(3), [1.0, 1 / math.log2(3), 0.5])


def test_exposure_sums_attention_over_rankings_and_groups() -> None:
    exposure = product_exposure(RANKINGS, k=2)  # rank 3 of the first ranking is past k
    assert exposure == pytest.approx({1: 1 + 1 / math.log2(3), 2: 1 / math.log2(3), 3: 1.0})
    by_group = group_totals(exposure, GROUP_OF)
    assert by_group == pytest.approx({"a": 1 + 2 / math.log2(3), "b": 1.0})
    assert group_totals({9: 1.0}, GROUP_OF) == {"?": 1.0}


def test_gini_and_the_top_share() -> None:
    assert gini([1, 1, 1, 1]) == 0.0
    assert gini([0, 0, 0, 4]) == pytest.approx(0.75)  # (n - 1) / n when one holds everything
    assert gini([1, 3]) == pytest.approx(0.25)  # |1 - 3| / (2 * 2 * mean 2)
    assert gini([]) == gini([0, 0]) == 0.0
    assert top_share([5, 3, 2], fraction=0.01) == pytest.approx(0.5)  # at least one group
    assert top_share(list(range(1, 201)), fraction=0.01) == pytest.approx((200 + 199) / 20100)


def test_lorenz_curve_runs_from_nothing_to_everything() -> None:
    groups, held = lorenz([3, 1])
    np.testing.assert_allclose(groups, [0, 0.5, 1])
    np.testing.assert_allclose(held, [0, 0.25, 1])


def test_disparity_is_the_distance_between_exposure_and_merit_shares() -> None:
    assert disparity({"a": 2.0, "b": 2.0}, {"a": 1.0, "b": 1.0}) == 0.0
    # exposure 3:1, merit 1:1 -> shares 0.75/0.25 against 0.5/0.5
    assert disparity({"a": 3.0, "b": 1.0}, {"a": 5.0, "b": 5.0}) == pytest.approx(0.25)
    assert disparity({"c": 1.0}, {"a": 1.0}) == pytest.approx(1.0)  # all to a group without merit


def test_coverage_counts_distinct_products_in_the_top_k() -> None:
    assert coverage(RANKINGS, k=1, catalogue_size=10) == pytest.approx(0.2)  # products 1 and 3
    assert coverage(RANKINGS, k=3, catalogue_size=10) == pytest.approx(0.3)


def test_the_jackknife_interval_of_a_mean_is_the_textbook_one() -> None:
    values = np.random.default_rng(1).normal(10.0, 1.0, 400)

    def mean(weights: np.ndarray) -> float:
        return float(weights @ values / weights.sum())

    low, high = jackknife(mean, len(values))
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))  # exact for the mean
    assert low == pytest.approx(values.mean() - half) and high == pytest.approx(
        values.mean() + half
    )


def test_the_jackknife_interval_of_a_gini_holds_the_sample_gini() -> None:
    rng = np.random.default_rng(2)
    exposure = rng.exponential(1.0, (300, 50)) * (rng.random((300, 50)) < 0.1)  # query x group

    def concentration(weights: np.ndarray) -> float:
        return gini(weights @ exposure)

    low, high = jackknife(concentration, len(exposure))
    assert low < gini(exposure.sum(0)) < high and high - low < 0.1


def test_the_search_audit_of_a_small_ranking() -> None:
    from collections import OrderedDict

    from shopserve.export.audit import ProductGroups, SearchRankings, search_audit
    from shopserve.export.data import Judgments

    # rows 0-1 brand a, row 2 brand b, row 3 brand c (never shown); product id = 10 + row
    groups = ProductGroups("brand", ["a", "b", "c"], np.array([0, 0, 1, 2]))
    rankings = SearchRankings(
        ["q1", "q2"], [np.array([0, 2]), np.array([2, 1])], np.array([10, 11, 12, 13])
    )
    judgments = Judgments(OrderedDict(q1={10: 3.0, 12: 1.0}, q2={13: 3.0}), min_relevance=1.0)
    audit = search_audit(rankings, groups, judgments)
    second = 1 / math.log2(3)
    # exposure: a = 1 + second, b = second + 1, c = 0; merit (gain = relevance - 1): a 2, c 2
    np.testing.assert_allclose(audit["_exposure_by_group"], [1 + second, 1 + second, 0])
    metrics = {name: entry["value"] for name, entry in audit["metrics"].items()}
    assert metrics["exposure_gini"] == pytest.approx(gini([1 + second, 1 + second, 0]), abs=1e-4)
    assert metrics["top_1pct_groups_share"] == pytest.approx(0.5, abs=1e-4)
    assert metrics["disparity_to_merit"] == pytest.approx(0.5, abs=1e-4)  # (0 + .5 + .5) / 2
    # q1: gains a10 = 2, b12 = 0 -> nDCG 1; q2: the only relevant (13) is not shown -> 0
    assert metrics["ndcg_at_10"] == pytest.approx(0.5)
    assert metrics["coverage_at_10"] == pytest.approx(0.75)
    assert audit["groups_shown"] == 2 and audit["top_groups"][0]["group"] in ("a", "b")
