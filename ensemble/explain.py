"""Reasons for an answer: each hit's ranker logit split exactly into the signals that made it.

A *signal* is a group of the ranker's feature columns that mean one thing to a shopper (the words of
the query in the title; the shopper's own purchases of the product). A hit's contribution from each
signal is its exact Shapley value in a game whose players are the signals: the value of a coalition
is the ranker's logit for the hit with the coalition's columns at the hit's values and every other
column at the *reference*, the lowest value the ranker saw in training (the low end of its input
range, recorded in the model; 0 for a column without one, such as the fusion's z-scores). So

    logit = reference logit + sum of the contributions

exactly (up to float32 rounding), whatever the ranker. For the monotone rankers every behavioural and
relevance signal starts from its lowest value, so its contribution is never negative: it is how much
that signal lifted the hit. Only the context signals (the shopper's buying habits) may be negative.

With G signals the game has 2**G coalitions a hit (16 for search, 128 for recommend). For a learned
ranker, whose contract records its calibrated network (models.CalibratedNetwork), the additive part
of the logit is split by its terms and only the small interaction network is valued for every
coalition, in NumPy; for any other ranker the ranker values them, in one call (fewer rows when a
signal sits at the reference in the hit). Either way only when a request sets EXPLAIN, and only
for the hits returned.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np

from .features import FEATURE_NAMES
from .models import CalibratedNetwork, OnnxRanker
from .recommend import REC_FEATURE_NAMES, Recommender, UserView

# The signals of search and of recommend: every feature column belongs to exactly one.
SEARCH_SIGNALS: Mapping[str, tuple[str, ...]] = {
    "meaning": ("cosine", "cosine_z"),
    "bm25": ("bm25_ratio", "bm25_z"),
    "words": ("query_coverage", "title_coverage"),
    "spelling": ("query_trigram_coverage", "title_trigram_coverage"),
}
RECOMMEND_SIGNALS: Mapping[str, tuple[str, ...]] = {
    "your_purchases": ("repeat_share", "recent_share", "purchases", "recency"),
    "your_basket": ("cooccurrence",),
    "similar_shoppers": ("neighbour_share", "tifu_knn", "also_bought"),
    "your_taste": ("taste_cosine", "category_share"),
    "popularity": ("popularity",),
    "your_browsing": ("engagement",),
    "habits": ("repeat_rate", "due", "history", "repeat_habit"),
}
NEW_PRODUCT = "new_product"  # personalised search: a product added since the build (no history)


@dataclass(frozen=True)
class Reason:
    signal: str
    contribution: float  # in logit units
    text: str


@dataclass(frozen=True)
class Explanation:
    """Why a hit scored as it did: ``logit == reference + sum of the reasons' contributions``;
    the reasons come largest (in magnitude) first."""

    logit: float
    reference: float
    reasons: tuple[Reason, ...]

    def to_json(self) -> str:
        reasons = [
            {"signal": r.signal, "contribution": r.contribution, "text": r.text}
            for r in self.reasons
        ]
        document = {"logit": self.logit, "reference": self.reference, "reasons": reasons}
        return json.dumps(document, ensure_ascii=False)

    def scaled(self, weight: float) -> Explanation:
        return Explanation(
            self.logit * weight,
            self.reference * weight,
            tuple(Reason(r.signal, r.contribution * weight, r.text) for r in self.reasons),
        )

    def moved(self, by: float) -> Explanation:
        """The explanation of ``logit + by``: the reference moves with it, the reasons stay."""
        return Explanation(self.logit + by, self.reference + by, self.reasons)

    def plus(self, other: Explanation) -> Explanation:
        """The explanation of the sum of two logits (a query's and a shopper's)."""
        return _explanation(
            self.logit + other.logit, self.reference + other.reference, self.reasons + other.reasons
        )


def _explanation(logit: float, reference: float, reasons: Sequence[Reason]) -> Explanation:
    ordered = sorted(reasons, key=lambda r: (-abs(r.contribution), r.signal))
    return Explanation(float(logit), float(reference), tuple(ordered))


@dataclass(frozen=True)
class _Game:
    """Every coalition of ``players`` (a boolean row each, [2**players, players]) and the linear
    map from a game's worths to its Shapley values: phi = worth @ shapley, where each player's
    column weighs each coalition with it by +w and the same coalition without it by -w."""

    coalitions: np.ndarray
    shapley: np.ndarray  # [2**players, players], float64

    @classmethod
    @functools.cache
    def of(cls, players: int) -> _Game:
        coalitions = np.array(list(product((False, True), repeat=players)), dtype=bool)
        weights = np.array(
            [
                math.factorial(s) * math.factorial(players - s - 1) / math.factorial(players)
                for s in range(players)
            ]
        )
        bits = 1 << np.arange(players - 1, -1, -1)  # coalition index = its row read as binary
        shapley = np.zeros((len(coalitions), players))
        for g in range(players):
            without = np.flatnonzero(~coalitions[:, g])
            weight = weights[coalitions[without].sum(axis=1)]
            shapley[without + bits[g], g] = weight
            shapley[without, g] = -weight
        return cls(coalitions, shapley)

    def values(self, worth: np.ndarray) -> np.ndarray:
        """Shapley values [rows, players] from each row's coalition worths [rows, 2**players]."""
        return worth @ self.shapley


