"""Reading a catalogue and its relevance judgments from the documented generic format.

Catalogue (CSV or Parquet): ``product_id``, ``title``; optional ``description``, ``category``,
``brand``, ``price``. Judgments: ``query``, ``product_id``, graded ``relevance``. The Home Depot column
names (``product_uid``, ``product_title``, ``search_term``) are accepted as aliases, so its files are read
through this same path. Gains for nDCG are ``relevance - min_relevance`` (Home Depot grades 1..3).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from shopserve.ensemble.events import MAX_EVENT_ID_BYTES, MAX_FUTURE_S, event_key
from shopserve.ensemble.profile_store import ERASED_EVENT
from shopserve.ensemble.profiles import EVENT_TYPES
from shopserve.ensemble.validation import MAX_USER_ID_BYTES, has_word, plain_text

from shopserve.formats import (
    CATALOGUE_ALIASES,
    UNKNOWN_EVENT_TYPE,
    CsvFormatError,
    event_type,
    int64,
    parse_timestamp,
    read_csv,
)

DEFAULT_DATA_DIR = Path(os.environ.get("DATA_DIR", "../shared/data")) / "homedepot"
JUDGMENT_ALIASES = {"search_term": "query", "product_uid": "product_id"}
OPTIONAL_CATALOGUE_COLUMNS = ("description", "category", "brand", "price", "in_stock")
TEXT_CATALOGUE_COLUMNS = ("description", "category", "brand")  # read as plain_text, as titles

logger = logging.getLogger("shopserve.export.data")


class DataError(ValueError):
    """An input file is missing, unreadable or does not follow the documented format."""


def read_rows(
    path: Path, aliases: dict[str, str], required: tuple[str, ...]
) -> list[tuple[int, dict]]:
    """The rows of a CSV or Parquet file under the column names ``aliases`` maps to, each with its
    line (in a CSV file, the line it starts on; in Parquet, its row + 1: the header is line 1)."""
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from exc
        table = pq.read_table(path)
        columns, rows = table.column_names, list(enumerate(table.to_pylist(), start=2))
    elif path.suffix == ".csv":
        try:
            columns, numbered = read_csv(path)
            rows = list(numbered)
        except CsvFormatError as exc:
            raise DataError(str(exc)) from None
    else:
        raise DataError(f"{path}: expected a .csv or .parquet file")
    missing = [c for c in required if c not in {aliases.get(k, k) for k in columns}]
    if missing:
        raise DataError(f"{path}: missing columns {missing} (it has {columns})")
    if not rows:
        raise DataError(f"{path} has no rows")
    return [(line, {aliases.get(k, k): v for k, v in row.items()}) for line, row in rows]


_REPORTED_BAD_ROWS = 5


class RowProblems:
    """Bad rows of an input file by kind of problem: one error names the first rows of each kind
    and how many rows have it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.found: dict[str, list[str]] = {}

    def add(self, problem: str, line: int, value: object) -> None:
        self.found.setdefault(problem, []).append(f"row {line}: {value!r}")

    def check(self, problem: str, bad: bool, line: int, value: object) -> None:
        if bad:
            self.add(problem, line, value)

    def raise_any(self) -> None:
        if self.found:
            raise DataError(
                f"{self.path}: "
                + "; ".join(
                    f"{len(bad)} rows with {problem} (first: {', '.join(bad[:_REPORTED_BAD_ROWS])})"
                    for problem, bad in self.found.items()
                )
            )


