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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

NEIGHBOURS_FILE = "neighbours.npz"


@dataclass(frozen=True)
class SparseRows:
    """A float32 matrix kept by rows (CSR: row r's columns ``columns[starts[r]:starts[r + 1]]``,
    ascending, and their values): the little of SciPy's csr_matrix that serving needs, without
    SciPy, whose import costs every serving process about 5 MiB of its own."""

    values: np.ndarray  # float32
    columns: np.ndarray  # int64
    starts: np.ndarray  # int64 [height + 1]
    width: int

    @classmethod
    def of(cls, rows: Sequence[tuple[np.ndarray, np.ndarray]], width: int) -> SparseRows:
        """From each row's (columns, values); a column given twice in a row holds their sum."""
        merged = [_merged(np.asarray(c, np.int64), np.asarray(v, np.float64)) for c, v in rows]
        starts = np.zeros(len(merged) + 1, dtype=np.int64)
        np.cumsum([len(c) for c, _ in merged], out=starts[1:])
        return cls(
            np.concatenate([v for _, v in merged] or [[]]).astype(np.float32),
            np.concatenate([c for c, _ in merged] or [[]]).astype(np.int64),
            starts,
            width,
        )

    @property
    def height(self) -> int:
        return len(self.starts) - 1

    def _row_of_each(self) -> np.ndarray:
        return np.repeat(np.arange(self.height), np.diff(self.starts))

    def transposed(self) -> SparseRows:
        rows = self._row_of_each()
        order = np.lexsort((rows, self.columns))
        starts = np.zeros(self.width + 1, dtype=np.int64)
        np.cumsum(np.bincount(self.columns, minlength=self.width), out=starts[1:])
        return SparseRows(self.values[order], rows[order], starts, self.height)

    def squared_norms(self) -> np.ndarray:
        squares = np.square(self.values, dtype=np.float64)
        return np.bincount(self._row_of_each(), weights=squares, minlength=self.height)

    def weighted_sum(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """``sum over i of weights[i] * row rows[i]``, float64 [width]."""
        at, counts = row_entries(self.starts, rows)
        values = self.values[at] * np.repeat(np.asarray(weights, np.float64), counts)
        return np.bincount(self.columns[at], weights=values, minlength=self.width)


def row_entries(starts: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the entries of CSR ``rows`` are stored (row by row, in the given order), and each
    row's number of entries (row r's are ``starts[r]`` up to ``starts[r + 1]``)."""
    rows = np.asarray(rows, dtype=np.int64)
    begins = starts[rows]
    counts = starts[rows + 1] - begins
    row_offsets = begins - (np.cumsum(counts) - counts)  # storage minus output position
    return np.arange(int(counts.sum())) + np.repeat(row_offsets, counts), counts


def _merged(columns: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    distinct, at = np.unique(columns, return_inverse=True)
    return distinct, np.bincount(at, weights=values, minlength=len(distinct))


@dataclass(frozen=True)
class ShopperVectors:
    """Every shopper's decayed basket-share vector (rows sorted by user key), and TIFU-KNN's
    parameters the build chose: the neighbourhood size ``k`` and the weight ``alpha`` of the
    shopper's own vector."""

    keys: np.ndarray  # str [users], sorted: the keyed hashes of the user ids
    matrix: SparseRows  # [users, catalogue rows]
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
        matrix = SparseRows.of([(rows, values) for _, rows, values in kept], items)
        return cls(np.array([key for key, *_ in kept], dtype=str), matrix, k, alpha)

    def save(self, path: Path) -> None:
        np.savez(
            path,
            keys=self.keys,
            data=self.matrix.values,
            indices=self.matrix.columns,
            indptr=self.matrix.starts,
            shape=np.array([self.matrix.height, self.matrix.width]),
            k=np.array(self.k),
            alpha=np.array(self.alpha),
        )

    @classmethod
    def load(cls, path: Path) -> ShopperVectors:
        with np.load(path) as data:
            matrix = SparseRows(
                data["data"].astype(np.float32, copy=False),
                data["indices"].astype(np.int64, copy=False),
                data["indptr"].astype(np.int64, copy=False),
                int(data["shape"][1]),
            )
            return cls(data["keys"], matrix, int(data["k"]), float(data["alpha"]))

    @cached_property
    def _by_item(self) -> SparseRows:
        """The transpose, so that the columns of a shopper's items are cheap rows."""
        return self.matrix.transposed()

    @cached_property
    def _squared_norms(self) -> np.ndarray:
        return self.matrix.squared_norms()

    def nearest(self, rows: np.ndarray, shares: np.ndarray, user_key: str = "") -> np.ndarray:
        """Indices of the ``k`` shoppers nearest (Euclidean) to the vector ``shares`` over catalogue
        ``rows``, the shopper ``user_key`` left out; ties by user key."""
        if not len(self.keys) or not np.any(shares > 0):
            return np.zeros(0, dtype=np.int64)
        dots = self._by_item.weighted_sum(rows, np.asarray(shares, np.float64))
        distances = self._squared_norms - 2.0 * dots  # + |shares|^2, the same for every shopper
        at = int(np.searchsorted(self.keys, user_key))
        if user_key and at < len(self.keys) and self.keys[at] == user_key:
            distances[at] = np.inf
        count = min(self.k, int(np.isfinite(distances).sum()))
        if count == 0:  # the shopper is the only one
            return np.zeros(0, dtype=np.int64)
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
            return np.zeros(self.matrix.width, dtype=np.float32)
        ones = np.ones(len(nearest))
        return (self.matrix.weighted_sum(nearest, ones) / len(nearest)).astype(np.float32)

    def score(self, shares: np.ndarray, neighbourhood: np.ndarray) -> np.ndarray:
        """TIFU-KNN's prediction from the shopper's own shares and their neighbourhood's."""
        return self.alpha * shares + (1.0 - self.alpha) * neighbourhood
