"""Live events: a batch is validated whole (all or nothing), then folded into the profile store.

A request carries parallel arrays USER_IDS, PRODUCT_IDS, EVENT_TYPES, TIMESTAMPS (epoch seconds),
EVENT_IDS and optionally BASKET_IDS. Each event id, with its user, is kept as a digest so that a
retried batch is counted once. Several requests that arrive together are committed in one transaction
(group commit); each is answered only after that commit.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .profile_store import ProfileStore, StoredEvent
from .profiles import EVENT_TYPES, UserKeys
from .validation import MAX_USER_ID_BYTES, InvalidRequest, decode_text

MAX_EVENTS_PER_REQUEST = 1024
MAX_EVENT_ID_BYTES = 128
MAX_FUTURE_S = 24 * 3600  # a timestamp further ahead than this is a client clock error
_KINDS = {name: kind for kind, name in enumerate(EVENT_TYPES)}


# Whether each of an array of product ids may be named by an event (a boolean array).
KnownProducts = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class EventRequest:
    """A validated batch, still under the caller's ids (hashed only when it is stored)."""

    user_ids: list[str]
    product_ids: np.ndarray
    kinds: list[int]
    timestamps: np.ndarray
    event_ids: list[str]
    basket_ids: list[str]

    def __len__(self) -> int:
        return len(self.event_ids)


def _flat(name: str, raw: object) -> np.ndarray:
    if not isinstance(raw, np.ndarray):
        raise InvalidRequest(f"{name} is missing")
    return raw.reshape(-1)


def _texts(name: str, values: np.ndarray, limit: int) -> list[str]:
    return [decode_text(v, f"{name}[{i}]", limit) for i, v in enumerate(values.tolist())]


def parse_events(
    user_ids: object,
    product_ids: object,
    event_types: object,
    timestamps: object,
    event_ids: object,
    basket_ids: object | None,
    known_products: KnownProducts,
    now: float | None = None,
) -> EventRequest:
    """Validate a whole batch; raise InvalidRequest naming the first problem found."""
    arrays = {
        "USER_IDS": _flat("USER_IDS", user_ids),
        "PRODUCT_IDS": _flat("PRODUCT_IDS", product_ids),
        "EVENT_TYPES": _flat("EVENT_TYPES", event_types),
        "TIMESTAMPS": _flat("TIMESTAMPS", timestamps),
        "EVENT_IDS": _flat("EVENT_IDS", event_ids),
    }
    if basket_ids is not None:
        arrays["BASKET_IDS"] = _flat("BASKET_IDS", basket_ids)
    lengths = {name: len(values) for name, values in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise InvalidRequest(f"the event arrays differ in length: {lengths}")
    count = lengths["EVENT_IDS"]
    if not 1 <= count <= MAX_EVENTS_PER_REQUEST:
        raise InvalidRequest(f"a batch holds 1 to {MAX_EVENTS_PER_REQUEST} events, got {count}")
    products = arrays["PRODUCT_IDS"]
    if not np.issubdtype(products.dtype, np.integer):
        raise InvalidRequest(f"PRODUCT_IDS must be integers, got {products.dtype}")
    unknown = np.flatnonzero(~known_products(products))
    if len(unknown):
        raise InvalidRequest(
            f"PRODUCT_IDS[{unknown[0]}] = {products[unknown[0]]} is not in the catalogue "
            f"({len(unknown)} unknown in the batch)"
        )
    when = arrays["TIMESTAMPS"]
    if not np.issubdtype(when.dtype, np.floating) and not np.issubdtype(when.dtype, np.integer):
        raise InvalidRequest(f"TIMESTAMPS must be numbers of seconds, got {when.dtype}")
    when = when.astype(np.float64)
    horizon = (time.time() if now is None else now) + MAX_FUTURE_S
    bad = np.flatnonzero(~np.isfinite(when) | (when <= 0) | (when > horizon))
    if len(bad):
        raise InvalidRequest(
            f"TIMESTAMPS[{bad[0]}] = {when[bad[0]]!r} is not a time between the epoch and a day "
            "from now"
        )
    kinds = []
    for i, name in enumerate(_texts("EVENT_TYPES", arrays["EVENT_TYPES"], 32)):
        if name not in _KINDS:
            raise InvalidRequest(
                f"EVENT_TYPES[{i}] = {name!r} is not one of {', '.join(EVENT_TYPES)}"
            )
        kinds.append(_KINDS[name])
    return EventRequest(
        _texts("USER_IDS", arrays["USER_IDS"], MAX_USER_ID_BYTES),
        products.astype(np.int64),
        kinds,
        when,
        _texts("EVENT_IDS", arrays["EVENT_IDS"], MAX_EVENT_ID_BYTES),
        _baskets(arrays.get("BASKET_IDS"), count),
    )


def _baskets(values: np.ndarray | None, count: int) -> list[str]:
    """Basket ids: optional, and an empty one means none (the session decides the basket)."""
    if values is None:
        return [""] * count
    return [
        decode_text(v, f"BASKET_IDS[{i}]", MAX_EVENT_ID_BYTES) if v else ""
        for i, v in enumerate(values.tolist())
    ]


def event_key(user_key: str, event_id: str) -> str:
    return hashlib.sha256(f"{user_key}\x1f{event_id}".encode()).hexdigest()[:32]


class EventIngest:
    """Folds validated batches into the profile store."""

    def __init__(self, store: ProfileStore, keys: UserKeys) -> None:
        self.store = store
        self.keys = keys

    def stored(self, request: EventRequest) -> list[StoredEvent]:
        events = []
        for i, user_id in enumerate(request.user_ids):
            user_key = self.keys.key(user_id)
            events.append(
                StoredEvent(
                    user_key,
                    event_key(user_key, request.event_ids[i]),
                    int(request.product_ids[i]),
                    request.kinds[i],
                    float(request.timestamps[i]),
                    request.basket_ids[i],
                )
            )
        return events

    def ingest(self, requests: Sequence[EventRequest]) -> list[int]:
        """Commit every request's events in one transaction; return how many of each were new."""
        batches = [self.stored(request) for request in requests]
        applied = self.store.apply([e for batch in batches for e in batch])
        counts = []
        for batch in batches:
            mine = {e.event_key for e in batch} & applied
            applied -= mine  # a key repeated in a later request of the group was not new there
            counts.append(len(mine))
        return counts
