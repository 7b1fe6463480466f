"""Connections to the SQLite files a server's models share (the live profiles, the catalogue
log): WAL mode, ``synchronous=FULL``, and a 30 s wait for another writer's lock.

Triton loads a server's models in parallel, and on a new work folder each of their processes
may be the one that makes a file. SQLite does not wait on its busy timeout while it switches a new
file to WAL: with six processes opening a new file at once, 4 to 11 of 360 opens got ``database
is locked`` at once here (in a server, a model that fails to load). The switch is therefore
retried until the same timeout; none of 600 such opens failed then.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

LOCK_TIMEOUT_S = 30.0
_RETRY_EVERY_S = 0.01


def connect_wal(path: Path, *new_file_pragmas: str) -> sqlite3.Connection:
    """A connection to ``path``, made with its folder if missing, in WAL mode; statements run in
    autocommit unless they begin a transaction. ``new_file_pragmas`` run first (``PRAGMA
    page_size=1024``: only a file without pages yet takes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(
        path, check_same_thread=False, isolation_level=None, timeout=LOCK_TIMEOUT_S
    )
    for pragma in new_file_pragmas:
        db.execute(pragma)
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() > deadline:
                db.close()
                raise
            time.sleep(_RETRY_EVERY_S)
    if mode != "wal":
        db.close()
        raise sqlite3.OperationalError(f"{path} stays in {mode} journal mode, not WAL")
    db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
    return db


def _busy(error: sqlite3.Error) -> bool:
    """SQLITE_BUSY or one of its extended codes: another connection holds the lock."""
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY
