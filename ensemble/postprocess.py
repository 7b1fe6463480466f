"""Post-processing: softmax over the candidates' ranker scores, then a stable top-k (or the top k an
exposure policy draws, shopserve.ensemble.exposure)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .exposure import ExposurePolicy
from .store import Catalogue


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(initial=-np.inf))
    return (shifted / shifted.sum()).astype(np.float32)


def ranked(
    product_ids: np.ndarray, logits: np.ndarray, k: int, exposure: ExposurePolicy | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The positions of the ``k`` most probable candidates, ties broken by ascending product id
    (or, with an exposure policy that is on, of the ``k`` it draws), and every candidate's
    probability."""
    probabilities = softmax(np.asarray(logits, dtype=np.float32).reshape(-1))
    order = exposure.order(logits, k) if exposure is not None else None
    if order is None:
        order = np.lexsort((product_ids, -probabilities))[:k]
    return order, probabilities


def top_k(
    product_ids: np.ndarray, logits: np.ndarray, k: int, exposure: ExposurePolicy | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The top k's product ids and probabilities (see :func:`ranked`)."""
    if len(product_ids) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    order, probabilities = ranked(product_ids, logits, k, exposure)
    return product_ids[order].astype(np.int64), probabilities[order]


@dataclass(frozen=True)
class SearchResult:
    product_ids: np.ndarray  # int64 [k]
    scores: np.ndarray  # float32 [k], softmax probabilities over the candidates
    titles: list[str]
    # search: whether the shopper's history shaped the answer (None where the endpoint has no such
    # output)
    personalised: bool | None = None
    # each hit's reasons (shopserve.ensemble.explain.Explanation), when the request asked (EXPLAIN)
    explanations: list | None = None


# Explains the hits at these positions among the candidates (one Explanation each).
Explain = Callable[[np.ndarray], list]


class PostProcessor:
    """Candidate rows + ranker logits -> the top-k products with their titles."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue

    def __call__(
        self,
        rows: np.ndarray,
        logits: np.ndarray,
        k: int,
        exposure: ExposurePolicy | None = None,
        explain: Explain | None = None,
    ) -> SearchResult:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        product_ids = self.catalogue.product_ids[rows]
        if len(rows) == 0:
            return SearchResult(
                np.empty(0, np.int64), np.empty(0, np.float32), [], None, [] if explain else None
            )
        order, probabilities = ranked(product_ids, logits, k, exposure)
        titles = [self.catalogue.titles[row] for row in rows[order].tolist()]
        return SearchResult(
            product_ids[order].astype(np.int64),
            probabilities[order],
            titles,
            explanations=explain(order) if explain else None,
        )