class ShapleyExplainer:
    """Exact Shapley values of a ranker's signals against its reference candidate."""

    def __init__(
        self,
        ranker: OnnxRanker,
        feature_names: Sequence[str],
        signals: Mapping[str, Sequence[str]],
    ) -> None:
        column = {name: i for i, name in enumerate(feature_names)}
        grouped = sorted(column[name] for columns in signals.values() for name in columns)
        if grouped != list(range(len(feature_names))):
            raise ValueError("every feature column must belong to exactly one signal")
        self.ranker = ranker
        self.signals = tuple(signals)
        ranges = {f["name"]: f for f in (ranker.contract or {}).get("features", [])}
        self.reference = np.array(
            [ranges[n]["low"] if n in ranges else 0.0 for n in feature_names], dtype=np.float32
        )
        self.member = np.zeros((len(self.signals), len(feature_names)), dtype=bool)
        for g, columns in enumerate(signals.values()):
            self.member[g, [column[name] for name in columns]] = True
        self.reference_logit = float(ranker(self.reference.reshape(1, -1))[0])
        highs = [ranges[n]["high"] if n in ranges else 1.0 for n in feature_names]
        check = np.stack([self.reference, np.array(highs), (self.reference + highs) / 2])
        self.network = CalibratedNetwork.of(ranker, check)
        if self.network is not None:
            self.calibrated_reference = self.network.calibrate(self.reference[None])[0]
            self.calibrated_member = self.member[:, self.network.columns]

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """Each signal's contribution to each row's logit, float64 [rows, signals].

        A signal whose columns sit at the reference in a row (a product the shopper never
        bought: their purchases) is a null player in that row's game: its value is exactly 0,
        and leaving it out changes no other value."""
        features = np.asarray(features, dtype=np.float32)
        moved = (self.member[None] & (features != self.reference)[:, None, :]).any(axis=-1)
        if self.network is None:
            return self._played_by_the_ranker(features, moved)
        return np.where(moved, self._split_along_the_network(features), 0.0)

    def _split_along_the_network(self, features: np.ndarray) -> np.ndarray:
        """The values for a ranker whose contract records its calibrated network. Its sum of
        calibrated columns is additive, so each signal's share of it is its own columns' rise from
        the reference. The interaction network's input is linear in the coalition (the reference
        plus each member's rise), so its worth for every coalition of every row comes from one
        product with the coalitions, in NumPy, and goes through the game."""
        network = self.network
        rise = network.calibrate(features) - self.calibrated_reference  # [rows, columns]
        member = self.calibrated_member.astype(np.float64)  # [signals, columns]
        additive = rise @ member.T
        lift = (rise[:, None, :] * member[None]) @ network.w1  # [rows, signals, hidden]
        game = _Game.of(len(self.signals))
        base = self.calibrated_reference @ network.w1 + network.b1
        worth = np.tanh(base + game.coalitions.astype(np.float64) @ lift) @ network.w2
        return additive + game.values(worth)

    def _played_by_the_ranker(self, features: np.ndarray, moved: np.ndarray) -> np.ndarray:
        """The values for any other ranker: each row's game played by the signals that moved in
        it, rows with the same movers together (half the ranker rows for each signal left out),
        every row's coalitions valued by the ranker in one call."""
        contributions = np.zeros((len(features), len(self.signals)))
        patterns, pattern_of = np.unique(moved, axis=0, return_inverse=True)
        games = []
        for index, pattern in enumerate(patterns):
            active = np.flatnonzero(pattern)
            if len(active):
                games.append((np.flatnonzero(pattern_of.ravel() == index), active))
        if not games:
            return contributions
        hybrids = [self._coalition_rows(features[rows], active) for rows, active in games]
        values = self.ranker(np.concatenate(hybrids)).astype(np.float64)
        start = 0
        for (rows, active), hybrid in zip(games, hybrids, strict=True):
            worth = values[start : start + len(hybrid)].reshape(len(rows), -1)
            contributions[np.ix_(rows, active)] = _Game.of(len(active)).values(worth)
            start += len(hybrid)
        return contributions

    def _coalition_rows(self, features: np.ndarray, active: np.ndarray) -> np.ndarray:
        """Every coalition of the ``active`` signals for each row: [rows x 2**active, columns]."""
        game = _Game.of(len(active))
        takes_hit = game.coalitions.astype(np.int8) @ self.member[active].astype(np.int8) > 0
        hybrid = np.where(takes_hit[None], features[:, None, :], self.reference[None, None])
        return hybrid.reshape(-1, features.shape[1])

    def explain(
        self, features: np.ndarray, logits: np.ndarray, texts: Callable[[int], Mapping[str, str]]
    ) -> list[Explanation]:
        """One explanation per row; ``texts(i)`` gives row i's words for each signal."""
        contributions = self(features)
        explanations = []
        for i, values in enumerate(contributions):
            words = texts(i)
            reasons = [
                Reason(signal, float(value), words[signal])
                for signal, value in zip(self.signals, values, strict=True)
            ]
            explanations.append(_explanation(logits[i], self.reference_logit, reasons))
        return explanations


