"""Shoppers' histories in time: baskets numbered the way profiles number them, profiles replayed
as of any basket, the shop as of a cut (item statistics and every profile), and evaluation cases (a
shopper as of before a basket, and what that basket held)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from shopserve.ensemble.dense import DenseIndex
from shopserve.ensemble.profiles import PURCHASE, Profile
from shopserve.ensemble.recommend import Neighbours, Recommender, ShopItems, UserView
from tqdm.auto import tqdm

from .data import CatalogueData, EventsData
from .selfcheck import category_leaf

COOCCURRENCE_NEIGHBOURS = 50
MIN_COOCCURRENCE = 2  # pairs bought together fewer times than this are noise


@dataclass(frozen=True)
class Timeline:
    """One shopper's events (positions in the log) and the basket number of each purchase."""

    positions: np.ndarray
    basket_of: np.ndarray  # -1 for events that are not purchases
    baskets: int

    def first_time(self, events: EventsData, basket: int) -> float:
        """When basket ``basket`` began (infinity past the last one)."""
        inside = self.positions[self.basket_of == basket]
        return float(events.timestamps[inside].min()) if len(inside) else np.inf

    def before(self, events: EventsData, basket: int) -> np.ndarray:
        """Positions of the events that came before basket ``basket``."""
        cut = self.first_time(events, basket)
        purchase = self.basket_of >= 0
        keep = np.where(purchase, self.basket_of < basket, events.timestamps[self.positions] < cut)
        return self.positions[keep]

    def items(self, events: EventsData, basket: int) -> set[int]:
        return set(events.product_ids[self.positions[self.basket_of == basket]].tolist())


def replay(events: EventsData, positions: np.ndarray) -> Profile:
    """A profile folded from the events at ``positions`` (in order)."""
    profile = Profile()
    for i in positions.tolist():
        profile.apply(
            int(events.product_ids[i]),
            int(events.events[i]),
            float(events.timestamps[i]),
            events.basket_ids[i],
        )
    return profile


def timelines(events: EventsData) -> dict[str, Timeline]:
    """Number every shopper's baskets the way profiles do (one pass per shopper)."""
    out = {}
    for user, span in events.by_user().items():
        positions = np.arange(span.start, span.stop)
        basket_of = np.full(len(positions), -1, dtype=np.int32)
        profile = Profile()
        for j, i in enumerate(positions.tolist()):
            kind = int(events.events[i])
            profile.apply(
                int(events.product_ids[i]),
                kind,
                float(events.timestamps[i]),
                events.basket_ids[i],
            )
            if kind == PURCHASE:
                basket_of[j] = profile.baskets - 1
        out[user] = Timeline(positions, basket_of, profile.baskets)
    return out


def shop_items(
    catalogue: CatalogueData,
    events: EventsData,
    lines: Mapping[str, Timeline],
    cut: Callable[[Timeline], int],
) -> ShopItems:
    """Popularity, repeat rates, categories and co-occurrence from every basket before
    ``cut(timeline)``."""
    row_of = {pid: row for row, pid in enumerate(catalogue.product_ids.tolist())}
    n = len(catalogue)
    basket_rows, item_rows, user_rows = [], [], []
    repeats = np.zeros(n, dtype=np.float32)
    basket = 0
    for user, line in enumerate(lines.values()):
        seen: set[int] = set()
        for number in range(min(cut(line), line.baskets)):
            rows = {row_of[p] for p in line.items(events, number)}
            basket_rows.extend([basket] * len(rows))
            item_rows.extend(rows)
            user_rows.extend([user] * len(rows))
            repeats[list(rows & seen)] += 1
            seen |= rows
            basket += 1
    incidence = sparse.csr_matrix(
        (np.ones(len(item_rows), np.float32), (basket_rows, item_rows)), shape=(basket, n)
    )
    popularity = np.asarray(incidence.sum(0)).ravel().astype(np.float32)
    together = (incidence.T @ incidence).tocsr()
    together.data[together.data < MIN_COOCCURRENCE] = 0
    basket_mates = _neighbours(together, lambda j, _, counts: counts / max(popularity[j], 1.0))
    owners = sparse.csr_matrix(
        (np.ones(len(item_rows), np.float32), (user_rows, item_rows)), shape=(len(lines), n)
    )
    owners.data[:] = 1.0  # bought at all, whatever how often
    buyers = np.asarray(owners.sum(0)).ravel()
    shared = (owners.T @ owners).tocsr()
    shared.data[shared.data < MIN_COOCCURRENCE] = 0
    also_bought = _neighbours(
        shared, lambda j, items, counts: counts / np.sqrt(max(buyers[j], 1.0) * buyers[items])
    )
    ranks = popularity.argsort(kind="stable").argsort(kind="stable")
    percentile = np.where(popularity > 0, ranks / max(n - 1, 1), 0.0).astype(np.float32)
    return ShopItems(
        popularity,
        percentile,
        np.where(popularity > 0, repeats / np.maximum(popularity, 1), 0).astype(np.float32),
        _category_index(catalogue),
        basket_mates,
        also_bought,
    )