def _integer(value: object) -> int | None:
    """``value`` as an int64, or None. A Parquet column may hold whole floats (7.0)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return int64(value)
    except ValueError:
        return None


def _finite(value: object) -> float | None:
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if np.isfinite(number) else None


@dataclass(frozen=True)
class CatalogueData:
    product_ids: np.ndarray  # int64
    titles: list[str]
    extra: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.product_ids)


@dataclass(frozen=True)
class Judgments:
    """Graded judgments grouped by query, in order of first appearance (log order)."""

    by_query: OrderedDict[str, dict[int, float]]
    min_relevance: float

    @property
    def queries(self) -> list[str]:
        return list(self.by_query)

    def gains(self, query: str) -> dict[int, float]:
        return {pid: rel - self.min_relevance for pid, rel in self.by_query[query].items()}

    def subset(self, queries: list[str]) -> Judgments:
        return Judgments(OrderedDict((q, self.by_query[q]) for q in queries), self.min_relevance)

    def without(self, products: set[int]) -> Judgments:
        """The judgments of the other products (a query left with none is dropped)."""
        kept = (
            (q, {p: g for p, g in grades.items() if p not in products})
            for q, grades in self.by_query.items()
        )
        return Judgments(OrderedDict((q, g) for q, g in kept if g), self.min_relevance)

    def __len__(self) -> int:
        return len(self.by_query)


def load_catalogue(path: Path) -> CatalogueData:
    numbered = read_rows(path, CATALOGUE_ALIASES, ("product_id", "title"))
    problems = RowProblems(path)
    ids, titles, first_line, decoded = [], [], {}, 0
    for line, row in numbered:
        raw_title = str(row["title"] or "")
        product, title = _integer(row["product_id"]), plain_text(raw_title).strip()
        decoded += title != raw_title.strip()
        problems.check(
            "a product_id that is not a 64-bit integer", product is None, line, row["product_id"]
        )
        problems.check("an empty title", not title, line, row["title"])
        problems.check(
            "a title without a letter or digit", bool(title) and not has_word(title), line, title
        )
        if product is not None and first_line.setdefault(product, line) != line:
            problems.add(
                f"a product_id already given (on row {first_line[product]})", line, product
            )
        ids.append(product or 0)
        titles.append(title)
    problems.raise_any()
    if decoded:
        logger.info("%s: decoded HTML character references in %d titles", path, decoded)
    rows = [row for _, row in numbered]
    extra = {
        c: [
            plain_text(r[c]) if c in TEXT_CATALOGUE_COLUMNS and isinstance(r[c], str) else r[c]
            for r in rows
        ]
        for c in OPTIONAL_CATALOGUE_COLUMNS
        if c in rows[0]
    }
    return CatalogueData(np.array(ids, dtype=np.int64), titles, extra)


UPDATED_COLUMNS = ("category", "price", "in_stock")  # what a catalogue update sets besides title


def fold_catalogue_updates(catalogue: CatalogueData, path: Path) -> tuple[CatalogueData, dict]:
    """``catalogue`` with a catalogue update file (``shopserve catalogue export``) applied: an
    upsert replaces a product's title, category, price and stock (its other columns stay) or
    adds it at the end; a delete removes it. Returns the catalogue and what was folded (``through``:
    the latest update's log time, up to which serving skips the log)."""
    updates = read_rows(path, CATALOGUE_ALIASES, ("product_id", "title", "operation", "logged_at"))
    # A column the catalogue lacks starts with the first update that gives it a value (as when
    # serving): an export names all of them, mostly empty.
    given = [c for c in UPDATED_COLUMNS if any(str(u.get(c) or "").strip() for _, u in updates)]
    columns = list(dict.fromkeys([*catalogue.extra, *given]))
    products: dict[int, dict] = {
        int(pid): {
            "title": title,
            **{c: catalogue.extra.get(c, [""] * len(catalogue))[row] for c in columns},
        }
        for row, (pid, title) in enumerate(
            zip(catalogue.product_ids.tolist(), catalogue.titles, strict=True)
        )
    }
    counts = {"upserts": 0, "deletes": 0}
    through = 0.0
    for line, update in updates:
        try:
            pid, logged_at = int(update["product_id"]), float(update["logged_at"])
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"{path}: line {line}: product_id and logged_at must be numbers ({exc})"
            ) from None
        operation = str(update["operation"] or "upsert").strip().lower()
        through = max(through, logged_at)
        if operation == "delete":
            counts["deletes"] += products.pop(pid, None) is not None
        elif operation == "upsert":
            kept = products.get(pid, dict.fromkeys(columns, ""))  # a new product goes last
            products[pid] = {
                **kept,
                "title": str(update["title"]).strip(),
                **{c: update[c] or "" for c in UPDATED_COLUMNS if c in update and c in columns},
            }
            counts["upserts"] += 1
        else:
            raise DataError(f"{path}: line {line}: operation {operation!r} is not upsert or delete")
    folded = CatalogueData(
        np.array(list(products), dtype=np.int64),
        [p["title"] for p in products.values()],
        {c: [p[c] for p in products.values()] for c in columns},
    )
    return folded, {**counts, "through": through, "products": len(folded)}


def load_judgments(path: Path, catalogue: CatalogueData) -> Judgments:
    rows = read_rows(path, JUDGMENT_ALIASES, ("query", "product_id", "relevance"))
    known = set(catalogue.product_ids.tolist())
    problems = RowProblems(path)
    by_query: OrderedDict[str, dict[int, float]] = OrderedDict()
    for line, row in rows:
        query, pid = str(row["query"] or "").strip(), _integer(row["product_id"])
        relevance = _finite(row["relevance"])
        problems.check("an empty query", not query, line, row["query"])
        problems.check(
            "a product_id not in the catalogue", pid not in known, line, row["product_id"]
        )
        problems.check(
            "a relevance that is not a number", relevance is None, line, row["relevance"]
        )
        if query and pid in known and relevance is not None:
            by_query.setdefault(query, {})[pid] = relevance
    problems.raise_any()
    grades = {r for judged in by_query.values() for r in judged.values()}
    if len(grades) < 2:
        raise DataError(
            f"{path}: every relevance is {grades.pop():g}; nDCG needs at least two grades (the "
            "lowest is no gain)"
        )
    return Judgments(by_query, min(grades))


