"""The catalogue log: every acknowledged catalogue update, in order, durable before it is answered.

* :class:`SqliteCatalogueLog`: a table in one SQLite file (WAL, ``synchronous=FULL``) under the
  server's work folder, shared by every model instance of the server and kept across builds.
* :class:`RedisCatalogueLog`: the Stream ``shopserve:catalogue`` (``shopserve:NAME`` for a
  location whose query says ``catalogue=NAME``: shops sharing one Redis) in the Redis the servers
  share (which must fsync every write), so every server sees every update.

An update is appended whole or not at all, and its update id is recorded with a digest of its rows
in the same transaction: a retry is recognised and not applied twice, and an update id reused for
other rows is refused. The log is never rewritten by serving; each build can fold it in.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from . import store
from .catalogue import (
    UNKNOWN_STOCK,
    CatalogueRecord,
    CatalogueUpdate,
    Embed,
    LiveCatalogue,
    ProductUpdate,
    refresh_catalogue,
)
from .filters import Attributes
from .profile_store import STORE_ERRORS, failure_reason, redis_settings, store_failures
from .redis_link import is_redis
from .sqlite_link import connect_wal
from .validation import InvalidRequest

log = logging.getLogger("shopserve.catalogue")

CATALOGUE_LOG_ENV = "SHOPSERVE_CATALOGUE_LOG"  # where the catalogue log is (set by shopserve serve)
CATALOGUE_LOG_FILE = "catalogue.sqlite"  # the embedded log, under the server's work folder
_FIELDS = (
    "update_id",
    "operation",
    "product_id",
    "title",
    "price",
    "in_stock",
    "category",
    "encoder",
    "vector",
    "logged_at",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS catalogue_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    update_id TEXT NOT NULL,
    operation TEXT NOT NULL,
    product_id INTEGER NOT NULL,
    title TEXT NOT NULL,
    price REAL,
    in_stock INTEGER NOT NULL,
    category TEXT NOT NULL,
    encoder TEXT NOT NULL,
    vector BLOB,
    logged_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS catalogue_updates (
    update_id TEXT PRIMARY KEY,
    digest TEXT NOT NULL
) WITHOUT ROWID;
"""


def _rows(
    update: CatalogueUpdate, vectors: Sequence[np.ndarray | None] | None, encoder: str, now: float
) -> list[tuple]:
    """One log row per product (in _FIELDS order); upserts take the next of ``vectors`` (None:
    the product keeps its title, and its vector)."""
    rows, upserts = [], iter([None] * len(update.upserts()) if vectors is None else vectors)
    for p in update.products:
        given = next(upserts) if p.operation == "upsert" else None
        vector = None if given is None else np.asarray(given, dtype=np.float32).tobytes()
        rows.append((update.update_id, *p.fields(), "" if vector is None else encoder, vector, now))
    return rows


def _record(position: str, values: Sequence) -> CatalogueRecord:
    uid, operation, pid, title, price, stock, category, encoder, vector, logged_at = values
    product = ProductUpdate(
        operation,
        int(pid),
        title,
        math.nan if price is None or price == "" else float(price),
        int(stock),
        category,
    )
    array = np.frombuffer(vector, dtype=np.float32).copy() if vector else None
    return CatalogueRecord(position, float(logged_at), uid, product, encoder, array)


def _reused(update: CatalogueUpdate) -> InvalidRequest:
    return InvalidRequest(
        f"UPDATE_ID {update.update_id!r} was applied before with other rows; nothing applied "
        "(a retry must repeat its rows; a new update needs a new id)"
    )


class CatalogueLog(ABC):
    FAILURES: tuple[type[Exception], ...] = STORE_ERRORS  # what a failing log raises

    @abstractmethod
    def append(self, update: CatalogueUpdate, vectors: np.ndarray | None, encoder: str) -> bool:
        """Append an update's rows durably, all or nothing; False when its update id was applied
        before with the same rows (a retry: nothing appended); InvalidRequest when with others."""

    @abstractmethod
    def records(self, after: str = "") -> Iterator[CatalogueRecord]:
        """The log in order, from the record after position ``after`` ("": the start)."""

    @abstractmethod
    def close(self) -> None: ...


