"""Where profiles live: one interface, two backends.

* :class:`SqliteProfileStore`, the embedded default: one file in WAL mode, shared by every model
  instance on the host; a commit is on disk (``synchronous=FULL``) before it returns.
* :class:`~shopserve.ensemble.redis_store.RedisProfileStore`: one Redis shared by several Triton
  servers (the scale-out path). It refuses a Redis that does not fsync every write (``appendfsync
  always``), since an acknowledged event must survive a crash.

Rows are keyed by the keyed hash of the user id (:class:`~shopserve.ensemble.profiles.UserKeys`),
never the id. Live events are folded with the same :meth:`Profile.apply` as the release build; a batch
is applied in one transaction (all or nothing), and an event whose key was seen before is skipped.

The same transaction appends each new event to the store's **event log** (a table in SQLite, a Redis
Stream shared by every namespace of one shop), and ``forget`` deletes a shopper's logged events and
appends an erasure record. The profiles are a view of the log: a live store made for another build
is that build's snapshot with the log replayed over it (:func:`replay`), so no release, rollback or
restart drops an acknowledged event or brings back a forgotten shopper.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Container, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, urlparse

import numpy as np

from .profiles import EVENT_TYPES, ItemStats, Profile
from .redis_link import is_redis, public_location
from .sqlite_link import connect_wal

PROFILE_STORE_ENV = "SHOPSERVE_PROFILE_STORE"  # where the live store is (set by shopserve serve)
LIVE_PROFILES_FILE = "live.sqlite"  # the embedded live store, under the server's work folder
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_key TEXT PRIMARY KEY,
    baskets INTEGER NOT NULL,
    basket_key TEXT NOT NULL,
    last_purchase_ts REAL NOT NULL,
    last_ts REAL NOT NULL,
    open_basket TEXT NOT NULL,
    taste_sum BLOB,
    taste_weight REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_items (
    user_key TEXT NOT NULL,
    product_id INTEGER NOT NULL,
    purchases INTEGER NOT NULL,
    baskets INTEGER NOT NULL,
    first_basket INTEGER NOT NULL,
    last_basket INTEGER NOT NULL,
    carts INTEGER NOT NULL,
    clicks INTEGER NOT NULL,
    views INTEGER NOT NULL,
    last_ts REAL NOT NULL,
    decayed REAL NOT NULL,
    PRIMARY KEY (user_key, product_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen_events (
    user_key TEXT NOT NULL,
    event_key TEXT NOT NULL,
    PRIMARY KEY (user_key, event_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS event_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_key TEXT NOT NULL,
    event_key TEXT NOT NULL,
    product_id INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    timestamp REAL NOT NULL,
    basket_key TEXT NOT NULL,
    logged_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS live_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS applied_erasures (
    user_key TEXT PRIMARY KEY,
    erased_at REAL NOT NULL
) WITHOUT ROWID;
"""
_LOG_COLUMNS = ("user_key", "event_key", "product_id", "kind", "timestamp", "basket_key")
_LOG_FIELDS = (*_LOG_COLUMNS, "logged_at")
_ITEM_COLUMNS = tuple(ItemStats.__dataclass_fields__)
_USER_COLUMNS = (
    "baskets",
    "basket_key",
    "last_purchase_ts",
    "last_ts",
    "open_basket",
)
# Versions before 323ecb3 kept each shopper's taste vector in users (taste_sum, taste_weight); it
# is computed from the items now. The columns stay, written empty (NULL, weight 0: "no taste vector"
# to those versions), so that a server of the version before can still read and write a store this
# one wrote (a downgrade). A later release drops them.
_UPSERT_USER = (
    f"INSERT OR REPLACE INTO users (user_key, {', '.join(_USER_COLUMNS)}, taste_sum, "
    f"taste_weight) VALUES (?, {', '.join('?' * len(_USER_COLUMNS))}, NULL, 0)"
)


@dataclass(frozen=True)
class StoredEvent:
    """One event as the store keeps it: the user's keyed hash, and a key for idempotence."""

    user_key: str
    event_key: str  # a digest of the user and the client's event id
    product_id: int
    kind: int
    timestamp: float
    basket_key: str = ""