def _percent(value: float) -> str:
    """A share in words, never rounded to 0 % or 100 % when it is neither."""
    if 0 < value < 0.01:
        return "under 1 %"
    if 0.99 < value < 1:
        return "over 99 %"
    return f"{100 * value:.0f} %"


def search_texts(features: np.ndarray) -> Mapping[str, str]:
    """The words for each search signal of one candidate's feature row."""
    value = dict(zip(FEATURE_NAMES, features.tolist(), strict=True))
    return {
        "meaning": f"cosine {value['cosine']:.2f} between the meanings of the query and the title",
        "bm25": f"BM25 {_percent(value['bm25_ratio'])} of the catalogue's best match",
        "words": f"{_percent(value['query_coverage'])} of the query's words in the title, "
        f"{_percent(value['title_coverage'])} of the title's in the query",
        "spelling": f"{_percent(value['query_trigram_coverage'])} of the query's letter "
        "triples in the title",
    }


class SearchExplainer:
    """Explanations of search hits (the query ranker's signals)."""

    def __init__(self, ranker: OnnxRanker) -> None:
        self.shapley = ShapleyExplainer(ranker, FEATURE_NAMES, SEARCH_SIGNALS)

    def __call__(self, features: np.ndarray, logits: np.ndarray) -> list[Explanation]:
        return self.shapley.explain(features, logits, lambda i: search_texts(features[i]))


def _times(count: int) -> str:
    return "once" if count == 1 else "twice" if count == 2 else f"{count} times"


def _baskets_ago(ago: int) -> str:
    if ago == 0:
        return "in your latest basket"
    return "1 basket ago" if ago == 1 else f"{ago} baskets ago"


class RecommendExplainer:
    """Explanations of a shopper's recommendations (the recommendation rankers' signals)."""

    def __init__(
        self,
        recommender: Recommender,
        ranker: OnnxRanker,
        explorer: OnnxRanker,
        title: Callable[[int], str],
    ) -> None:
        self.recommender = recommender
        self.rankers = {
            new_only: ShapleyExplainer(model, REC_FEATURE_NAMES, RECOMMEND_SIGNALS)
            for new_only, model in ((False, ranker), (True, explorer))
        }
        self.title = title  # a catalogue row's title

    def __call__(
        self,
        user: UserView,
        rows: np.ndarray,
        logits: np.ndarray,
        new_only: bool = False,
        features: np.ndarray | None = None,
    ) -> list[Explanation]:
        """One explanation per row of ``rows`` (catalogue rows) with its ``logits`` (the
        affinity the ranker gave it) and, when the caller has them, its ``features``. A row
        added to the catalogue since the build has no features: its one reason is that it is
        new."""
        rows = np.asarray(rows, dtype=np.int64)
        logits = np.asarray(logits, dtype=np.float32)
        shapley = self.rankers[new_only]
        known = np.flatnonzero(rows < len(self.recommender.product_ids))
        if features is None or len(known) < len(rows):
            features = self.recommender.features(user, rows[known])
        history = user.positions(rows[known])
        mates = self.recommender.items.basket_mates.strongest(user.recent, rows[known])
        explained = shapley.explain(
            features,
            logits[known],
            lambda i: self.texts(
                user, int(history[i]), features[i], (int(mates[0][i]), float(mates[1][i]))
            ),
        )
        by_row = dict(zip(known.tolist(), explained, strict=True))
        return [
            by_row.get(i) or self._new_product(float(logit), shapley.reference_logit)
            for i, logit in enumerate(logits.tolist())
        ]

    @staticmethod
    def _new_product(logit: float, reference: float) -> Explanation:
        text = "added to the catalogue since the build: no shopper's history has it yet"
        return _explanation(logit, reference, [Reason(NEW_PRODUCT, logit - reference, text)])

    def texts(
        self, user: UserView, at: int, features: np.ndarray, mate: tuple[int, float]
    ) -> Mapping[str, str]:
        """The words for each recommendation signal of one candidate (``at``: its position in
        the shopper's history, -1 if it is not there; ``mate``: the row in their basket most
        often bought with it, and how often, or -1)."""
        value = dict(zip(REC_FEATURE_NAMES, features.tolist(), strict=True))
        bought = at >= 0 and user.purchases[at] > 0
        ago = user.baskets - 1 - int(user.last_basket[at]) if bought else 0
        return {
            "your_purchases": (
                f"you bought it {_times(int(user.purchases[at]))}, in "
                f"{int(user.baskets_with[at])} of your {user.baskets} baskets, last "
                f"{_baskets_ago(ago)}"
                if bought
                else "you have not bought it before"
            ),
            "your_basket": (
                f"in {_percent(mate[1])} of the baskets with {self.title(mate[0])}, which is in "
                "your basket"
                if mate[0] >= 0
                else "not often bought with what is in your basket"
            ),
            # TIFU-KNN's score is mostly the shopper's own recent baskets (alpha): say so
            "similar_shoppers": f"TIFU-KNN {value['tifu_knn']:.2f} (your recent baskets with "
            "those of shoppers like you, who have it in "
            f"{_percent(value['neighbour_share'])} of theirs); {value['also_bought']:.2f} alike "
            "to what you buy",
            "your_taste": f"close to what you buy (cosine {value['taste_cosine']:.2f}); "
            f"{_percent(value['category_share'])} of your purchases are in its category",
            "popularity": f"in the top {_top(value['popularity'])} of the shop's products by "
            "purchases",
            "your_browsing": (
                f"you viewed or carted it {_times(int(user.engagement[at]))}"
                if at >= 0 and user.engagement[at] > 0
                else "you have not viewed it"
            ),
            "habits": (
                f"{_habit(ago, value['due'])}; its buyers buy it again "
                f"{_percent(value['repeat_rate'])} of the time"
                if bought
                else f"{_percent(value['repeat_habit'])} of your purchases are repeats"
            ),
        }


def _top(percentile: float) -> str:
    return f"{max(1, math.ceil(100 * (1 - percentile) - 1e-9))} %"


def _habit(ago: int, due: float) -> str:
    if ago == 0:
        return "you bought it in your latest basket"
    return f"{due:.1f}× the usual gap between your purchases of it has passed"


def popular_for_newcomers(share: float) -> Explanation:
    """A shopper the store does not know gets the best sellers: the score is the product's share
    of the shop's purchases, not a logit, so the one reason carries no contribution."""
    text = f"a best seller ({share:.2%} of the shop's purchases); we do not know you yet"
    return Explanation(0.0, 0.0, (Reason("popularity", 0.0, text),))
