"""Where profiles live: one interface, an embedded SQLite store (WAL mode) as the default.

Every model instance on the host opens the same file; WAL lets readers run beside a writer. Rows are
keyed by the keyed hash of the user id (:class:`~shopserve.ensemble.profiles.UserKeys`), never the id.
"""

from __future__ import annotations

import json
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .profiles import ItemStats, Profile

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
"""
_ITEM_COLUMNS = (
    "purchases",
    "baskets",
    "first_basket",
    "last_basket",
    "carts",
    "clicks",
    "views",
    "last_ts",
    "decayed",
)


class ProfileStore(ABC):
    """Read and write profiles by user key."""

    @abstractmethod
    def get(self, user_key: str) -> Profile | None: ...

    @abstractmethod
    def put(self, profiles: Iterable[tuple[str, Profile]]) -> int:
        """Write whole profiles (replacing any stored under the same key); return how many."""

    @abstractmethod
    def close(self) -> None: ...


class SqliteProfileStore(ProfileStore):
    def __init__(self, path: Path | str, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"no profile store at {self.path}")
            uri = f"file:{self.path.resolve()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
            self._db.executescript(_SCHEMA)

    def get(self, user_key: str) -> Profile | None:
        user = self._db.execute(
            "SELECT baskets, basket_key, last_purchase_ts, last_ts, open_basket, taste_sum,"
            " taste_weight FROM users WHERE user_key = ?",
            (user_key,),
        ).fetchone()
        if user is None:
            return None
        baskets, basket_key, last_purchase, last_ts, open_basket, taste, weight = user
        rows = self._db.execute(
            f"SELECT product_id, {', '.join(_ITEM_COLUMNS)} FROM user_items WHERE user_key = ?",
            (user_key,),
        ).fetchall()
        return Profile(
            baskets=baskets,
            basket_key=basket_key,
            last_purchase_ts=last_purchase,
            last_ts=last_ts,
            items={row[0]: ItemStats(*row[1:]) for row in rows},
            open_basket=json.loads(open_basket),
            taste_sum=None if taste is None else np.frombuffer(taste, dtype=np.float32).copy(),
            taste_weight=weight,
        )

    def put(self, profiles: Iterable[tuple[str, Profile]]) -> int:
        count = 0
        with self._db:  # one transaction
            for user_key, profile in profiles:
                self._write(user_key, profile)
                count += 1
        return count

    def _write(self, user_key: str, profile: Profile) -> None:
        taste = (
            None if profile.taste_sum is None else profile.taste_sum.astype(np.float32).tobytes()
        )
        self._db.execute(
            "INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                user_key,
                profile.baskets,
                profile.basket_key,
                float(profile.last_purchase_ts),
                profile.last_ts,
                json.dumps(profile.open_basket),
                taste,
                profile.taste_weight,
            ),
        )
        self._db.execute("DELETE FROM user_items WHERE user_key = ?", (user_key,))
        self._db.executemany(
            f"INSERT INTO user_items VALUES (?, ?, {', '.join('?' * len(_ITEM_COLUMNS))})",
            [
                (user_key, pid, *(getattr(stats, c) for c in _ITEM_COLUMNS))
                for pid, stats in profile.items.items()
            ],
        )

    def users(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM users").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def open_store(location: str | Path, readonly: bool = False) -> ProfileStore:
    """A profile store by location: a file path or ``sqlite:///path`` for the embedded store."""
    text = str(location)
    if text.startswith("sqlite://"):
        text = text.removeprefix("sqlite://")
    elif "://" in text:
        raise ValueError(f"unknown profile store {location!r} (expected a path or sqlite:///path)")
    return SqliteProfileStore(text, readonly=readonly)