ERASED = -1  # the kind of a log record that erases a shopper (forget); it names no product


@dataclass(frozen=True)
class LogRecord:
    """One entry of the event log: an accepted event, or an erasure (``event.kind == ERASED``)."""

    position: str  # its place in the log (SQLite's sequence number, the Redis Stream's entry id)
    logged_at: float  # when the store accepted it (Unix seconds)
    event: StoredEvent


@dataclass
class LiveState:
    """What a live store holds for one build: profiles, the event keys folded into them, and the
    erasures the build applied (keyed hash -> when the shopper was forgotten)."""

    profiles: dict[str, Profile]
    seen: dict[str, set[str]]
    erased: dict[str, float]
    watermarks: dict[str, float]  # each shopper's latest event in the snapshot (see ``replay``)
    position: str = ""  # the last log record folded ("" for none)
    replayed: int = 0  # how many logged events were folded over the snapshot

    @classmethod
    def of(
        cls,
        profiles: Iterable[tuple[str, Profile]],
        seen: dict[str, set[str]] | None = None,
        erased: dict[str, float] | None = None,
    ) -> LiveState:
        profiles = dict(profiles)
        watermarks = {user: profile.last_ts for user, profile in profiles.items()}
        return cls(profiles, seen or {}, erased or {}, watermarks)

    @classmethod
    def of_snapshot(cls, path: Path) -> LiveState:
        """A build's snapshot file as a live state (nothing replayed yet)."""
        snapshot = SqliteProfileStore(path, readonly=True)
        try:
            return cls.of(snapshot.profiles(), snapshot.seen_keys(), snapshot.applied_erasures())
        finally:
            snapshot.close()

    def erase(self, user_key: str) -> None:
        for held in (self.profiles, self.seen, self.watermarks):
            held.pop(user_key, None)


def already_folded(erasure: StoredEvent, erased: dict[str, float]) -> bool:
    """Whether the build applied this erasure record (or a later one) already: the shopper's
    events logged after it are then in the snapshot, and must not be dropped again."""
    return erasure.timestamp <= erased.get(erasure.user_key, -np.inf)


def replay(state: LiveState, records: Iterable[LogRecord], known: Container[int]) -> LiveState:
    """Fold log records over ``state`` in log order: an erasure drops the shopper (unless the
    build applied it); an event is skipped when its key was folded before (the build folded an
    export of the log holding it), when it is not after the shopper's latest event in the
    snapshot (their watermark: the build's own event files hold it), or when it names a product
    the build does not serve (delisted since). Live ingestion logs each batch in the order it
    folded it, so this gives the profiles the live store had."""
    for record in records:
        event = record.event
        state.position = record.position
        if event.kind == ERASED:
            if not already_folded(event, state.erased):
                state.erase(event.user_key)
            continue
        seen = state.seen.setdefault(event.user_key, set())
        if (
            event.event_key in seen
            or event.timestamp <= state.watermarks.get(event.user_key, -np.inf)
            or event.product_id not in known
        ):
            continue
        seen.add(event.event_key)
        profile = state.profiles.setdefault(event.user_key, Profile())
        profile.apply(event.product_id, event.kind, event.timestamp, event.basket_key)
        state.replayed += 1
    return state


def _user_row(profile: Profile) -> tuple:
    return (
        profile.baskets,
        profile.basket_key,
        float(profile.last_purchase_ts),
        profile.last_ts,
        json.dumps(profile.open_basket),
    )


def _profile(user: Sequence, items: dict[int, ItemStats]) -> Profile:
    baskets, basket_key, last_purchase, last_ts, open_basket = user
    return Profile(
        baskets=int(baskets),
        basket_key=basket_key,
        last_purchase_ts=float(last_purchase),
        last_ts=float(last_ts),
        items=items,
        open_basket=json.loads(open_basket),
    )


def _by_user(events: Sequence[StoredEvent]) -> dict[str, list[StoredEvent]]:
    groups: dict[str, list[StoredEvent]] = {}
    for event in events:
        groups.setdefault(event.user_key, []).append(event)
    return groups


def _fresh(group: Sequence[StoredEvent], seen: set[str]) -> list[StoredEvent]:
    """The events of ``group`` whose key is neither in ``seen`` nor repeated within the group."""
    fresh = []
    for event in group:
        if event.event_key not in seen:
            seen.add(event.event_key)
            fresh.append(event)
    return fresh


def in_fold_order(events: Iterable[StoredEvent]) -> list[StoredEvent]:
    """One shopper's events in the order they are folded (and logged): by time, stable."""
    return sorted(events, key=lambda e: e.timestamp)


def fold(profile: Profile, events: Iterable[StoredEvent], in_time_order: bool = True) -> set[int]:
    """Apply events in time order (or, for a replay of the log, in the order given: the order
    they were folded live); return the products they touched."""
    touched = set()
    for event in in_fold_order(events) if in_time_order else events:
        profile.apply(event.product_id, event.kind, event.timestamp, event.basket_key)
        touched.add(event.product_id)
    return touched


def erasure(user_key: str) -> StoredEvent:
    """The log record of a shopper's erasure: their keyed hash only."""
    return StoredEvent(user_key, "", 0, ERASED, time.time())


EXPORT_COLUMNS = ("user_key", "product_id", "timestamp", "event", "basket_id", "event_key")
ERASED_EVENT = "forget"  # an erasure's event name in an export


def export_log(store: ProfileStore, path: Path, since: float = 0.0) -> tuple[int, int]:
    """Write the log's events accepted at or after ``since`` (Unix seconds), and every erasure
    record however old, to a CSV in the events format, ids as the keyed hashes the store holds
    (column ``user_key``), erasures as event ``forget``; return (events, erasures) written."""
    counts = [0, 0]
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*EXPORT_COLUMNS, "logged_at"])
        for record in store.log():
            event = record.event
            erased = event.kind == ERASED
            if record.logged_at < since and not erased:  # erasures hold whatever their age
                continue
            name = ERASED_EVENT if erased else EVENT_TYPES[event.kind]
            writer.writerow(
                [
                    event.user_key,
                    "" if erased else event.product_id,
                    event.timestamp,
                    name,
                    event.basket_key,
                    event.event_key,
                    record.logged_at,
                ]
            )
            counts[erased] += 1
    partial.replace(path)
    return counts[0], counts[1]


class ProfileStoreUnavailable(RuntimeError):
    """The profile store could not be read or written (Redis down or full, a full disk, a disk
    error): a request that needs it cannot be answered as asked now, but may be later."""


# What the SQLite store raises when failing; the Redis store's reads raise ProfileStoreUnavailable.
STORE_ERRORS = (OSError, sqlite3.Error)


def store_failures(location: str) -> tuple[type[Exception], ...]:
    """What the profile store (or catalogue log) at ``location`` raises when it fails."""
    if is_redis(location):
        from .redis_store import RedisProfileStore  # redis-py (and ssl) only for a Redis store

        return RedisProfileStore.FAILURES
    return STORE_ERRORS


def failure_reason(exc: Exception) -> str:
    """A store's failure as a log line names it: SQLite's and the OS's messages say what failed
    ("database or disk is full"); Redis's may name its host, so only their type."""
    worded = isinstance(exc, (*STORE_ERRORS, ProfileStoreUnavailable))
    return f"{type(exc).__name__}: {exc}" if worded else type(exc).__name__


def store_failed(location: str, exc: Exception, what: str) -> str:
    """An operator's message for the profile store at ``location`` that could not be ``what``
    (prepared, read, written): where it is (any password masked) and why."""
    return (
        f"the profile store {public_location(location)} could not be {what} ({failure_reason(exc)})"
    )


