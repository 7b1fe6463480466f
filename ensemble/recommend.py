"""Recommendation step logic: candidates for a shopper, their user x item features, and the answer.

Candidates: what the shopper bought or put in the cart before, the items bought together with their
latest basket and open cart (co-occurrence), what their nearest shoppers buy (the TIFU-KNN
neighbourhood, :mod:`.neighbours`), the nearest items to their taste vector (the search index), and
the shop's most popular items. The features are bounded and mean the same in any shop
(shares, percentiles, cosines); the ranker is monotone in every behavioural signal (REC_MONOTONE).
Items already in the open cart are never recommended. A shopper with no profile gets the shop's most
popular items (cold start).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from . import store
from .dense import VectorIndex
from .lexical import top_rows
from .neighbours import ShopperVectors, row_entries
from .profiles import BASKET_DECAY, Profile
from .validation import MAX_TOP_K

REC_FEATURE_NAMES = (
    "repeat_share",  # share of the shopper's baskets that held the item
    "recent_share",  # decayed share of recent baskets that held it (BASKET_DECAY per basket)
    "purchases",  # log1p(purchases) / log1p(PURCHASES_SCALE), at most 1
    "recency",  # 1 / (1 + baskets since the item was last bought); 0 if never bought
    "cooccurrence",  # mean P(item | j) over j in the latest basket and the open cart
    "also_bought",  # item-to-item cosine over shoppers' histories, weighted by recent_share
    "neighbour_share",  # mean recent_share of the item among the shopper's nearest shoppers (TIFU-KNN)
    "tifu_knn",  # TIFU-KNN's score: alpha x recent_share + (1 - alpha) x neighbour_share
    "taste_cosine",  # cosine of the shopper's taste vector and the item's embedding
    "category_share",  # share of the shopper's purchases in the item's category
    "popularity",  # percentile of the item's purchases in the shop
    "engagement",  # log1p(add-to-cart + clicks + views) / log1p(ENGAGEMENT_SCALE), at most 1
    "repeat_rate",  # for an item the shopper bought: how often the shop's buyers buy it again
    "due",  # baskets since last bought over the item's usual gap, at most DUE_CAP (context)
    "history",  # log1p(the shopper's baskets) / log1p(HISTORY_SCALE), at most 1 (context)
    "repeat_habit",  # share of the shopper's purchases that were repeat purchases (context)
)
REC_CONTEXT = frozenset(("due", "history", "repeat_habit"))  # may raise or lower a score
REC_MONOTONE = frozenset(REC_FEATURE_NAMES) - REC_CONTEXT
PURCHASES_SCALE = 50
ENGAGEMENT_SCALE = 20
HISTORY_SCALE = 100
DUE_CAP = 4.0
HISTORY_CANDIDATES = 300
COOCCURRENCE_CANDIDATES = 100
COLLABORATIVE_CANDIDATES = 100
NEIGHBOUR_CANDIDATES = 100
TASTE_CANDIDATES = 50
TASTE_EF_SEARCH = 64  # a taste vector's neighbours are candidates, not answers: a cheap search
POPULAR_CANDIDATES = 50
ITEMS_FILE = "items.npz"
EXPLORE_FILE = "explore.onnx"  # beside the recommendation ranker: the ranker of NEW_ONLY answers


@dataclass(frozen=True)
class Neighbours:
    """Each item's nearest items with a weight (CSR rows, catalogue row order)."""

    indptr: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int64
    values: np.ndarray  # float32

    def spread(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """sum over j of weights[j] x (row j's weight for every item), float32 [items]."""
        positions, lengths = row_entries(self.indptr, rows)
        contributions = self.values[positions] * np.repeat(np.asarray(weights), lengths)
        size = len(self.indptr) - 1
        return np.bincount(self.indices[positions], weights=contributions, minlength=size).astype(
            np.float32
        )

    def strongest(self, sources: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each target row, the source row with the largest weight for it and that weight
        (-1 and 0 where no source has one)."""
        sources = np.asarray(sources, dtype=np.int64)
        positions, lengths = row_entries(self.indptr, sources)
        owners = np.repeat(sources, lengths)
        targets = np.asarray(targets, dtype=np.int64)
        wanted = np.isin(self.indices[positions], targets)
        kept, owners = positions[wanted], owners[wanted]
        # The strongest entry of each target first, then the first of each target.
        order = np.lexsort((-self.values[kept], self.indices[kept]))
        found, first = np.unique(self.indices[kept][order], return_index=True)
        mates, weights = np.full(len(targets), -1, np.int64), np.zeros(len(targets), np.float32)
        if not len(found):
            return mates, weights
        at = np.searchsorted(found, targets)
        hit = (at < len(found)) & (found[np.minimum(at, len(found) - 1)] == targets)
        best = order[first[at[hit]]]
        mates[hit], weights[hit] = owners[best], self.values[kept][best]
        return mates, weights


@dataclass(frozen=True)
class ShopItems:
    """Item-level statistics of the shop, built at release time (catalogue row order)."""

    popularity: np.ndarray  # float32 [n]: purchases in the build's history
    popularity_pct: np.ndarray  # float32 [n]: percentile of popularity, in [0, 1]
    repeat_rate: np.ndarray  # float32 [n]: share of the item's purchases that were repeats
    categories: np.ndarray  # int32 [n]: category index, -1 without one
    basket_mates: Neighbours  # items bought in the same basket as j, with P(item | j)
    also_bought: Neighbours  # items bought by the same shoppers as j, with their cosine

    def save(self, path: Path) -> None:
        arrays = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, Neighbours):
                arrays.update(
                    {f"{name}.{k}": getattr(value, k) for k in ("indptr", "indices", "values")}
                )
            else:
                arrays[name] = value
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> ShopItems:
        with np.load(path) as data:
            fields = {}
            for name in cls.__dataclass_fields__:
                if f"{name}.indptr" in data:
                    parts = ("indptr", "indices", "values")
                    fields[name] = Neighbours(*(data[f"{name}.{k}"] for k in parts))
                else:
                    fields[name] = data[name]
            return cls(**fields)

    @property
    def num_categories(self) -> int:
        return int(self.categories.max(initial=-1)) + 1

    @cached_property
    def by_popularity(self) -> np.ndarray:
        """Every row, most purchased first (a stable sort)."""
        return np.argsort(-self.popularity, kind="stable")

    def popular(self, n: int) -> np.ndarray:
        return self.by_popularity[:n]

    def cooccurrence(self, basket_rows: np.ndarray) -> np.ndarray:
        """Mean P(item | j) over the rows j of a basket, for every item (float32 [n])."""
        weights = np.full(len(basket_rows), 1.0 / max(len(basket_rows), 1))
        return self.basket_mates.spread(basket_rows, weights)

    def collaborative(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Weighted mean cosine to the shopper's items over shoppers' histories, every item."""
        total = float(weights.sum())
        if total <= 0:
            return np.zeros(len(self.popularity), dtype=np.float32)
        return self.also_bought.spread(rows, weights / total)


@dataclass(frozen=True)
class UserView:
    """A profile seen through the catalogue rows: what the features and candidates need."""

    rows: np.ndarray  # catalogue rows of every product in the history
    purchases: np.ndarray
    baskets_with: np.ndarray
    first_basket: np.ndarray
    last_basket: np.ndarray
    engagement: np.ndarray  # carts + clicks + views
    decayed: np.ndarray  # decayed basket frequency, as of the latest basket
    baskets: int
    recent: np.ndarray  # rows of the latest basket and the open cart
    open_cart: np.ndarray  # rows in the cart, not yet bought
    taste: np.ndarray | None
    neighbourhood: np.ndarray | None = (
        None  # float32 [catalogue rows]: nearest shoppers' mean share
    )

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Where each catalogue row is in the history arrays; -1 for a row not in them."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(self.rows):
            return np.full(len(rows), -1, dtype=np.int64)
        order = np.argsort(self.rows, kind="stable")
        at = np.minimum(np.searchsorted(self.rows[order], rows), len(order) - 1)
        return np.where(self.rows[order][at] == rows, order[at], -1)

    @property
    def shares(self) -> np.ndarray:
        """The decayed basket share of each history row (TIFU's vector, in [0, 1))."""
        return self.decayed * (1.0 - BASKET_DECAY)

    @classmethod
    def of(
        cls,
        profile: Profile,
        rows_of: Callable[[np.ndarray], np.ndarray],
        vectors: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> UserView:
        """``rows_of`` maps product ids to catalogue rows (-1 for a product not in it);
        ``vectors`` gives rows' embeddings (for the taste vector; without it, none)."""
        arrays = profile.arrays()
        all_rows = rows_of(arrays.product_ids)
        known = all_rows >= 0
        rows = all_rows[known]
        latest = rows[(arrays.last_basket[known] == profile.baskets - 1) & (profile.baskets > 0)]
        open_cart = rows_of(np.array(profile.open_basket, dtype=np.int64))
        open_cart = open_cart[open_cart >= 0]
        return cls(
            rows,
            arrays.purchases[known],
            arrays.baskets[known],
            arrays.first_basket[known],
            arrays.last_basket[known],
            (arrays.carts + arrays.browsed)[known],
            (arrays.decayed * BASKET_DECAY ** (profile.baskets - 1 - arrays.last_basket))[known],
            profile.baskets,
            np.union1d(latest, open_cart),
            open_cart,
            None if vectors is None else taste(rows, arrays.purchases[known], vectors),
        )


@dataclass(frozen=True)
class ItemSignals:
    """One shopper's item-to-item signals over every catalogue row (float32 [n]): what both the
    candidates and the features read."""

    cooccurrence: np.ndarray | None  # mean P(item | j) over the latest basket and open cart
    also_bought: np.ndarray  # mean cosine to the shopper's items, weighted by recent_share


def taste(
    rows: np.ndarray, purchases: np.ndarray, vectors: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray | None:
    """A shopper's taste vector: the sum of the embeddings of every purchase (each product's by
    its number of purchases), L2-normalised; None before the first purchase."""
    bought = purchases > 0
    if not bought.any():
        return None
    total = purchases[bought].astype(np.float32) @ vectors(rows[bought])
    norm = float(np.linalg.norm(total))
    return (total / norm).astype(np.float32) if norm > 0 else None


class Recommender:
    """Candidates and features for one shopper; the ranker that scores them is applied by the caller."""

    def __init__(
        self,
        items: ShopItems,
        dense: VectorIndex,
        product_ids: np.ndarray,
        shoppers: ShopperVectors | None = None,
        row_of: store.ProductRows | None = None,  # computed from product_ids when not given
    ) -> None:
        self.items = items
        self.dense = dense
        self.product_ids = product_ids
        self.shoppers = shoppers
        self.row_of = row_of if row_of is not None else store.ProductRows.of(product_ids)

    def rows_of(self, product_ids: np.ndarray) -> np.ndarray:
        """Catalogue rows of ``product_ids``; -1 for an id the catalogue does not have."""
        return self.row_of.rows(product_ids)

    def view(self, profile: Profile, user_key: str = "") -> UserView:
        """The shopper ``user_key`` (left out of their own neighbourhood) as the features see them."""
        view = UserView.of(profile, self.rows_of, self.dense.vectors)
        if self.shoppers is None:
            return view
        return replace(
            view, neighbourhood=self.shoppers.neighbourhood(view.rows, view.shares, user_key)
        )

    def with_shoppers(self, shoppers: ShopperVectors) -> Recommender:
        return Recommender(self.items, self.dense, self.product_ids, shoppers, self.row_of)

    def shopper_vectors(
        self, profiles: Iterable[tuple[str, Profile]], k: int, alpha: float
    ) -> ShopperVectors:
        """Every shopper's TIFU vector over this catalogue, with TIFU-KNN's parameters."""

        def vector(key: str, profile: Profile) -> tuple[str, np.ndarray, np.ndarray]:
            view = UserView.of(profile, self.rows_of)
            return key, view.rows, view.shares

        return ShopperVectors.from_vectors(
            (vector(key, profile) for key, profile in profiles), len(self.product_ids), k, alpha
        )

    def shortlist(
        self, user: UserView, new_only: bool = False, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The candidates (see _candidates) and their features, the catalogue-wide signals
        both read computed once."""
        signals = self._signals(user)
        rows = self._candidates(user, signals, new_only, allowed)
        return rows, self._features(user, rows, signals)

    def _candidates(
        self,
        user: UserView,
        signals: ItemSignals,
        new_only: bool = False,
        allowed: np.ndarray | None = None,
    ) -> np.ndarray:
        """Catalogue rows worth scoring for this shopper (ascending), the open cart left out, and
        with ``new_only`` everything they bought before too (discovery). With ``allowed`` (a
        boolean mask: a request's filter), only allowed rows, topped up with the most popular
        allowed rows so that a narrow filter still leaves enough."""
        history = user.rows[np.lexsort((user.rows, -user.purchases, -user.engagement))]
        parts = [
            history[:HISTORY_CANDIDATES],
            self.items.popular(POPULAR_CANDIDATES),
            top_rows(signals.also_bought, COLLABORATIVE_CANDIDATES),
        ]
        if signals.cooccurrence is not None:
            parts.append(top_rows(signals.cooccurrence, COOCCURRENCE_CANDIDATES))
        if user.neighbourhood is not None:
            parts.append(top_rows(user.neighbourhood, NEIGHBOUR_CANDIDATES))
        if user.taste is not None:
            rows, _ = self.dense.search(
                user.taste.reshape(1, -1), TASTE_CANDIDATES, TASTE_EF_SEARCH
            )
            parts.append(rows[0][rows[0] >= 0])
        candidates = np.unique(np.concatenate(parts).astype(np.int64))
        leave_out = np.union1d(user.open_cart, user.rows[user.purchases > 0] if new_only else [])
        if allowed is not None:
            allowed = allowed.copy()
            allowed[leave_out.astype(np.int64)] = False
            popular = self.items.by_popularity
            top_up = popular[allowed[popular]][: POPULAR_CANDIDATES + MAX_TOP_K]
            candidates = np.union1d(candidates[allowed[candidates]], top_up)
        return np.setdiff1d(candidates, leave_out, assume_unique=True)

    def features(self, user: UserView, rows: np.ndarray) -> np.ndarray:
        """``[len(rows), len(REC_FEATURE_NAMES)]`` float32, in the order of REC_FEATURE_NAMES."""
        return self._features(user, np.asarray(rows, dtype=np.int64), self._signals(user))

    def _signals(self, user: UserView) -> ItemSignals:
        cooccurrence = self.items.cooccurrence(user.recent) if len(user.recent) else None
        return ItemSignals(cooccurrence, self.items.collaborative(user.rows, user.shares))

    def _features(self, user: UserView, rows: np.ndarray, signals: ItemSignals) -> np.ndarray:
        index = user.positions(rows)

        def history(values: np.ndarray) -> np.ndarray:
            """The shopper's value for each candidate row; 0 where it is not in the history."""
            return np.append(values, 0)[index].astype(np.float64)

        purchases = history(user.purchases)
        bought = purchases > 0
        baskets_with = history(user.baskets_with)
        since = (user.baskets - 1) - history(user.last_basket)
        usual_gap = np.where(
            baskets_with > 1,
            (history(user.last_basket) - history(user.first_basket))
            / np.maximum(baskets_with - 1, 1),
            max(user.baskets, 1),
        )
        out = np.zeros((len(rows), len(REC_FEATURE_NAMES)), dtype=np.float32)
        column = {name: i for i, name in enumerate(REC_FEATURE_NAMES)}

        def put(name: str, values: object) -> None:
            out[:, column[name]] = values

        put("repeat_share", baskets_with / max(user.baskets, 1))
        put("recent_share", history(user.shares))
        put("purchases", np.minimum(np.log1p(purchases) / np.log1p(PURCHASES_SCALE), 1.0))
        put("recency", np.where(bought, 1.0 / (1.0 + since), 0.0))
        if signals.cooccurrence is not None:
            put("cooccurrence", signals.cooccurrence[rows])
        put("also_bought", signals.also_bought[rows])
        if user.neighbourhood is not None and self.shoppers is not None:
            put("neighbour_share", user.neighbourhood[rows])
            put("tifu_knn", self.shoppers.score(history(user.shares), user.neighbourhood[rows]))
        if user.taste is not None:
            put("taste_cosine", self.dense.vectors(rows) @ user.taste)
        put("category_share", self._category_share(user, rows))
        put("popularity", self.items.popularity_pct[rows])
        engagement = history(user.engagement)
        put("engagement", np.minimum(np.log1p(engagement) / np.log1p(ENGAGEMENT_SCALE), 1.0))
        put("repeat_rate", np.where(bought, self.items.repeat_rate[rows], 0.0))
        put("due", np.where(bought, np.minimum(since / np.maximum(usual_gap, 1), DUE_CAP), 0.0))
        put("history", min(np.log1p(user.baskets) / np.log1p(HISTORY_SCALE), 1.0))
        total = float(user.purchases.sum())
        put("repeat_habit", (total - float((user.purchases > 0).sum())) / total if total else 0.0)
        return out

    def _category_share(self, user: UserView, rows: np.ndarray) -> np.ndarray:
        categories = self.items.categories
        if self.items.num_categories == 0 or not len(user.rows):
            return np.zeros(len(rows), dtype=np.float32)
        mine = categories[user.rows]
        known = mine >= 0
        counts = np.bincount(
            mine[known], weights=user.purchases[known], minlength=self.items.num_categories
        )
        total = counts.sum()
        if total == 0:
            return np.zeros(len(rows), dtype=np.float32)
        theirs = categories[rows]
        return np.where(theirs >= 0, counts[np.maximum(theirs, 0)] / total, 0.0).astype(np.float32)