class SqliteCatalogueLog(CatalogueLog):
    PAGE = 5000

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db = connect_wal(self.path)
        self._db.executescript(_SCHEMA)

    def append(self, update: CatalogueUpdate, vectors: np.ndarray | None, encoder: str) -> bool:
        digest = update.digest()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            seen = self._db.execute(
                "SELECT digest FROM catalogue_updates WHERE update_id = ?", (update.update_id,)
            ).fetchone()
            if seen is not None:
                self._db.execute("ROLLBACK")
                if seen[0] != digest:
                    raise _reused(update)
                return False
            self._db.execute(
                "INSERT INTO catalogue_updates VALUES (?, ?)", (update.update_id, digest)
            )
            # Never before the last record (the clock may step back): times follow the log.
            last = self._db.execute(
                "SELECT logged_at FROM catalogue_log ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            now = max(time.time(), last[0] if last else 0.0)
            self._db.executemany(
                f"INSERT INTO catalogue_log ({', '.join(_FIELDS)}) "
                f"VALUES ({', '.join('?' * len(_FIELDS))})",
                _rows(update, vectors, encoder, now),
            )
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return True

    def records(self, after: str = "") -> Iterator[CatalogueRecord]:
        last = int(after or 0)
        while True:
            rows = self._db.execute(
                f"SELECT seq, {', '.join(_FIELDS)} FROM catalogue_log WHERE seq > ? ORDER BY seq "
                f"LIMIT {self.PAGE}",
                (last,),
            ).fetchall()
            for seq, *values in rows:
                yield _record(str(seq), values)
            if len(rows) < self.PAGE:
                return
            last = rows[-1][0]

    def close(self) -> None:
        self._db.close()


# Atomically: a known update id answers its digest; otherwise record it and XADD every row,
# logged at Redis's time and never before the last record (so the times follow the log's order,
# whatever the servers' clocks: a build skips the records up to the latest it folded by time).
# ARGV: update id, digest, fields per row, then each row's field/value pairs, logged_at last.
_APPEND = """
local seen = redis.call('HGET', KEYS[2], ARGV[1])
if seen then return seen end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local now = redis.call('TIME')
local at = tonumber(now[1]) + tonumber(now[2]) / 1e6
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last then
  for j = 1, #last[2], 2 do
    if last[2][j] == 'logged_at' then at = math.max(at, tonumber(last[2][j + 1])) end
  end
end
local logged_at = string.format('%.6f', at)
local width = 2 * tonumber(ARGV[3])
for i = 4, #ARGV, width do
  local row = {unpack(ARGV, i, i + width - 1)}
  row[width] = logged_at
  redis.call('XADD', KEYS[1], '*', unpack(row))
end
return false
"""


class RedisCatalogueLog(CatalogueLog):
    PAGE = 5000

    def __init__(self, location: str) -> None:
        from .redis_link import connect
        from .redis_store import require_fsync

        self.FAILURES = store_failures(location)
        settings = redis_settings(location)
        self.client = connect(settings.url, password=settings.password, ca_file=settings.ca_file)
        require_fsync(self.client, settings.url)
        self.append_script = self.client.register_script(_APPEND)
        self.stream = f"shopserve:{settings.catalogue}"

    def append(self, update: CatalogueUpdate, vectors: np.ndarray | None, encoder: str) -> bool:
        digest = update.digest()
        arguments: list = [update.update_id, digest, len(_FIELDS)]
        for row in _rows(update, vectors, encoder, 0.0):  # logged_at: set by the script
            for name, value in zip(_FIELDS, row, strict=True):
                arguments += [name, b"" if value is None else value]
        seen = self.append_script(keys=[self.stream, f"{self.stream}:updates"], args=arguments)
        if seen is None:
            return True
        if seen.decode() != digest:
            raise _reused(update)
        return False

    def records(self, after: str = "") -> Iterator[CatalogueRecord]:
        start = f"({after}" if after else "-"
        while True:
            entries = self.client.xrange(self.stream, start, "+", count=self.PAGE)
            for entry_id, fields in entries:
                values = [fields.get(name.encode(), b"") for name in _FIELDS]
                text = [v.decode() if i not in (8,) else v for i, v in enumerate(values)]
                yield _record(entry_id.decode(), text)
            if len(entries) < self.PAGE:
                return
            start = f"({entries[-1][0].decode()}"

    def close(self) -> None:
        self.client.close()


def open_catalogue_log(location: str | Path) -> CatalogueLog:
    """The catalogue log at ``location``: a Redis location (as for the profile store) or a path."""
    text = str(location)
    if is_redis(text):
        return RedisCatalogueLog(text)
    from .profile_store import sqlite_path

    return SqliteCatalogueLog(sqlite_path(text))


EXPORT_COLUMNS = ("product_id", "title", "price", "in_stock", "category", "operation", "logged_at")


def export_updates(log: CatalogueLog, path: Path) -> dict:
    """Write each product's latest state in the log as a catalogue update file (the catalogue
    format plus ``operation`` and ``logged_at``), in log order, for the next build to fold in;
    return what was written (``through``: the latest record's time)."""
    latest: dict[int, CatalogueRecord] = {}
    through = 0.0
    for record in log.records():
        latest.pop(record.product.product_id, None)  # re-insert: the dict keeps log order
        latest[record.product.product_id] = record
        through = max(through, record.logged_at)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(EXPORT_COLUMNS)
        for record in latest.values():
            p = record.product
            stock = "" if p.in_stock == UNKNOWN_STOCK else str(p.in_stock)
            price = "" if math.isnan(p.price) else repr(p.price)
            writer.writerow(
                [p.product_id, p.title, price, stock, p.category, p.operation, record.logged_at]
            )
    partial.replace(path)
    deletes = sum(r.product.operation == "delete" for r in latest.values())
    return {"products": len(latest), "deletes": deletes, "through": through}


class CatalogueWriter:
    """The catalogue endpoint's logic: embed the new titles of upserts with the served encoder,
    then append each update to the log (each all or nothing). An upsert that keeps its product's
    title (a new price or stock) is logged without a vector: its vector stays."""

    EMBED_BATCH = 256

    def __init__(
        self, log: CatalogueLog, embed: Embed, encoder: str, titles: LiveCatalogue | None = None
    ) -> None:
        self.log = log
        self.embed = embed
        self.encoder = encoder
        self.titles = titles  # the catalogue's titles now (the build's, with the log over it)

    @classmethod
    def from_repository(cls, repository: Path, version: int | None = None) -> CatalogueWriter:
        from .catalogue import encoder_digest
        from .models import OnnxEncoder
        from .pipeline import load_tokenizer

        location = os.environ.get(CATALOGUE_LOG_ENV)
        if not location:
            raise RuntimeError(f"no catalogue log: {CATALOGUE_LOG_ENV} is not set")
        tokenizer = load_tokenizer(repository, version)
        parameters = store.config_parameters(repository, store.CATALOGUE)
        encoder = OnnxEncoder(
            store.in_process_model_file(repository, store.ENCODER, version),
            int(parameters.get("intra_op_threads", "1")),
        )
        log = open_catalogue_log(location)
        titles = LiveCatalogue(store.load_catalogue(repository, version), Attributes(), log=log)
        titles.refresh()
        return cls(
            log,
            lambda texts: encoder.embed_texts(tokenizer, texts, cls.EMBED_BATCH),
            encoder_digest(repository, version),
            titles,
        )

    def write(self, updates: Sequence[CatalogueUpdate]) -> list[bool | Exception]:
        """For each update: True (applied), False (a retry of an applied one), the InvalidRequest
        that refused it, or the store's error that stopped it (that update and every later one
        are not written; the earlier ones are). The new titles of all of them are embedded
        together, before any is written."""
        refresh_catalogue(self.titles)
        retitled = [[self._retitled(p) for p in update.upserts()] for update in updates]
        titles = [
            p.title
            for update, flags in zip(updates, retitled, strict=True)
            for p, new in zip(update.upserts(), flags, strict=True)
            if new
        ]
        embedded = iter(self.embed(titles) if titles else [])
        results: list[bool | Exception] = []
        for update, flags in zip(updates, retitled, strict=True):
            vectors = [next(embedded) if new else None for new in flags]
            try:
                results.append(self.log.append(update, vectors, self.encoder))
            except InvalidRequest as exc:
                results.append(exc)
            except self.log.FAILURES as exc:  # this one and the rest are not written
                refused = len(updates) - len(results)
                log.warning(
                    "the catalogue log did not take the update (%s): %d update(s) refused "
                    "(UNAVAILABLE, retryable)",
                    failure_reason(exc),
                    refused,
                )
                return results + [exc] * refused
        return results

    def _retitled(self, product: ProductUpdate) -> bool:
        """Whether an upsert gives its product a title it does not have now (or adds it)."""
        if self.titles is None:
            return True
        row = self.titles.row_of.get(product.product_id)
        return row is None or self.titles.titles[row] != product.title