class ProfileStore(ABC):
    """Read and write profiles by user key."""

    # What a failing store raises (a write that fails has written nothing): the callers that
    # answer requests turn these into ProfileStoreUnavailable.
    FAILURES: tuple[type[Exception], ...] = STORE_ERRORS

    @abstractmethod
    def get(self, user_key: str) -> Profile | None: ...

    @abstractmethod
    def put(self, profiles: Iterable[tuple[str, Profile]]) -> int:
        """Write whole profiles (replacing any stored under the same key); return how many."""

    @abstractmethod
    def apply(self, events: Sequence[StoredEvent], log: bool = True) -> set[str]:
        """Fold a batch of events into their profiles and append the new ones to the event log
        (unless ``log`` is false: a replay of the log itself), all or nothing, durably; return the
        keys of those that were new (events whose key the store has seen are skipped)."""

    @abstractmethod
    def forget(self, user_key: str) -> bool:
        """Delete everything stored about a user, their logged events included, and log the
        erasure; return whether there was anything."""

    @abstractmethod
    def log(self, after: str = "") -> Iterator[LogRecord]:
        """The event log in order, from the record after position ``after`` ("": the start)."""

    @abstractmethod
    def compact(self, before: float) -> int:
        """Delete the logged events accepted before ``before`` (Unix seconds), keeping every
        erasure record; return how many were deleted."""

    @abstractmethod
    def users(self) -> int: ...

    @abstractmethod
    def close(self) -> None: ...