def _neighbours(
    counts: sparse.csr_matrix, weight: Callable[[int, np.ndarray, np.ndarray], np.ndarray]
) -> Neighbours:
    """Each row's COOCCURRENCE_NEIGHBOURS largest counts (itself left out), as weighted by
    ``weight(row, their rows, their counts)``."""
    counts.setdiag(0)
    counts.eliminate_zeros()
    indptr, indices, values = [0], [], []
    for j in range(counts.shape[0]):
        span = slice(counts.indptr[j], counts.indptr[j + 1])
        items, found = counts.indices[span], counts.data[span]
        top = np.argsort(-found, kind="stable")[:COOCCURRENCE_NEIGHBOURS]
        indices.extend(items[top].tolist())
        values.extend(weight(j, items[top], found[top]).tolist())
        indptr.append(len(indices))
    return Neighbours(
        np.asarray(indptr, dtype=np.int64),
        np.asarray(indices, dtype=np.int64),
        np.asarray(values, dtype=np.float32),
    )


def _category_index(catalogue: CatalogueData) -> np.ndarray:
    categories = catalogue.extra.get("category")
    if categories is None:
        return np.full(len(catalogue), -1, dtype=np.int32)
    names: dict[str, int] = {}
    return np.array(
        [names.setdefault(str(c), len(names)) if c else -1 for c in categories], dtype=np.int32
    )


def split_users(
    events: EventsData, lines: Mapping[str, Timeline], validation_fraction: float, seed: int
) -> tuple[list, list]:
    """Train and validation shoppers, drawn by ``seed`` from the shoppers ordered by a digest of
    their histories: the split depends on what the shoppers did, not on their ids, so a build whose
    ids are keyed hashes (an exported event log) splits the same way whatever the secret."""
    users = list(lines)
    shuffled = sorted(users, key=lambda user: _history_digest(events, lines[user]))
    np.random.default_rng(seed).shuffle(shuffled)
    cut = round(len(shuffled) * validation_fraction)
    validation = set(shuffled[:cut])
    return [u for u in users if u not in validation], [u for u in users if u in validation]


def _history_digest(events: EventsData, line: Timeline) -> bytes:
    """A digest of (timestamp, product, event type) over the shopper's events, in an order that does
    not depend on the file's (events of one basket often share a timestamp)."""
    columns = [events.timestamps, events.product_ids, events.events]
    values = [column[line.positions] for column in columns]
    order = np.lexsort(values[::-1])
    digest = hashlib.blake2b(digest_size=16)
    for column in values:
        digest.update(np.ascontiguousarray(column[order]).tobytes())
    return digest.digest()


@dataclass(frozen=True)
class Case:
    """A shopper as of before one of their baskets, and what that basket held."""

    user: str
    view: UserView
    label: set[int]  # product ids


@dataclass(frozen=True)
class HistoryCut:
    """The shop as it was before each shopper's basket ``from_end`` from the end (1: the last): its
    item statistics and every shopper's profile then. The shoppers' neighbourhoods are keyed by
    their plain ids here (in memory only)."""

    from_end: int
    catalogue: CatalogueData
    items: ShopItems
    profiles: dict[str, Profile]
    lines: Mapping[str, Timeline]
    events: EventsData

    @classmethod
    def of(
        cls,
        catalogue: CatalogueData,
        events: EventsData,
        lines: Mapping[str, Timeline],
        from_end: int,
    ) -> HistoryCut:
        """``from_end`` 0 is the whole history."""
        items = shop_items(catalogue, events, lines, lambda line: line.baskets - from_end)
        profiles = {
            user: replay(events, line.before(events, line.baskets - from_end))
            for user, line in tqdm(lines.items(), desc=f"profiles ({from_end} held out)")
        }
        return cls(from_end, catalogue, items, profiles, lines, events)

    def recommender(self, dense: DenseIndex, k: int, alpha: float) -> Recommender:
        """Candidates and features as of the cut, with TIFU-KNN's parameters ``k`` and ``alpha``."""
        plain = Recommender(self.items, dense, self.catalogue.product_ids)
        return plain.with_shoppers(plain.shopper_vectors(self.profiles.items(), k, alpha))

    def cases(self, users: Sequence[str], recommender: Recommender) -> list[Case]:
        """Each shopper with at least one basket before the cut, and the basket at the cut."""
        out = []
        for user in users:
            line = self.lines[user]
            basket = line.baskets - self.from_end
            if basket < 1:
                continue
            view = recommender.view(self.profiles[user], user)
            out.append(Case(user, view, line.items(self.events, basket)))
        return out


def bought_before(case: Case, recommender: Recommender) -> set[int]:
    """The product ids the shopper had bought before the case's basket."""
    view = case.view
    return set(recommender.product_ids[view.rows[view.purchases > 0]].tolist())


def top_ids(ids: np.ndarray, scores: np.ndarray, k: int) -> list[int]:
    """The ``k`` ids of the highest scores, ties by id."""
    return ids[np.lexsort((ids, -scores))][:k].tolist()


def ranked(
    case: Case,
    recommender: Recommender,
    scorer: Callable[[np.ndarray], np.ndarray],
    k: int,
    new_only: bool = False,
) -> list[int]:
    """The top-``k`` product ids for a case, as the recommend endpoint ranks them."""
    rows, features = recommender.shortlist(case.view, new_only)
    return top_ids(recommender.product_ids[rows], scorer(features), k)


def recall(top: Sequence[int], label: set[int]) -> float:
    return len(label.intersection(top)) / len(label) if label else 0.0


@dataclass(frozen=True)
class BasketQuery:
    """A search a shopper could have made for part of a basket: a category name as the query, the
    basket's items of that category as the relevant answers, and every product of the category
    as the ones that match it."""

    case: Case
    query: str
    relevant: frozenset[int]
    category: frozenset[int]


def basket_queries(cases: Sequence[Case], catalogue: CatalogueData) -> list[BasketQuery]:
    """One query per (shopper, category of a basket item); none for a catalogue without categories."""
    categories = catalogue.extra.get("category")
    if categories is None:
        return []
    leaf = {
        pid: category_leaf(c)
        for pid, c in zip(catalogue.product_ids.tolist(), categories, strict=True)
    }
    members: dict[str, set[int]] = {}
    for pid, name in leaf.items():
        members.setdefault(name, set()).add(pid)
    category = {name: frozenset(ids) for name, ids in members.items()}  # shared by its queries
    out = []
    for case in cases:
        by_leaf: dict[str, set[int]] = {}
        for pid in sorted(case.label):
            if leaf[pid]:
                by_leaf.setdefault(leaf[pid], set()).add(pid)
        out.extend(
            BasketQuery(case, q, frozenset(ids), category[q]) for q, ids in sorted(by_leaf.items())
        )
    return out
