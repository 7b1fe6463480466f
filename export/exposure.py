"""Who a ranking shows: exposure of products and of their groups (brands, categories), its
concentration, and exposure against merit. Plain numpy over lists of ranked product ids.

The attention model is the logarithmic discount of nDCG: the product at rank r (1-based) of a top-k
list gets ``1 / log2(r + 1)`` of a shopper's attention, and nothing below k. A group's exposure is
the sum of its products' exposure over every ranking; its merit, over the judged rankings, the sum
of its judged gains. Disparity of exposure relative to merit is the total-variation distance
between the groups' shares of exposure and their shares of merit (0: every group is shown in
proportion to its relevance; 1: all exposure goes to groups with no merit), as in "Fairness of
Exposure in Rankings" (Singh and Joachims, KDD 2018) and the TREC Fair Ranking track, which compare
exposure with a merit-derived target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

Ranking = Sequence[int]


def attention(k: int) -> np.ndarray:
    """The attention of ranks 1..k (float64 [k])."""
    return 1.0 / np.log2(np.arange(2, k + 2))


def product_exposure(rankings: Sequence[Ranking], k: int) -> dict[int, float]:
    """Each shown product's exposure, summed over the rankings' top k."""
    weights = attention(k)
    exposure: dict[int, float] = {}
    for ranking in rankings:
        for rank, product in enumerate(list(ranking)[:k]):
            exposure[product] = exposure.get(product, 0.0) + float(weights[rank])
    return exposure


def group_totals(values: Mapping[int, float], group_of: Mapping[int, str]) -> dict[str, float]:
    """Per product values summed by group; a product without a group is its own ("?")."""
    totals: dict[str, float] = {}
    for product, value in values.items():
        group = group_of.get(product, "?")
        totals[group] = totals.get(group, 0.0) + value
    return totals


def gini(values: Sequence[float]) -> float:
    """The Gini coefficient of non-negative values: 0 when all are equal, towards 1 when one holds
    everything (the mean absolute difference over twice the mean)."""
    data = np.sort(np.asarray(values, dtype=np.float64))
    if not len(data) or data.sum() <= 0:
        return 0.0
    ranks = np.arange(1, len(data) + 1)
    return float((2 * ranks - len(data) - 1) @ data / (len(data) * data.sum()))


def top_share(values: Sequence[float], fraction: float = 0.01) -> float:
    """The share of the total that the largest ``fraction`` of the values holds (at least one)."""
    data = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    if not len(data) or data.sum() <= 0:
        return 0.0
    count = max(1, int(np.floor(fraction * len(data))))
    return float(data[:count].sum() / data.sum())


def lorenz(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The Lorenz curve: share of groups (poorest first) against their share of the total."""
    data = np.sort(np.asarray(values, dtype=np.float64))
    total = data.sum() if len(data) else 0.0
    groups = np.linspace(0.0, 1.0, len(data) + 1)
    held = np.concatenate([[0.0], np.cumsum(data) / total]) if total > 0 else groups
    return groups, held


def shares(totals: Mapping[str, float], groups: Sequence[str]) -> np.ndarray:
    """``totals`` as shares over ``groups`` (a group without any gets 0)."""
    values = np.array([totals.get(g, 0.0) for g in groups], dtype=np.float64)
    return values / values.sum() if values.sum() > 0 else values


def disparity(exposure: Mapping[str, float], merit: Mapping[str, float]) -> float:
    """Total-variation distance between the groups' exposure shares and their merit shares."""
    groups = sorted(set(exposure) | set(merit))
    return float(0.5 * np.abs(shares(exposure, groups) - shares(merit, groups)).sum())


def coverage(rankings: Sequence[Ranking], k: int, catalogue_size: int) -> float:
    """The share of the catalogue that appears in at least one ranking's top k."""
    shown = {product for ranking in rankings for product in list(ranking)[:k]}
    return len(shown) / catalogue_size if catalogue_size else 0.0


def jackknife(statistic: Callable[[np.ndarray], float], cases: int) -> tuple[float, float]:
    """95 % interval of ``statistic(weights)`` from the leave-one-case-out jackknife (normal
    approximation): each pass weighs every case 1 but one, which weighs 0.

    Concentration statistics (a Gini, the share of the top groups) are biased under resampling:
    a bootstrap draw leaves a third of the queries out, so fewer groups are shown and the Gini of
    every draw is higher than the sample's. Leaving one query out at a time keeps the set of groups,
    and the jackknife's variance holds for any statistic smooth in the case weights.
    """
    if cases < 2:
        return (float("nan"), float("nan"))
    values = np.empty(cases)
    weights = np.ones(cases)
    for case in range(cases):
        weights[case] = 0.0
        values[case] = statistic(weights)
        weights[case] = 1.0
    error = np.sqrt((cases - 1) / cases * np.square(values - values.mean()).sum())
    centre = statistic(np.ones(cases))
    return centre - 1.96 * error, centre + 1.96 * error
