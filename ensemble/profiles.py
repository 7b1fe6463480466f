"""Shoppers' profiles: what each one did, folded event by event, under a keyed hash of their id.

The same :meth:`Profile.apply` folds the release build's history and (later) live events, so a profile
built at release time and one updated live mean the same. A profile keeps, per product: purchases, the
number of baskets it was in, the first and last of those baskets, add-to-cart, click and view counts
and the last time; per shopper: the number of purchase baskets and the open basket (added to the cart
since the last purchase). The shopper's taste vector is not kept: it is the purchase-weighted sum of
the embeddings of what they bought, computed from the items where it is needed (the recommendation
step's ``UserView``), with the served build's embeddings.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shopserve.formats import EVENT_TYPES

VIEW, CLICK, ADD_TO_CART, PURCHASE = range(len(EVENT_TYPES))
SESSION_GAP_S = 30 * 60  # purchases without a basket id: a gap this long starts a new basket
# Weight of a basket one basket older in the decayed purchase frequency: TIFU-KNN's published
# within-history decay (Hu et al., KDD 2020), not a value tuned on our data.
BASKET_DECAY = 0.9

USER_KEY_ENV = "SHOPSERVE_USER_KEY"  # the secret itself (hex or text), or
USER_KEY_FILE_ENV = "SHOPSERVE_USER_KEY_FILE"  # a file that holds it
MIN_SECRET_BYTES = 16


class MissingUserKeyError(RuntimeError):
    """A personalised store needs the secret its user ids are hashed with."""


class WrongUserKeyError(MissingUserKeyError):
    """The secret given is not the one a store's user ids were hashed with: every shopper would
    look unknown, and their events would start new profiles."""


class UserKeys:
    """User ids become HMAC-SHA256 hex digests under a secret; raw ids are never stored."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise MissingUserKeyError(
                f"the user-id secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}"
            )
        self._secret = secret

    @classmethod
    def from_environment(cls) -> UserKeys:
        """The secret from $SHOPSERVE_USER_KEY, or from the file named by $SHOPSERVE_USER_KEY_FILE."""
        if os.environ.get(USER_KEY_ENV):
            return cls(os.environ[USER_KEY_ENV].strip().encode("utf-8"))
        path = os.environ.get(USER_KEY_FILE_ENV)
        if path:
            if not Path(path).is_file():
                raise MissingUserKeyError(f"${USER_KEY_FILE_ENV} names {path}, which is not a file")
            return cls(Path(path).read_bytes().strip())
        raise MissingUserKeyError(
            f"personalisation needs the user-id secret: set ${USER_KEY_FILE_ENV} to a file holding "
            f"it (create one with: shopserve keys create FILE) or ${USER_KEY_ENV}"
        )

    def key(self, user_id: str) -> str:
        """The keyed hash of a shopper's id, surrounding whitespace removed: the build reads ids
        so from its files, and a server, an import or an erasure must find the same shopper."""
        return self._hash(user_id.strip())

    def keys_to_erase(self, user_id: str) -> list[str]:
        """Where a shopper's data may be: their key, and for an id with surrounding whitespace
        also its hash as given, under which servers before 2026-12-06 stored live events."""
        return list(dict.fromkeys([self.key(user_id), self._hash(user_id)]))

    def _hash(self, text: str) -> str:
        return hmac.new(self._secret, text.encode("utf-8"), hashlib.sha256).hexdigest()

    def fingerprint(self) -> str:
        """Tells this secret from another without revealing it (a keyed digest of a constant): a
        build records it, and a server or a rollout refuses a store hashed under another one."""
        return "key-" + self.key("\x00shopserve user-key fingerprint")[:16]

    def log_name(self) -> str:
        """Names this shop's event log in a shared Redis: a keyed digest of a constant, so shops
        with different secrets never share a log, and the name reveals nothing."""
        return "log-" + self.key("\x00shopserve event log")[:16]


