"""Where profiles live: one interface, two backends.

* :class:`SqliteProfileStore`, the embedded default: one file in WAL mode, shared by every model
  instance on the host; a commit is on disk (``synchronous=FULL``) before it returns.
* :class:`RedisProfileStore`: one Redis shared by several Triton servers (the scale-out path). It
  refuses a Redis that does not fsync every write (``appendfsync always``), since an acknowledged
  event must survive a crash.

Rows are keyed by the keyed hash of the user id (:class:`~shopserve.ensemble.profiles.UserKeys`),
never the id. Live events are folded with the same :meth:`Profile.apply` as the release build; a batch
is applied in one transaction (all or nothing), and an event whose key was seen before is skipped.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from .profiles import ItemStats, Profile
from .resp import RespClient, RespError, hash_reply, public_location

PROFILE_STORE_ENV = "SHOPSERVE_PROFILE_STORE"  # where the live store is (set by shopserve serve)
Embedding = Callable[[int], np.ndarray]  # product id -> its embedding (the taste vector's part)

# Seeding a Redis namespace: a seeder's lock expires after SEED_LOCK_S (a killed server's lock
# frees itself); the other servers poll every SEED_POLL_S for up to SEED_WAIT_S.
SEED_LOCK_S, SEED_POLL_S, SEED_WAIT_S = 300.0, 0.2, 900.0
_RELEASE_LOCK = (  # delete the lock only if it is still this seeder's
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)

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
"""
_ITEM_COLUMNS = tuple(ItemStats.__dataclass_fields__)
_USER_COLUMNS = (
    "baskets",
    "basket_key",
    "last_purchase_ts",
    "last_ts",
    "open_basket",
    "taste_sum",
    "taste_weight",
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


def _user_row(profile: Profile) -> tuple:
    taste = None if profile.taste_sum is None else profile.taste_sum.astype(np.float32).tobytes()
    return (
        profile.baskets,
        profile.basket_key,
        float(profile.last_purchase_ts),
        profile.last_ts,
        json.dumps(profile.open_basket),
        taste,
        profile.taste_weight,
    )


def _profile(user: Sequence, items: dict[int, ItemStats]) -> Profile:
    baskets, basket_key, last_purchase, last_ts, open_basket, taste, weight = user
    return Profile(
        baskets=int(baskets),
        basket_key=basket_key,
        last_purchase_ts=float(last_purchase),
        last_ts=float(last_ts),
        items=items,
        open_basket=json.loads(open_basket),
        taste_sum=None if taste is None else np.frombuffer(taste, dtype=np.float32).copy(),
        taste_weight=float(weight),
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


def fold(profile: Profile, events: Iterable[StoredEvent], embedding: Embedding) -> set[int]:
    """Apply events in time order; return the products they touched."""
    touched = set()
    for event in sorted(events, key=lambda e: e.timestamp):
        profile.apply(event.product_id, event.kind, event.timestamp, event.basket_key, embedding)
        touched.add(event.product_id)
    return touched


class ProfileStoreUnavailable(RuntimeError):
    """The profile store could not be read (Redis down or full, a disk error): a request that needs
    a profile cannot be answered as asked now, but may be later."""


STORE_ERRORS = (OSError, sqlite3.Error, RespError)  # what a store's backends raise when failing


class ProfileStore(ABC):
    """Read and write profiles by user key."""

    @abstractmethod
    def get(self, user_key: str) -> Profile | None: ...

    @abstractmethod
    def put(self, profiles: Iterable[tuple[str, Profile]]) -> int:
        """Write whole profiles (replacing any stored under the same key); return how many."""

    @abstractmethod
    def apply(self, events: Sequence[StoredEvent], embedding: Embedding) -> set[str]:
        """Fold a batch of events into their profiles, all or nothing, durably; return the keys of
        those that were new (events whose key the store has seen are skipped)."""

    @abstractmethod
    def forget(self, user_key: str) -> bool:
        """Delete everything stored about a user; return whether there was anything."""

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
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30
            )
            # Small pages: an event batch touches a few rows of many shoppers, scattered over the
            # tables, and each touched page is written whole to the WAL (1 KiB pages took batches
            # of 32 events for random shoppers from 6,500 to 8,000-12,000 events/s here). Only a
            # new file takes it.
            self._db.execute("PRAGMA page_size=1024")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
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

    def _items(self, user_key: str, products: Iterable[int] | None = None) -> dict[int, ItemStats]:
        query = f"SELECT product_id, {', '.join(_ITEM_COLUMNS)} FROM user_items WHERE user_key = ?"
        arguments: list = [user_key]
        if products is not None:
            wanted = sorted(products)
            query += f" AND product_id IN ({', '.join('?' * len(wanted))})"
            arguments += wanted
        return {row[0]: ItemStats(*row[1:]) for row in self._db.execute(query, arguments)}

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
            f"INSERT OR REPLACE INTO users VALUES (?, {', '.join('?' * len(_USER_COLUMNS))})",
            (user_key, *_user_row(profile)),
        )
        self._db.executemany(
            f"INSERT OR REPLACE INTO user_items VALUES (?, ?, {', '.join('?' * len(_ITEM_COLUMNS))})",
            [(user_key, pid, *profile.items[pid].row()) for pid in products],
        )

    def apply(self, events: Sequence[StoredEvent], embedding: Embedding) -> set[str]:
        groups = _by_user(events)
        with self._transaction("IMMEDIATE"):
            seen = self._select_pairs("seen_events", ["event_key"], "event_key", groups)
            fresh = {u: _fresh(g, {k for _, k in seen.get(u, [])}) for u, g in groups.items()}
            fresh = {u: f for u, f in fresh.items() if f}
            if not fresh:
                return set()
            users = dict(
                (row[0], row[1:])
                for row in self._db.execute(
                    f"SELECT user_key, {', '.join(_USER_COLUMNS)} FROM users WHERE user_key IN "
                    f"({', '.join('?' * len(fresh))})",
                    list(fresh),
                )
            )
            items = self._select_pairs(
                "user_items", ["product_id", *_ITEM_COLUMNS], "product_id", fresh
            )
            user_rows, item_rows = [], []
            for user_key, batch in fresh.items():
                stats = {row[1]: ItemStats(*row[2:]) for row in items.get(user_key, [])}
                user = users.get(user_key)
                profile = Profile(items=stats) if user is None else _profile(user, stats)
                touched = fold(profile, batch, embedding)
                user_rows.append((user_key, *_user_row(profile)))
                item_rows += [(user_key, p, *profile.items[p].row()) for p in touched]
            self._db.executemany(
                f"INSERT OR REPLACE INTO users VALUES (?, {', '.join('?' * len(_USER_COLUMNS))})",
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
        return {e.event_key for batch in fresh.values() for e in batch}

    def _select_pairs(
        self, table: str, columns: Sequence[str], key: str, groups: dict[str, list[StoredEvent]]
    ) -> dict[str, list[tuple]]:
        """Rows of ``table`` (user_key, ``columns``...) whose (user_key, ``key``) pair an event of
        ``groups`` carries (its attribute of the same name), by user: one indexed join."""
        pairs = sorted({(u, getattr(e, key)) for u, g in groups.items() for e in g})
        wanted = ", ".join(["(?, ?)"] * len(pairs))
        selected = ", ".join(f"{table}.{c}" for c in ("user_key", *columns))
        rows = self._db.execute(
            f"WITH wanted(user_key, value) AS (VALUES {wanted}) SELECT {selected} FROM wanted "
            f"JOIN {table} ON {table}.user_key = wanted.user_key AND {table}.{key} = wanted.value",
            [x for pair in pairs for x in pair],
        )
        found: dict[str, list[tuple]] = {}
        for row in rows:
            found.setdefault(row[0], []).append(row)
        return found

    def forget(self, user_key: str) -> bool:
        with self._transaction("IMMEDIATE"):
            found = self._user(user_key) is not None
            for table in ("users", "user_items", "seen_events"):
                self._db.execute(f"DELETE FROM {table} WHERE user_key = ?", (user_key,))
        return found

    def users(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM users").fetchone()[0]

    def profiles(self) -> Iterator[tuple[str, Profile]]:
        """Every stored profile (to seed another store from this one)."""
        for (user_key,) in self._db.execute("SELECT user_key FROM users").fetchall():
            profile = self.get(user_key)
            if profile is not None:
                yield user_key, profile

    def close(self) -> None:
        self._db.close()


class RedisProfileStore(ProfileStore):
    """Profiles in Redis: ``<prefix>u:<key>`` (a hash of the profile's fields), ``<prefix>i:<key>``
    (product id -> its stats as JSON) and ``<prefix>e:<key>`` (the event keys seen)."""

    RETRIES = 20

    def __init__(self, url: str, namespace: str, password: str | None = None) -> None:
        self.client = RespClient(url, password=password)
        self.prefix = f"shopserve:{namespace}:"
        settings = {}
        for name in ("appendonly", "appendfsync"):
            reply = self.client.call("CONFIG", "GET", name)
            settings[name] = reply[1].decode() if reply else "unknown"
        if settings != {"appendonly": "yes", "appendfsync": "always"}:
            raise ValueError(
                f"{public_location(url)}: Redis must fsync every write to keep acknowledged events "
                f"(appendonly yes, appendfsync always); it has {settings}"
            )

    def _keys(self, user_key: str) -> tuple[str, str, str]:
        return tuple(f"{self.prefix}{kind}:{user_key}" for kind in "uie")

    @staticmethod
    def _profile(stored: dict[bytes, bytes], items: dict[int, ItemStats]) -> Profile:
        row = [stored.get(c.encode()) for c in _USER_COLUMNS]
        row[_USER_COLUMNS.index("basket_key")] = row[_USER_COLUMNS.index("basket_key")].decode()
        return _profile(row, items)

    def get(self, user_key: str) -> Profile | None:
        user, items, _ = self._keys(user_key)
        stored, stats = self.client.transaction([("HGETALL", user), ("HGETALL", items)])
        stored = hash_reply(stored)
        if not stored:
            return None
        return self._profile(
            stored, {int(p): ItemStats(*json.loads(v)) for p, v in hash_reply(stats).items()}
        )

    def _writes(self, user_key: str, profile: Profile, products: Iterable[int]) -> list[tuple]:
        user, items, _ = self._keys(user_key)
        fields = dict(zip(_USER_COLUMNS, _user_row(profile), strict=True))
        if fields["taste_sum"] is None:
            del fields["taste_sum"]
        commands: list[tuple] = [("HSET", user, *(x for kv in fields.items() for x in kv))]
        stats = [(p, json.dumps(profile.items[p].row())) for p in products]
        if stats:
            commands.append(("HSET", items, *(x for kv in stats for x in kv)))
        return commands

    def _put_commands(self, profiles: Iterable[tuple[str, Profile]]) -> tuple[list[tuple], int]:
        count = 0
        commands: list[tuple] = []
        for user_key, profile in profiles:
            commands.append(("DEL", *self._keys(user_key)[:2]))
            commands += self._writes(user_key, profile, profile.items)
            count += 1
        return commands, count

    def put(self, profiles: Iterable[tuple[str, Profile]]) -> int:
        commands, count = self._put_commands(profiles)
        if commands:
            self.client.transaction(commands)
        return count

    def apply(self, events: Sequence[StoredEvent], embedding: Embedding) -> set[str]:
        groups = _by_user(events)
        watched = [key for user_key in groups for key in self._keys(user_key)]
        for _ in range(self.RETRIES):
            self.client.call("WATCH", *watched)  # the reads below see a state EXEC checks
            commands: list[tuple] = []
            applied: set[str] = set()
            for user_key, group in groups.items():
                user, items, seen_key = self._keys(user_key)
                keys = sorted({e.event_key for e in group})
                hits = self.client.call("SMISMEMBER", seen_key, *keys)
                fresh = _fresh(group, {k for k, hit in zip(keys, hits, strict=True) if hit})
                if not fresh:
                    continue
                products = sorted({e.product_id for e in fresh})
                found = self.client.call("HMGET", items, *products)
                stats = {
                    p: ItemStats(*json.loads(v))
                    for p, v in zip(products, found, strict=True)
                    if v is not None
                }
                stored = hash_reply(self.client.call("HGETALL", user))
                profile = self._profile(stored, stats) if stored else Profile(items=stats)
                commands += self._writes(user_key, profile, fold(profile, fresh, embedding))
                commands.append(("SADD", seen_key, *(e.event_key for e in fresh)))
                applied.update(e.event_key for e in fresh)
            if not commands:
                self.client.call("UNWATCH")
                return applied
            if self.client.transaction(commands) is not None:
                return applied
        raise RuntimeError(f"events for {len(groups)} users kept conflicting; not applied")

    def forget(self, user_key: str) -> bool:
        return bool(self.client.call("DEL", *self._keys(user_key)))

    def users(self) -> int:
        cursor, count = b"0", 0
        while True:
            cursor, keys = self.client.call(
                "SCAN", cursor, "MATCH", f"{self.prefix}u:*", "COUNT", 1000
            )
            count += len(keys)
            if cursor == b"0":
                return count

    def seed_once(
        self,
        profiles: Callable[[], Iterable[tuple[str, Profile]]],
        marker: str,
        lock_s: float = SEED_LOCK_S,
        wait_s: float = SEED_WAIT_S,
    ) -> int | None:
        """Write ``profiles()`` into this namespace unless it was seeded before; return how many,
        or None when it already was.

        The profiles and the ``seeded`` marker are written in one transaction, so the namespace
        is either untouched or complete: a crash mid-seeding leaves nothing. One server at a time
        seeds, under a lock that expires after ``lock_s`` (a server killed while seeding holds it
        no longer); the others wait for the marker, up to ``wait_s``. The transaction WATCHes the
        lock and the marker, so a seeding that outlived its lock never overwrites another's."""
        seeded, lock = f"{self.prefix}seeded", f"{self.prefix}seeding"
        token = secrets.token_hex(16)
        deadline = time.monotonic() + wait_s
        while self.client.call("SET", lock, token, "NX", "PX", int(lock_s * 1000)) != "OK":
            if self.client.call("EXISTS", seeded):
                return None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"namespace {self.prefix!r} is being seeded by another server and did not "
                    f"finish in {wait_s:.0f} s"
                )
            time.sleep(SEED_POLL_S)
        try:
            _, owner, done = self.client.pipeline(
                [("WATCH", lock, seeded), ("GET", lock), ("EXISTS", seeded)]
            )
            if done or owner != token.encode():
                self.client.call("UNWATCH")
                return None
            commands, count = self._put_commands(profiles())
            if self.client.transaction([*commands, ("SET", seeded, marker)]) is None:
                return None  # the lock expired and another server seeded meanwhile
            return count
        finally:
            self.client.call("EVAL", _RELEASE_LOCK, 1, lock, token)

    def close(self) -> None:
        self.client.close()


REDIS_OPTIONS = ("namespace", "password_file")  # what a Redis location's query may set


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


def open_store(location: str | Path, readonly: bool = False, namespace: str = "") -> ProfileStore:
    """A profile store by location: a file path or ``sqlite:///path`` for the embedded store,
    ``redis://host:port/db`` or ``unix:///path`` for Redis, whose query may name the namespace
    (``?namespace=NAME``) and a file holding the password (``password_file=PATH``)."""
    text = str(location)
    if text.startswith(("redis://", "unix://")):
        shown = public_location(text)
        options = parse_qs(urlparse(text).query)
        unknown = sorted(set(options) - set(REDIS_OPTIONS))
        if unknown:
            raise ValueError(
                f"{shown}: unknown option(s) {', '.join(unknown)} (known: {', '.join(REDIS_OPTIONS)})"
            )
        return RedisProfileStore(
            text.split("?")[0],
            options.get("namespace", [namespace])[0],
            password=_redis_password(options, shown),
        )
    if text.startswith("sqlite://"):
        text = text.removeprefix("sqlite://")
    elif "://" in text:
        raise ValueError(
            f"unknown profile store {public_location(text)!r} (a path, sqlite:///path or "
            "redis://host:port/db)"
        )
    return SqliteProfileStore(text, readonly=readonly)


def seed(location: str, snapshot: Path, namespace: str) -> str:
    """Make the live store at ``location`` start from the build's snapshot, once; return what was
    done (for the launcher's log: no password)."""
    store = None
    text = str(location)
    shown = public_location(text)
    try:
        if text.startswith(("redis://", "unix://")):
            store = open_store(text, namespace=namespace)
            snapshot_store = SqliteProfileStore(snapshot, readonly=True)
            try:
                count = store.seed_once(snapshot_store.profiles, namespace)
            finally:
                snapshot_store.close()
            if count is None:
                return f"{shown} already holds namespace {namespace}"
            return f"seeded {count} profiles into {shown} (namespace {namespace})"
        path = Path(text.removeprefix("sqlite://"))
        if path.exists():
            return f"{path} exists; serving it"
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        shutil.copyfile(snapshot, partial)
        partial.rename(path)
        return f"seeded {path} from {snapshot}"
    finally:
        if store is not None:
            store.close()