def split_queries(
    queries: list[str], dev_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """A seeded query-level split: no query is in both parts; each part keeps log order."""
    shuffled = list(queries)
    random.Random(seed).shuffle(shuffled)
    dev = set(shuffled[: round(len(shuffled) * dev_fraction)])
    return [q for q in queries if q not in dev], [q for q in queries if q in dev]


def fingerprint(paths: list[Path]) -> dict[str, str]:
    """sha256 of each input file, keyed by file name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@dataclass(frozen=True)
class EventsData:
    """A behaviour log sorted by (user, timestamp); ``events`` index EVENT_TYPES, ``basket_ids`` are
    "" where the file gives none (the profile then infers baskets from sessions). ``event_ids``:
    the shop file's ``event_id`` column (an exported log's ``event_key``), "" where none."""

    user_ids: list[str]
    product_ids: np.ndarray  # int64
    timestamps: np.ndarray  # float64, epoch seconds
    events: np.ndarray  # int8
    basket_ids: list[str]
    event_ids: list[str]

    def __len__(self) -> int:
        return len(self.product_ids)

    def by_user(self) -> dict[str, range]:
        """Each user's events, as a range of positions (events are sorted by user)."""
        spans: dict[str, range] = {}
        start = 0
        for i in range(1, len(self.user_ids) + 1):
            if i == len(self.user_ids) or self.user_ids[i] != self.user_ids[start]:
                spans[self.user_ids[start]] = range(start, i)
                start = i
        return spans

    def without(self, products: set[int]) -> EventsData:
        """The events of the other products (a delisted product's history goes with it)."""
        drop = np.fromiter(products, dtype=np.int64, count=len(products))
        keep = ~np.isin(self.product_ids, drop)
        rows = np.flatnonzero(keep).tolist()
        return EventsData(
            [self.user_ids[i] for i in rows],
            self.product_ids[keep],
            self.timestamps[keep],
            self.events[keep],
            [self.basket_ids[i] for i in rows],
            [self.event_ids[i] for i in rows],
        )


def event_kind(name: object) -> int | None:
    """The index in EVENT_TYPES of an events file's event name (or alias); None if unknown."""
    kind = event_type(name)
    return None if kind is None else EVENT_TYPES.index(kind)


def load_events(path: Path, catalogue: CatalogueData) -> EventsData:
    """Read and validate an events file; each kind of problem names its first rows and its count."""
    rows = read_rows(path, {}, ("user_id", "product_id", "timestamp", "event"))
    return _events(path, rows, catalogue, "user_id", "event_id")


def _events(
    path: Path,
    rows: list[tuple[int, dict]],
    catalogue: CatalogueData,
    id_column: str,
    event_column: str,
) -> EventsData:
    """Validated (line, row) pairs (line 1 is the header; ``id_column`` names the shopper,
    ``event_column`` the event) as EventsData, sorted by (shopper, time)."""
    known = set(catalogue.product_ids.tolist())
    problems = RowProblems(path)
    horizon = time.time() + MAX_FUTURE_S
    parsed = []
    for line, row in rows:
        user = str(row[id_column] or "").strip()
        product = _integer(row["product_id"])
        try:
            when = parse_timestamp(row["timestamp"])
        except (TypeError, ValueError):
            when = None
        kind = event_kind(row["event"])
        basket, event = str(row.get("basket_id") or ""), str(row.get(event_column) or "")
        user_bytes = len(user.encode())
        id_bytes = max(len(basket.strip().encode()), len(event.strip().encode()))
        for problem, bad, value in (
            (f"an empty {id_column}", not user, row[id_column]),
            # The server refuses longer ones: such a shopper could never be asked about. The
            # value is not shown (a shopper's id).
            (
                f"a {id_column} over {MAX_USER_ID_BYTES} bytes",
                user_bytes > MAX_USER_ID_BYTES,
                f"{user_bytes} bytes",
            ),
            (
                f"a basket_id or {event_column} over {MAX_EVENT_ID_BYTES} bytes",
                id_bytes > MAX_EVENT_ID_BYTES,
                f"{id_bytes} bytes",
            ),
            ("unknown product ids", product not in known, row["product_id"]),
            ("unparseable timestamps", when is None, row["timestamp"]),
            (
                "timestamps before the epoch or over a day ahead (seconds, not milliseconds)",
                when is not None and not 0 <= when <= horizon,
                row["timestamp"],
            ),
            (UNKNOWN_EVENT_TYPE, kind is None, row["event"]),
        ):
            problems.check(problem, bad, line, value)
        parsed.append(
            (
                user,
                when or 0.0,
                product or 0,
                kind or 0,
                basket,
                event,
            )
        )
    problems.raise_any()
    return _sorted_events(parsed)


