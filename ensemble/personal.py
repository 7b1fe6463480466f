"""Personalisation at serving time: recommendations for a shopper, a shopper's affinity for the
candidates of a search, and live events. Loaded from a store built with ``--events``.

The profiles are read from the live profile store named by $SHOPSERVE_PROFILE_STORE (``shopserve
serve`` sets it, seeded from the build's snapshot); without it, from the build's snapshot, read-only
(the in-process reference of a store as built).
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import store
from .catalogue import LiveCatalogue, follow_catalogue_log, refresh_catalogue
from .dense import VectorIndex, served_dense
from .events import EventIngest, EventRequest, KnownProducts
from .explain import Explanation, RecommendExplainer, popular_for_newcomers
from .filters import Attributes, load_attributes, parse_filter
from .models import OnnxRanker
from .neighbours import NEIGHBOURS_FILE, ShopperVectors
from .postprocess import PostProcessor, SearchResult
from .profile_store import (
    PROFILE_STORE_ENV,
    STORE_ERRORS,
    ProfileStore,
    ProfileStoreUnavailable,
    failure_reason,
    open_store,
)
from .profiles import USER_KEY_ENV, USER_KEY_FILE_ENV, Profile, UserKeys, WrongUserKeyError
from .recommend import EXPLORE_FILE, ITEMS_FILE, Recommender, ShopItems, UserView
from .validation import check_flag, check_top_k, decode_user_id

log = logging.getLogger("shopserve.recommend")

PROFILES_FILE = "profiles.sqlite"


def snapshot_path(repository: Path, version: int | None = None) -> Path:
    """The profiles as the build left them (the seed of the live store)."""
    return store.version_dir(repository, store.RECOMMEND, version) / PROFILES_FILE


def check_user_key(keys: UserKeys, repository: Path, version: int) -> bool:
    """Raise WrongUserKeyError unless ``keys`` is the secret version ``version`` was built with;
    False when the build recorded no fingerprint (nothing to check)."""
    built = store.built_user_key(repository, version)
    if built is None:
        return False
    if built != keys.fingerprint():
        raise WrongUserKeyError(
            f"the user-id secret given (${USER_KEY_FILE_ENV} or ${USER_KEY_ENV}) is not the one "
            f"version {version} of {repository} was built with (fingerprint "
            f"{keys.fingerprint()}, the build's {built}): every shopper would look unknown. "
            "Give the build's secret"
        )
    return True


def profile_namespace(repository: Path, version: int | None = None) -> str:
    """Names this store's profiles in a shared live store: a digest of the build's snapshot, so
    servers of the same build share them and another build starts from its own (``version``: the
    newest build's)."""
    repository = Path(repository)
    path = (
        repository / store.MANIFEST_FILE
        if version is None
        else store.version_manifest(repository, version)
    )
    relative = str(snapshot_path(repository, version).relative_to(repository))
    return "profiles-" + json.loads(path.read_text())["files"][relative][:16]


class BuildProducts:
    """Whether a product is in a served build's catalogue, loaded on first use: replaying logged
    events over the build's profiles needs it, a start whose live store is current does not."""

    def __init__(self, repository: Path, version: int | None = None) -> None:
        self.repository, self.version = repository, version

    @functools.cached_property
    def _rows(self) -> store.ProductRows:
        return store.load_catalogue(self.repository, self.version).product_rows()

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._rows


PERSONAL_WEIGHT = "personal_weight"  # the search config parameter the build fits
# Personalised search: the shopper's history re-orders the candidates the search ranker scores
# within this many logits of its best one, and never lifts one it scores further below (chocolate
# almonds bought every week stay out of the top of "eggs"). On the Instacart basket queries a
# personalised top 1 this far below the best was in the queried aisle about a third of the time.
HISTORY_MARGIN = 5.0
# Where the catalogue has categories, history re-orders only candidates in a category that one of
# the query's this many best matches is in. A small catalogue's candidates for "organic milk"
# include every organic product, all within the margin; without this, a shopper's strawberries
# came first.
HISTORY_CATEGORY_MATCHES = 10


def history_weights(
    query_logits: np.ndarray, weight: float, categories: np.ndarray | None = None
) -> np.ndarray:
    """Each candidate's weight of the shopper's affinity in ``query + weight x affinity``:
    ``weight`` within HISTORY_MARGIN of the best query logit and, given the candidates'
    ``categories`` (-1: none), in a category of one of the HISTORY_CATEGORY_MATCHES best; else 0.
    A candidate without a category is of no known kind: it gets none, unless none of the best has
    a category either (a catalogue without them), where the margin alone decides."""
    within = query_logits >= query_logits.max(initial=-np.inf) - HISTORY_MARGIN
    if categories is not None:
        best = categories[np.argsort(-query_logits, kind="stable")[:HISTORY_CATEGORY_MATCHES]]
        kinds = best[best >= 0]
        if kinds.size:
            within &= np.isin(categories, kinds)
    return np.where(within, weight, 0.0).astype(query_logits.dtype)


@dataclass(frozen=True)
class Fused:
    """A personalised search's logits: ``query + weights x (affinity - lift)``."""

    logits: np.ndarray
    weights: np.ndarray  # history_weights: the fitted weight where history counts, 0 elsewhere
    lift: float  # the most negative affinity where history counts, or 0 where none is negative


def fuse(
    query_logits: np.ndarray,
    affinity: np.ndarray,
    weight: float,
    categories: np.ndarray | None = None,
) -> Fused:
    """The query's logits with the shopper's affinity added where history counts (see
    history_weights). A ranker's logit can be negative: the affinities there are lifted by the
    most negative of them, so that history re-orders the good matches (the same order as
    ``query + weight x affinity``) and never pushes one below a candidate it does not count for.
    Affinities of 0 or more are not moved."""
    weights = history_weights(query_logits, weight, categories)
    within = weights > 0
    lift = min(0.0, float(affinity[within].min())) if within.any() else 0.0
    shifted = (affinity - np.float32(lift)).astype(query_logits.dtype)
    return Fused(query_logits + weights * shifted, weights, lift)


@dataclass
class Personalization:
    recommender: Recommender
    ranker: OnnxRanker
    explorer: OnnxRanker  # ranks NEW_ONLY answers (products the shopper never bought)
    profiles: ProfileStore
    keys: UserKeys
    search_weight: float  # personalised search: query logit + weight x affinity (fuse)

    @classmethod
    def from_repository(
        cls,
        repository: Path,
        dense: VectorIndex,
        catalogue: store.Catalogue,
        version: int | None = None,
    ) -> Personalization | None:
        """The personalisation of a built store, or None when it was built without events."""
        if not store.version_dirs(repository, store.RECOMMEND):
            return None
        version_dir = store.version_dir(repository, store.RECOMMEND, version)
        if not (version_dir / ITEMS_FILE).exists():
            return None
        weight = store.config_parameters(repository, store.SEARCH, version).get(
            PERSONAL_WEIGHT, "0"
        )
        live = os.environ.get(PROFILE_STORE_ENV)
        keys = UserKeys.from_environment()
        return cls(
            Recommender(
                ShopItems.load(version_dir / ITEMS_FILE),
                dense,
                catalogue.product_ids,
                ShopperVectors.load(version_dir / NEIGHBOURS_FILE),
                catalogue.product_rows(),
            ),
            OnnxRanker(store.model_file(repository, store.REC_RANKER, version), 1),
            OnnxRanker(store.version_dir(repository, store.REC_RANKER, version) / EXPLORE_FILE, 1),
            open_store(live, namespace=profile_namespace(repository), log_name=keys.log_name())
            if live
            else open_store(version_dir / PROFILES_FILE, readonly=True),
            keys,
            float(weight),
        )

    @classmethod
    def load(
        cls, repository: Path, version: int | None = None
    ) -> tuple[Personalization, store.Catalogue]:
        """A personalised store's personalisation and catalogue, with the dense index it reads."""
        dense = served_dense(repository, version)
        catalogue = store.load_catalogue(repository, version)
        personal = cls.from_repository(repository, dense, catalogue, version)
        if personal is None:
            raise FileNotFoundError(f"{repository} was built without behaviour data (--events)")
        return personal, catalogue

    def view(self, user_id: str) -> UserView | None:
        """What the store knows of this shopper; None for a shopper it has never seen."""
        key = self.keys.key(user_id)
        try:
            profile: Profile | None = self.profiles.get(key)
        except STORE_ERRORS as exc:
            raise ProfileStoreUnavailable(
                f"the profile store could not be read ({type(exc).__name__})"
            ) from exc
        return None if profile is None else self.recommender.view(profile, key)

    def explainer(self, title: Callable[[int], str]) -> RecommendExplainer:
        """Explains affinities (``title``: a catalogue row's title, for the words)."""
        return RecommendExplainer(self.recommender, self.ranker, self.explorer, title)

    def affinity(
        self, user: UserView, rows: np.ndarray, new_only: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The recommendation ranker's logit for each candidate row (the NEW_ONLY ranker's, for
        products the shopper never bought), and the feature rows it ranked (None when some rows
        are products added since the build: they have no history, and no features)."""
        known = rows < len(self.recommender.product_ids)
        if known.all():
            features = self.recommender.features(user, rows)
            return self.rank(features, new_only), features
        # Products added since the build: the least affinity among the candidates.
        affinity = np.zeros(len(rows), dtype=np.float32)
        if known.any():
            affinity[known] = self.rank(self.recommender.features(user, rows[known]), new_only)
            affinity[~known] = affinity[known].min()
        return affinity, None

    def categories(self, rows: np.ndarray) -> np.ndarray:
        """Each candidate row's category as the build coded it (-1: none, and for products
        added since the build)."""
        coded = self.recommender.items.categories
        known = rows < len(coded)
        out = np.full(len(rows), -1, dtype=coded.dtype)
        out[known] = coded[rows[known]]
        return out

    def rank(self, features: np.ndarray, new_only: bool = False) -> np.ndarray:
        """The recommendation ranker's logits for feature rows (the NEW_ONLY ranker's)."""
        return (self.explorer if new_only else self.ranker)(features)


class RecommendPipeline:
    """USER_ID, TOP_K -> the shopper's top-k products; popular items for an unknown shopper."""

    def __init__(
        self,
        personalization: Personalization,
        postprocessor: PostProcessor,
        attributes: Attributes | None = None,
        live: LiveCatalogue | None = None,
    ) -> None:
        self.personal = personalization
        self.postprocessor = postprocessor
        self.built_attributes = attributes or Attributes()
        self.live = live
        popularity = personalization.recommender.items.popularity
        ids = personalization.recommender.product_ids  # the build's (popularity is by its rows)
        self._best_sellers = np.lexsort((ids, -popularity))
        self.refusals = 0  # requests refused because the profile store could not be read
        self.explainer = personalization.explainer(lambda row: postprocessor.catalogue.titles[row])

    @classmethod
    def from_repository(
        cls, repository: Path | str, version: int | None = None
    ) -> RecommendPipeline:
        repository = Path(repository)
        personal, catalogue = Personalization.load(repository, version)
        attributes = load_attributes(repository, version)
        live = follow_catalogue_log(repository, version, catalogue, attributes)
        return cls(personal, PostProcessor(live or catalogue), attributes, live)

    def _allowed(self, filters: Mapping[str, object] | None) -> np.ndarray | None:
        """The build's rows a request may be answered with: its filter, minus delisted products."""
        if self.live is None:
            return self.built_attributes.allowed(parse_filter(filters))
        refresh_catalogue(self.live)
        return self.live.base_allowed(self.live.attributes.allowed(parse_filter(filters)))

    def recommend(
        self,
        user_id: str | bytes | np.ndarray,
        k: int | np.ndarray = 10,
        new_only: bool | np.ndarray | None = None,
        filters: Mapping[str, object] | None = None,
        explain: bool | np.ndarray | None = None,
    ) -> SearchResult:
        """The shopper's top-k; with ``new_only``, only products they never bought; with
        ``filters`` (filter inputs by name), only products that pass them; with ``explain``,
        each hit's reasons (shopserve.ensemble.explain)."""
        user_text = decode_user_id(user_id)
        count = check_top_k(k)
        discover = check_flag(new_only, "NEW_ONLY")
        reasons = check_flag(explain, "EXPLAIN")
        allowed = self._allowed(filters)
        try:
            user = self.personal.view(user_text)
        except ProfileStoreUnavailable as exc:
            self.refusals += 1
            log.warning("%s: recommend refused (UNAVAILABLE, retryable)", exc)
            raise
        if user is None:
            return self.cold_start(count, allowed, reasons)
        rows, features = self.personal.recommender.shortlist(user, discover, allowed)
        scores = self.personal.rank(features, discover) if rows.size else np.empty(0)
        explain = None
        if reasons:

            def explain(positions: np.ndarray) -> list[Explanation]:
                return self.explainer(
                    user, rows[positions], scores[positions], discover, features[positions]
                )

        return self.postprocessor(rows, scores, count, explain=explain)

    def cold_start(
        self, k: int, allowed: np.ndarray | None = None, explain: bool = False
    ) -> SearchResult:
        """The shop's most popular (allowed) items, scored by their share of purchases (with
        ``explain``, each hit's one reason says so)."""
        popularity = self.personal.recommender.items.popularity
        catalogue = self.postprocessor.catalogue
        best = (
            self._best_sellers
            if allowed is None
            else self._best_sellers[allowed[self._best_sellers]]
        )
        rows = best[:k]
        share = popularity[rows] / max(float(popularity.sum()), 1.0)
        titles = [catalogue.titles[r] for r in rows.tolist()]
        return SearchResult(
            catalogue.product_ids[rows],
            share.astype(np.float32),
            titles,
            explanations=[popular_for_newcomers(s) for s in share.tolist()] if explain else None,
        )