def new_secret() -> bytes:
    return os.urandom(32).hex().encode("ascii")


@dataclass
class ItemStats:
    purchases: int = 0
    baskets: int = 0  # how many of the shopper's baskets held it
    first_basket: int = -1
    last_basket: int = -1
    carts: int = 0
    clicks: int = 0
    views: int = 0
    last_ts: float = 0.0
    decayed: float = 0.0  # sum of BASKET_DECAY ** (baskets ago) over its baskets, as of last_basket

    def row(self) -> tuple:
        """The fields in declaration order (the store's column order)."""
        return tuple(self.__dict__.values())


@dataclass
class Profile:
    baskets: int = 0
    basket_key: str = ""  # the current basket's id (or the session it was inferred from)
    last_purchase_ts: float = 0.0
    last_ts: float = 0.0
    items: dict[int, ItemStats] = field(default_factory=dict)
    open_basket: list[int] = field(default_factory=list)  # in the cart, not yet bought

    def apply(self, product_id: int, kind: int, timestamp: float, basket_key: str) -> None:
        """Fold one event into the profile (events of one shopper arrive in time order)."""
        stats = self.items.setdefault(product_id, ItemStats())
        stats.last_ts = max(stats.last_ts, timestamp)
        self.last_ts = max(self.last_ts, timestamp)
        if kind == VIEW:
            stats.views += 1
        elif kind == CLICK:
            stats.clicks += 1
        elif kind == ADD_TO_CART:
            stats.carts += 1
            if product_id not in self.open_basket:
                self.open_basket.append(product_id)
        else:
            self._purchase(product_id, stats, timestamp, basket_key)

    def starts_basket(self, timestamp: float, basket_key: str) -> bool:
        """Whether a purchase with this basket id (or, without one, at this time) opens a basket."""
        if self.baskets == 0:
            return True
        if basket_key:
            return basket_key != self.basket_key
        return timestamp - self.last_purchase_ts > SESSION_GAP_S

    def _purchase(
        self, product_id: int, stats: ItemStats, timestamp: float, basket_key: str
    ) -> None:
        if self.starts_basket(timestamp, basket_key):
            self.baskets += 1
            self.basket_key = basket_key
        self.last_purchase_ts = timestamp
        current = self.baskets - 1
        stats.purchases += 1
        if stats.last_basket != current:
            stats.baskets += 1
            elapsed = current - stats.last_basket if stats.last_basket >= 0 else 0
            stats.decayed = stats.decayed * BASKET_DECAY**elapsed + 1.0
            stats.last_basket = current
        if stats.first_basket < 0:
            stats.first_basket = current
        if product_id in self.open_basket:
            self.open_basket.remove(product_id)

    def arrays(self) -> ItemArrays:
        ids = np.fromiter(self.items, dtype=np.int64, count=len(self.items))
        table = np.array([s.row() for s in self.items.values()], dtype=np.float64).reshape(
            len(ids), len(_STATS)
        )
        column = {name: table[:, i] for i, name in enumerate(_STATS)}
        return ItemArrays(
            ids,
            column["purchases"].astype(np.int32),
            column["baskets"].astype(np.int32),
            column["first_basket"].astype(np.int32),
            column["last_basket"].astype(np.int32),
            column["carts"].astype(np.int32),
            (column["clicks"] + column["views"]).astype(np.int32),
            column["decayed"],
        )


_STATS = tuple(ItemStats.__dataclass_fields__)


@dataclass(frozen=True)
class ItemArrays:
    """A profile's per-product history as arrays (what the features read)."""

    product_ids: np.ndarray
    purchases: np.ndarray
    baskets: np.ndarray
    first_basket: np.ndarray
    last_basket: np.ndarray
    carts: np.ndarray
    browsed: np.ndarray  # clicks + views
    decayed: np.ndarray  # decayed basket frequency, as of each item's last basket