def _sorted_events(parsed: list[tuple[str, float, int, int, str, str]]) -> EventsData:
    parsed.sort(key=lambda r: (r[0], r[1]))
    return EventsData(
        [r[0] for r in parsed],
        np.array([r[2] for r in parsed], dtype=np.int64),
        np.array([r[1] for r in parsed], dtype=np.float64),
        np.array([r[3] for r in parsed], dtype=np.int8),
        [r[4].strip() for r in parsed],
        [r[5].strip() for r in parsed],
    )


@dataclass(frozen=True)
class EventLog:
    """An exported event log: events under keyed hashes (deduplicated by event key), and when each
    erased shopper was forgotten."""

    events: EventsData  # of an erased shopper, only those after the erasure in log order
    erased: dict[str, float]  # keyed hash -> the time of the erasure
    duplicates: int  # rows whose event key came before (a retried write)

    def event_keys(self) -> dict[str, set[str]]:
        """Each shopper's logged event keys (a build records them: no replay counts them again)."""
        keys: dict[str, set[str]] = {}
        for user, key in zip(self.events.user_ids, self.events.event_ids, strict=True):
            keys.setdefault(user, set()).add(key)
        return keys


def load_event_log(path: Path, catalogue: CatalogueData) -> EventLog:
    """Read an export of a live store's event log (``shopserve events export``), in log order. Of
    a shopper it erased, the events after the erasure in the file are kept (whatever their own
    timestamps say: the clients' clocks are not the log's order)."""
    rows = read_rows(path, {}, ("user_key", "product_id", "timestamp", "event", "event_key"))
    erasure_lines: dict[str, int] = {}
    erased: dict[str, float] = {}
    for line, row in rows:
        if str(row["event"]).strip() == ERASED_EVENT:
            user = str(row["user_key"]).strip()
            erasure_lines[user], erased[user] = line, parse_timestamp(row["timestamp"])
    events, seen, duplicates = [], set(), 0
    for line, row in rows:
        user = str(row["user_key"]).strip()
        if str(row["event"]).strip() == ERASED_EVENT or line < erasure_lines.get(user, 0):
            continue
        if (user, row["event_key"]) in seen:
            duplicates += 1
        else:
            seen.add((user, row["event_key"]))
            events.append((line, row))
    return EventLog(_events(path, events, catalogue, "user_key", "event_key"), erased, duplicates)


class HashedIds:
    """Stands in for the user-id secret where the ids are keyed hashes already: a build that read
    an exported event log hashes the shop's own ids when it loads them."""

    def key(self, user_id: str) -> str:
        return user_id


def with_event_log(events: EventsData, key: Callable[[str], str], log: EventLog) -> EventsData:
    """The shop's events under keyed hashes (``key``) together with the log's; of a shopper the
    log erased, only the shop's events after the erasure are kept (the log holds only those
    logged after it). A logged event whose key is a shop
    event's (the same ``event_id`` of the same shopper: the shop's files already hold the event
    that reached the server live) counts once."""
    hashed = [key(user) for user in events.user_ids]
    shop_keys = [
        event_key(user, event) if event else ""
        for user, event in zip(hashed, events.event_ids, strict=True)
    ]
    in_shop_files = set(shop_keys) - {""}
    logged = _rows(log.events, log.events.user_ids, log.events.event_ids)
    kept = [r for r in logged if r[5] not in in_shop_files]
    if len(kept) < len(logged):
        logger.info(
            "%d logged events are in the shop's files too: counted once", len(logged) - len(kept)
        )
    shop = [r for r in _rows(events, hashed, shop_keys) if r[1] > log.erased.get(r[0], -np.inf)]
    return _sorted_events(shop + kept)


def _rows(
    source: EventsData, users: list[str], event_keys: list[str]
) -> list[tuple[str, float, int, int, str, str]]:
    """``source``'s events as rows under ``users`` (keyed hashes) and ``event_keys``."""
    return [
        (user, float(when), int(product), int(kind), basket, event)
        for user, when, product, kind, basket, event in zip(
            users,
            source.timestamps,
            source.product_ids,
            source.events,
            source.basket_ids,
            event_keys,
            strict=True,
        )
    ]