class LiveEvents:
    """The events and forget endpoints' logic over the live profile store."""

    def __init__(self, personalization: Personalization, live: LiveCatalogue | None = None) -> None:
        self.personal = personalization
        self.live = live
        self.ingest = EventIngest(personalization.profiles, personalization.keys)
        self.refusals = 0  # requests refused because the store failed (a metric counts them)

    @classmethod
    def from_repository(cls, repository: Path | str, version: int | None = None) -> LiveEvents:
        repository = Path(repository)
        personal, catalogue = Personalization.load(repository, version)
        return cls(personal, follow_catalogue_log(repository, version, catalogue, Attributes()))

    def known_products(self) -> KnownProducts:
        """Which products events may name now: the build's, less those delisted since (a product
        added since takes events from the next build on)."""
        if self.live is None:
            return lambda ids: self.personal.recommender.rows_of(ids) >= 0
        refresh_catalogue(self.live)
        return self.live.listed_in_build

    def record(self, requests: list[EventRequest]) -> list[int]:
        """Commit the requests together; how many events of each were new. When the store fails
        (a full disk, Redis down or full) none of them is written: ProfileStoreUnavailable."""
        try:
            return self.ingest.ingest(requests)
        except self.personal.profiles.FAILURES as exc:
            raise self._refused(
                "the profile store did not take the events", exc, len(requests)
            ) from exc

    def forget(
        self, user_id: str | bytes | np.ndarray, given_key: object, operator_key: str | None
    ) -> bool:
        """Erase a shopper, for a caller holding the operator's key (ProfileStoreUnavailable, and
        nothing erased, when the store fails)."""
        check_operator_key("forget", given_key, operator_key)
        keys = self.personal.keys.keys_to_erase(decode_user_id(user_id))
        try:
            return any([self.personal.profiles.forget(key) for key in keys])  # every one erased
        except self.personal.profiles.FAILURES as exc:
            raise self._refused("the profile store did not erase the shopper", exc, 1) from exc

    def _refused(self, what: str, exc: Exception, requests: int) -> ProfileStoreUnavailable:
        """Count and log a store failure; the error the requests get (retryable)."""
        self.refusals += requests
        log.warning(
            "%s (%s): %d request(s) refused (UNAVAILABLE, retryable)",
            what,
            failure_reason(exc),
            requests,
        )
        return ProfileStoreUnavailable(f"{what}: {type(exc).__name__}")


class OperatorKeyError(PermissionError):
    """An operation reserved for operators was asked without their key."""


def check_operator_key(action: str, given_key: object, operator_key: str | None) -> None:
    """Raise OperatorKeyError unless ``given_key`` is the operator's key (and the server has one)."""
    if not operator_key:
        raise OperatorKeyError(
            f"{action} needs the operator's key, and this server has none: start it with "
            "shopserve serve --admin-key-file FILE"
        )
    if not isinstance(given_key, str) or not hmac.compare_digest(
        given_key.encode("utf-8"), operator_key.encode("utf-8")
    ):
        raise OperatorKeyError(
            f"{action} requires the operator's key (request parameter admin_key)"
        )