class SqliteProfileStore(ProfileStore):
    def __init__(self, path: Path | str, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"no profile store at {self.path}")
            uri = f"file:{self.path.resolve()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            # Small pages: an event batch touches a few rows of many shoppers, scattered over the
            # tables, and each touched page is written whole to the WAL (1 KiB pages took batches
            # of 32 events for random shoppers from 6,500 to 8,000-12,000 events/s here). Only a
            # new file takes it.
            self._db = connect_wal(self.path, "PRAGMA page_size=1024")
            # Checkpoints copy the WAL back into the file; every 10,000 pages rather than 1,000.
            self._db.execute("PRAGMA wal_autocheckpoint=10000")
            self._db.executescript(_SCHEMA)

    @contextmanager
    def _transaction(self, mode: str = "DEFERRED") -> Iterator[sqlite3.Connection]:
        self._db.execute(f"BEGIN {mode}")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _items(self, user_key: str) -> dict[int, ItemStats]:
        query = f"SELECT product_id, {', '.join(_ITEM_COLUMNS)} FROM user_items WHERE user_key = ?"
        return {row[0]: ItemStats(*row[1:]) for row in self._db.execute(query, (user_key,))}

    def _user(self, user_key: str) -> tuple | None:
        return self._db.execute(
            f"SELECT {', '.join(_USER_COLUMNS)} FROM users WHERE user_key = ?", (user_key,)
        ).fetchone()

    def get(self, user_key: str) -> Profile | None:
        with self._transaction():  # one snapshot: a writer's commit cannot land between reads
            user = self._user(user_key)
            return None if user is None else _profile(user, self._items(user_key))

    def put(self, profiles: Iterable[tuple[str, Profile]]) -> int:
        count = 0
        with self._transaction("IMMEDIATE"):
            for user_key, profile in profiles:
                self._db.execute("DELETE FROM user_items WHERE user_key = ?", (user_key,))
                self._write(user_key, profile, profile.items)
                count += 1
        return count

    def _write(self, user_key: str, profile: Profile, products: Iterable[int]) -> None:
        self._db.execute(
            _UPSERT_USER,
            (user_key, *_user_row(profile)),
        )
        self._db.executemany(
            f"INSERT OR REPLACE INTO user_items VALUES (?, ?, {', '.join('?' * len(_ITEM_COLUMNS))})",
            [(user_key, pid, *profile.items[pid].row()) for pid in products],
        )

    def apply(self, events: Sequence[StoredEvent], log: bool = True) -> set[str]:
        groups = _by_user(events)
        with self._transaction("IMMEDIATE"):
            seen = self._select_pairs("seen_events", ["event_key"], "event_key", groups)
            fresh = {u: _fresh(g, {k for _, k in seen.get(u, [])}) for u, g in groups.items()}
            fresh = {u: f for u, f in fresh.items() if f}
            if not fresh:
                return set()
            users = self._users(list(fresh))
            items = self._select_pairs(
                "user_items", ["product_id", *_ITEM_COLUMNS], "product_id", fresh
            )
            user_rows, item_rows = [], []
            for user_key, batch in fresh.items():
                stats = {row[1]: ItemStats(*row[2:]) for row in items.get(user_key, [])}
                user = users.get(user_key)
                profile = Profile(items=stats) if user is None else _profile(user, stats)
                touched = fold(profile, batch, in_time_order=log)
                user_rows.append((user_key, *_user_row(profile)))
                item_rows += [(user_key, p, *profile.items[p].row()) for p in touched]
            self._db.executemany(
                _UPSERT_USER,
                user_rows,
            )
            self._db.executemany(
                f"INSERT OR REPLACE INTO user_items VALUES (?, ?, "
                f"{', '.join('?' * len(_ITEM_COLUMNS))})",
                item_rows,
            )
            self._db.executemany(
                "INSERT INTO seen_events VALUES (?, ?)",
                [(u, e.event_key) for u, batch in fresh.items() for e in batch],
            )
            if log:
                self._append([e for batch in fresh.values() for e in in_fold_order(batch)])
        return {e.event_key for batch in fresh.values() for e in batch}

    def _append(self, events: Sequence[StoredEvent]) -> None:
        now = time.time()
        self._db.executemany(
            f"INSERT INTO event_log ({', '.join(_LOG_COLUMNS)}, logged_at) "
            f"VALUES ({', '.join('?' * (len(_LOG_COLUMNS) + 1))})",
            [(*(getattr(e, c) for c in _LOG_COLUMNS), now) for e in events],
        )

    def log(self, after: str = "") -> Iterator[LogRecord]:
        last = int(after or 0)
        while True:  # in pages, so a long log is never held in memory at once
            rows = self._db.execute(
                f"SELECT seq, logged_at, {', '.join(_LOG_COLUMNS)} FROM event_log WHERE seq > ? "
                "ORDER BY seq LIMIT 10000",
                (last,),
            ).fetchall()
            for seq, logged_at, *event in rows:
                yield LogRecord(str(seq), logged_at, StoredEvent(*event))
            if not rows:
                return
            last = rows[-1][0]

    def compact(self, before: float) -> int:
        with self._transaction("IMMEDIATE"):
            return self._db.execute(
                "DELETE FROM event_log WHERE logged_at < ? AND kind != ?", (before, ERASED)
            ).rowcount

    def namespace(self) -> str | None:
        """The build whose snapshot these profiles started from (None: not recorded)."""
        row = self._db.execute("SELECT value FROM live_meta WHERE name = 'namespace'").fetchone()
        return None if row is None else row[0]

    def adopt(self, namespace: str) -> None:
        """Record that these profiles are the build ``namespace``'s (a file seeded before the
        event log existed: its live events are only in its profiles)."""
        with self._transaction("IMMEDIATE"):
            self._set_namespace(namespace)

    def _set_namespace(self, namespace: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO live_meta VALUES ('namespace', ?)", (namespace,))

    def reset(self, namespace: str, state: LiveState) -> None:
        """Replace every profile by ``state`` (the build ``namespace``'s), in one transaction: a
        crash leaves the previous profiles, and the log is untouched."""
        with self._transaction("IMMEDIATE"):
            for table in ("users", "user_items", "seen_events"):
                self._db.execute(f"DELETE FROM {table}")
            for user_key, profile in state.profiles.items():
                self._write(user_key, profile, profile.items)
            self._db.executemany(
                "INSERT INTO seen_events VALUES (?, ?)",
                [(u, k) for u, keys in state.seen.items() for k in keys],
            )
            self._set_namespace(namespace)

    def _statement_chunks(self, items: list[T], values_each: int) -> Iterator[list[T]]:
        """``items`` in chunks that fit one statement at ``values_each`` bound values an item:
        SQLite's build sets the limit (32,766 by default, 250,000 in Debian's), and a group of
        event batches can carry more."""
        step = max(1, self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // values_each)
        for start in range(0, len(items), step):
            yield items[start : start + step]

    def _users(self, user_keys: list[str]) -> dict[str, tuple]:
        """The users rows of ``user_keys`` that exist, by key (without the key)."""
        found: dict[str, tuple] = {}
        for chunk in self._statement_chunks(user_keys, 1):
            rows = self._db.execute(
                f"SELECT user_key, {', '.join(_USER_COLUMNS)} FROM users WHERE user_key IN "
                f"({', '.join('?' * len(chunk))})",
                chunk,
            )
            found.update((row[0], row[1:]) for row in rows)
        return found

    def _select_pairs(
        self, table: str, columns: Sequence[str], key: str, groups: dict[str, list[StoredEvent]]
    ) -> dict[str, list[tuple]]:
        """Rows of ``table`` (user_key, ``columns``...) whose (user_key, ``key``) pair an event of
        ``groups`` carries (its attribute of the same name), by user: indexed joins, as few as
        the limit on a statement's bound values allows."""
        pairs = sorted({(u, getattr(e, key)) for u, g in groups.items() for e in g})
        selected = ", ".join(f"{table}.{c}" for c in ("user_key", *columns))
        found: dict[str, list[tuple]] = {}
        for chunk in self._statement_chunks(pairs, 2):
            wanted = ", ".join(["(?, ?)"] * len(chunk))
            rows = self._db.execute(
                f"WITH wanted(user_key, value) AS (VALUES {wanted}) SELECT {selected} FROM wanted "
                f"JOIN {table} ON {table}.user_key = wanted.user_key "
                f"AND {table}.{key} = wanted.value",
                [x for pair in chunk for x in pair],
            )
            for row in rows:
                found.setdefault(row[0], []).append(row)
        return found

    def forget(self, user_key: str) -> bool:
        with self._transaction("IMMEDIATE"):
            found = self._user(user_key) is not None
            for table in ("users", "user_items", "seen_events"):
                self._db.execute(f"DELETE FROM {table} WHERE user_key = ?", (user_key,))
            events = "DELETE FROM event_log WHERE user_key = ? AND kind != ?"
            found |= self._db.execute(events, (user_key, ERASED)).rowcount > 0
            # The new erasure record supersedes any earlier one.
            self._db.execute("DELETE FROM event_log WHERE user_key = ?", (user_key,))
            self._append([erasure(user_key)])
        return found

    def users(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM users").fetchone()[0]

    def record_folded_log(self, seen: dict[str, set[str]], erased: dict[str, float]) -> None:
        """Record in a build's snapshot what it folded from an exported event log: the logged
        events' keys, and the erasures it applied (so no replay over it counts them again)."""
        with self._transaction("IMMEDIATE"):
            self._db.executemany(
                "INSERT OR IGNORE INTO seen_events VALUES (?, ?)",
                [(u, k) for u, keys in seen.items() for k in keys],
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO applied_erasures VALUES (?, ?)", list(erased.items())
            )

    def seen_keys(self) -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {}
        for user_key, event_key in self._db.execute("SELECT user_key, event_key FROM seen_events"):
            seen.setdefault(user_key, set()).add(event_key)
        return seen

    def applied_erasures(self) -> dict[str, float]:
        """The erasures a build's snapshot applied (none in a snapshot written before they were
        recorded)."""
        if not self._has_table("applied_erasures"):
            return {}
        return dict(self._db.execute("SELECT user_key, erased_at FROM applied_erasures"))

    def last_event_time(self, user_key: str) -> float:
        """The time of the shopper's latest event (minus infinity for none): a snapshot's
        watermark for them."""
        row = self._db.execute(
            "SELECT last_ts FROM users WHERE user_key = ?", (user_key,)
        ).fetchone()
        return -np.inf if row is None else float(row[0])

    def _has_table(self, name: str) -> bool:
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return self._db.execute(query, (name,)).fetchone() is not None

    def profiles(self) -> Iterator[tuple[str, Profile]]:
        """Every stored profile (to seed another store from this one)."""
        for (user_key,) in self._db.execute("SELECT user_key FROM users").fetchall():
            profile = self.get(user_key)
            if profile is not None:
                yield user_key, profile

    def close(self) -> None:
        self._db.close()


# What a Redis location's query may set; ``catalogue`` names the catalogue log's Stream (one per shop).
REDIS_OPTIONS = ("namespace", "password_file", "ca_file", "catalogue")


def _redis_password(options: dict[str, list[str]], shown: str) -> str | None:
    """The password in the file named by ``password_file`` (its first line), if one is named."""
    if "password_file" not in options:
        return None
    path = Path(options["password_file"][0])
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"{shown}: cannot read the password file {path}: {exc.strerror}") from None
    if not lines or not lines[0].strip():
        raise ValueError(f"{shown}: the password file {path} is empty")
    return lines[0].strip()


def open_store(
    location: str | Path, readonly: bool = False, namespace: str = "", log_name: str = "log"
) -> ProfileStore:
    """A profile store by location: a file path or ``sqlite:///path`` for the embedded store,
    ``redis://host:port/db``, ``rediss://host:port/db`` (TLS) or ``unix:///path`` for Redis, whose
    query may name the namespace (``?namespace=NAME``), a file holding the password
    (``password_file=PATH``) and the CA that signed a TLS server's certificate (``ca_file=PATH``);
    ``log_name`` names a Redis store's event log (one per shop)."""
    text = str(location)
    if is_redis(text):
        from .redis_store import RedisProfileStore  # redis-py (and ssl) only for a Redis store

        settings = redis_settings(text)
        return RedisProfileStore(
            settings.url,
            settings.namespace or namespace,
            password=settings.password,
            log_name=log_name,
            ca_file=settings.ca_file,
        )
    return SqliteProfileStore(sqlite_path(text), readonly=readonly)


@dataclass(frozen=True)
class RedisSettings:
    url: str  # without the query
    namespace: str | None
    password: str | None
    ca_file: str | None
    catalogue: str = "catalogue"


def redis_settings(location: str) -> RedisSettings:
    """A Redis location's URL and the options its query sets (checked)."""
    shown = public_location(location)
    options = parse_qs(urlparse(location).query)
    unknown = sorted(set(options) - set(REDIS_OPTIONS))
    if unknown:
        raise ValueError(
            f"{shown}: unknown option(s) {', '.join(unknown)} (known: {', '.join(REDIS_OPTIONS)})"
        )
    return RedisSettings(
        location.split("?")[0],
        options.get("namespace", [None])[0],
        _redis_password(options, shown),
        options.get("ca_file", [None])[0],
        options.get("catalogue", ["catalogue"])[0],
    )


def sqlite_path(location: str) -> str:
    """The file of an embedded store's location (a path or ``sqlite:///path``)."""
    if location.startswith("sqlite://"):
        return location.removeprefix("sqlite://")
    if "://" in location:
        raise ValueError(
            f"unknown profile store {public_location(location)!r} (a path, sqlite:///path, "
            "redis://host:port/db or rediss://host:port/db)"
        )
    return location


def seed(
    location: str,
    snapshot: Path,
    namespace: str,
    known: Container[int],
    log_name: str = "log",
) -> str:
    """Make the live store at ``location`` hold the build ``namespace``'s profiles: its snapshot
    with every logged event replayed over it; return what was done (for the launcher's log: no
    password). A SQLite store is one file that keeps its log across builds and is rebuilt when
    the build changes; a Redis namespace is seeded once and then catches up with the log."""

    def from_snapshot(live: ProfileStore) -> LiveState:
        return replay(LiveState.of_snapshot(snapshot), live.log(), known)

    text = str(location)
    shown = public_location(text)
    live = open_store(text, namespace=namespace, log_name=log_name)
    try:
        if not isinstance(live, SqliteProfileStore):  # a Redis namespace
            count = live.seed_once(lambda: from_snapshot(live), namespace)
            caught_up = live.catch_up(known, snapshot)
            done = (
                f"{shown} already holds namespace {namespace}"
                if count is None
                else f"seeded {count} profiles into {shown} (namespace {namespace})"
            )
            return f"{done}; {caught_up} logged events caught up"
        held = live.namespace()
        if held == namespace:
            return f"{live.path} holds {namespace}; serving it"
        if held is None and live.users():  # written before the log existed
            live.adopt(namespace)
            return f"{live.path} holds profiles from before the event log; serving them"
        state = from_snapshot(live)
        live.reset(namespace, state)
        return (
            f"made {live.path} for {namespace}: {len(state.profiles)} profiles from {snapshot}, "
            f"{state.replayed} logged events replayed"
        )
    finally:
        live.close()
