"""Shopper neighbourhoods: the user-KNN half of TIFU-KNN (Hu et al., KDD 2020).

TIFU-KNN represents a shopper by a temporally decayed item-frequency vector and predicts the next
basket as ``alpha * own vector + (1 - alpha) * mean of the k nearest shoppers' vectors`` (Euclidean
distance). Here a shopper's vector is the profile's decayed basket share (the ``recent_share``
feature: for each item, ``(1 - BASKET_DECAY) * sum over the shopper's baskets that held it of
BASKET_DECAY ** baskets ago``), which is TIFU's vector with one basket per group: it is kept up to
date event by event by :meth:`Profile.apply`, so a live shopper's own half always follows their
events. The neighbours' vectors are the build's snapshot of every shopper (``NEIGHBOURS_FILE`` in the
recommend model's version folder), searched exactly.

The neighbourhood vector is what the recommendation ranker reads as ``neighbour_share`` (a mean of
shares: bounded in [0, 1]), and TIFU-KNN's score as ``tifu_knn``; served alone, TIFU-KNN is the
linear ranker that reads that one feature.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy import sparse

NEIGHBOURS_FILE = "neighbours.npz"


@dataclass(frozen=True)
class ShopperVectors:
    """Every shopper's decayed basket-share vector (rows sorted by user key), and TIFU-KNN's
    parameters the build chose: the neighbourhood size ``k`` and the weight ``alpha`` of the
    shopper's own vector."""

    keys: np.ndarray  # str [users], sorted: the keyed hashes of the user ids
    matrix: sparse.csr_matrix  # float32 [users, catalogue rows]
    k: int
    alpha: float

    @classmethod
    def from_vectors(
        cls,
        vectors: Iterable[tuple[str, np.ndarray, np.ndarray]],
        items: int,
        k: int,
        alpha: float,
    ) -> ShopperVectors:
        """From (user key, catalogue rows, shares) triples; shoppers with no share are left out
        (they have bought nothing, so they are nobody's neighbour)."""
        kept = sorted((key, rows, values) for key, rows, values in vectors if np.any(values > 0))
        indptr = np.cumsum([0] + [len(rows) for _, rows, _ in kept])
        matrix = sparse.csr_matrix(
            (
                np.concatenate([v for *_, v in kept] or [[]]).astype(np.float32),
                np.concatenate([r for _, r, _ in kept] or [[]]).astype(np.int64),
                indptr,
            ),
            shape=(len(kept), items),
        )
        matrix.sum_duplicates()
        return cls(np.array([key for key, *_ in kept], dtype=str), matrix, k, alpha)

    def save(self, path: Path) -> None:
        np.savez(
            path,
            keys=self.keys,
            data=self.matrix.data,
            indices=self.matrix.indices,
            indptr=self.matrix.indptr,
            shape=np.array(self.matrix.shape),
            k=np.array(self.k),
            alpha=np.array(self.alpha),
        )

    @classmethod
    def load(cls, path: Path) -> ShopperVectors:
        with np.load(path) as data:
            matrix = sparse.csr_matrix(
                (data["data"], data["indices"], data["indptr"]), shape=tuple(data["shape"])
            )
            return cls(data["keys"], matrix, int(data["k"]), float(data["alpha"]))

    @cached_property
    def _by_item(self) -> sparse.csr_matrix:
        """The transpose, so that the columns of a shopper's items are cheap rows."""
        return self.matrix.T.tocsr()

    @cached_property
    def _squared_norms(self) -> np.ndarray:
        return np.asarray(self.matrix.multiply(self.matrix).sum(1), dtype=np.float64).ravel()

    def nearest(self, rows: np.ndarray, shares: np.ndarray, user_key: str = "") -> np.ndarray:
        """Indices of the ``k`` shoppers nearest (Euclidean) to the vector ``shares`` over catalogue
        ``rows``, the shopper ``user_key`` left out; ties by user key."""
        if not len(self.keys) or not np.any(shares > 0):
            return np.zeros(0, dtype=np.int64)
        dots = self._by_item[np.asarray(rows, dtype=np.int64)].T @ np.asarray(shares, np.float64)
        distances = self._squared_norms - 2.0 * dots  # + |shares|^2, the same for every shopper
        at = int(np.searchsorted(self.keys, user_key))
        if user_key and at < len(self.keys) and self.keys[at] == user_key:
            distances[at] = np.inf
        count = min(self.k, int(np.isfinite(distances).sum()))
        if count < len(distances):  # the k smallest, then an exact order among them
            candidates = np.argpartition(distances, count - 1)[:count]
            bound = distances[candidates].max()
            candidates = np.flatnonzero(distances <= bound)  # every shopper tied at the bound
        else:
            candidates = np.flatnonzero(np.isfinite(distances))
        order = np.lexsort((candidates, distances[candidates]))
        return candidates[order][:count]

    def neighbourhood(self, rows: np.ndarray, shares: np.ndarray, user_key: str = "") -> np.ndarray:
        """The mean vector of the nearest shoppers, float32 [catalogue rows] (zeros without any)."""
        nearest = self.nearest(rows, shares, user_key)
        if not len(nearest):
            return np.zeros(self.matrix.shape[1], dtype=np.float32)
        return np.asarray(self.matrix[nearest].sum(0), dtype=np.float32).ravel() / len(nearest)

    def score(self, shares: np.ndarray, neighbourhood: np.ndarray) -> np.ndarray:
        """TIFU-KNN's prediction from the shopper's own shares and their neighbourhood's."""
        return self.alpha * shares + (1.0 - self.alpha) * neighbourhood
