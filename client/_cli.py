"""``shopserve search``: query the search endpoint from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import TypeVar

from shopserve.formats import (
    CATALOGUE_ALIASES,
    UNKNOWN_EVENT_TYPE,
    event_type,
    in_stock,
    int64,
    parse_timestamp,
    read_csv,
)

from ._client import (
    _INT32,
    DEFAULT_URL,
    Event,
    Filters,
    Hit,
    ProductChange,
    SearchClient,
    Security,
)
from ._errors import InvalidRequestError, SearchError
from ._replicas import checked_addresses

TITLE_WIDTH = 70
REASONS_SHOWN = 3  # --explain: the largest contributions printed under each hit


def _one_line(text: str, width: int) -> str:
    """Collapse whitespace (titles may hold newlines or tabs) and cut to ``width`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(hits: Sequence[Hit]) -> str:
    """Render hits as an aligned table: rank, score (4 decimals), product id, title; under a hit
    with an explanation, its largest reasons."""
    header = ("rank", "score", "product_id", "title")
    rows = [
        (str(hit.rank), f"{hit.score:.4f}", str(hit.product_id), _one_line(hit.title, TITLE_WIDTH))
        for hit in hits
    ]
    widths = [max(len(row[col]) for row in [header, *rows]) for col in range(3)]
    indent = " " * (sum(widths) + 6)
    lines = []
    for hit, (rank, score, product_id, title) in zip([None, *hits], [header, *rows], strict=True):
        line = f"{rank:>{widths[0]}}  {score:>{widths[1]}}  {product_id:>{widths[2]}}  {title}"
        lines.append(line.rstrip())
        if hit is not None and hit.explanation is not None:
            lines.extend(
                f"{indent}{reason.contribution:+.2f} {reason.signal}: {reason.text}"
                for reason in hit.explanation.reasons[:REASONS_SHOWN]
            )
    return "\n".join(lines)


def format_json_lines(hits: Sequence[Hit]) -> str:
    """One JSON object per hit, one per line (with its explanation when it has one)."""

    def row(hit: Hit) -> dict:
        fields = dataclasses.asdict(hit)
        if hit.explanation is None:
            del fields["explanation"]
        return fields

    return "\n".join(json.dumps(row(hit), ensure_ascii=False) for hit in hits)


def _parser(recommend: bool = False) -> argparse.ArgumentParser:
    if recommend:
        parser = argparse.ArgumentParser(
            prog="shopserve recommend", description="A shopper's recommendations."
        )
        parser.add_argument("user_id", help="the shopper's id")
        parser.add_argument(
            "--new-only", action="store_true", help="only products the shopper never bought"
        )
    else:
        parser = argparse.ArgumentParser(
            prog="shopserve search", description="Search the product catalogue."
        )
        parser.add_argument("query", help="search text")
        parser.add_argument("--user", help="personalise for this shopper's id")
    parser.add_argument("--in-stock", action="store_true", help="only products in stock")
    parser.add_argument("--price-min", type=float, help="only products at this price or above")
    parser.add_argument("--price-max", type=float, help="only products at this price or below")
    parser.add_argument(
        "--category", help='only products in this category path or below it ("Tools / Drills")'
    )
    parser.add_argument(
        "-k", "--top-k", type=_int32, default=10, help="number of results (default: 10)"
    )
    _connection(parser, timeout=5.0)
    parser.add_argument(
        "--explain",
        action="store_true",
        help=f"under each hit, its {REASONS_SHOWN} largest reasons (all of them with --json)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    return parser


def _int32(text: str) -> int:
    """An integer that the request's INT32 tensor can hold (the server checks the range)."""
    value = int(text)
    if not _INT32.min <= value <= _INT32.max:  # the range the client's tensor holds
        raise argparse.ArgumentTypeError(f"{value} does not fit in a 32-bit integer")
    return value


def main(argv: list[str] | None = None, recommend: bool = False) -> int:
    """Run ``shopserve search`` (or ``shopserve recommend``); ``argv`` excludes the program and
    subcommand names.

    Returns 0 on success, 2 when the server rejects the request, 1 on any other error.
    """
    args = _parser(recommend).parse_args(argv)
    try:
        with _client(args) as client:
            filters = Filters(args.in_stock, args.price_min, args.price_max, args.category)
            if recommend:
                hits = client.recommend(
                    args.user_id,
                    top_k=args.top_k,
                    new_only=args.new_only,
                    filters=filters,
                    explain=args.explain,
                )
            else:
                hits = client.search(
                    args.query,
                    top_k=args.top_k,
                    user_id=args.user,
                    filters=filters,
                    explain=args.explain,
                )
    except SearchError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidRequestError) else 1
    output = format_json_lines(hits) if args.json else format_table(hits)
    if output:
        print(output)
    return 0


def _connection(parser: argparse.ArgumentParser, timeout: float = 30.0) -> None:
    """The options every command shares: where the server is, the deadline, TLS and keys."""
    parser.add_argument(
        "--url",
        type=_address,
        default=DEFAULT_URL,
        help=f"Triton gRPC address (default: {DEFAULT_URL}); several replicas: commas between them",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=timeout,
        help=f"deadline of each request in seconds (default: {timeout:g})",
    )
    parser.add_argument(
        "--tls-ca",
        type=_readable,
        help="connect over TLS, trusting this CA (PEM; default with --tls-cert: the system's CAs)",
    )
    parser.add_argument(
        "--tls-cert",
        type=_readable,
        help="connect over TLS with this client certificate (PEM; needs --tls-key)",
    )
    parser.add_argument("--tls-key", type=_readable, help="the client certificate's key (PEM)")
    parser.add_argument("--inference-key-file", type=_readable, help="the server's inference key")
    parser.add_argument(
        "--admin-key-file",
        type=_readable,
        help="the operator's key (needed by forget, catalogue updates and rollout's model control)",
    )


def _address(text: str) -> str:
    try:
        checked_addresses(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _readable(text: str) -> str:
    """A file option's path, once the file reads (else an argparse error, exit status 2)."""
    try:
        Path(text).read_bytes()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {exc.strerror}") from None
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


MAX_BATCH = 1024  # rows a request may carry: the events and catalogue endpoints' limit


def _batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_BATCH:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 1 to {MAX_BATCH:,} (a request's limit), got {text!r}"
        )
    return value


def _security(args: argparse.Namespace) -> Security:
    """The connection's TLS and keys. A client certificate asks for TLS, trusting the system's CAs
    unless ``--tls-ca`` names one: it never goes out over plain text. A certificate without its
    key (or the reverse) is an error (exit status 2)."""
    if bool(args.tls_cert) != bool(args.tls_key):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        raise SystemExit(2)

    def key(path: str | None) -> str | None:
        return Path(path).read_text().strip() if path else None

    return Security(
        ssl=bool(args.tls_ca or args.tls_cert),
        root_certificates=args.tls_ca,
        private_key=args.tls_key,
        certificate_chain=args.tls_cert,
        inference_key=key(args.inference_key_file),
        admin_key=key(args.admin_key_file),
    )


def _client(args: argparse.Namespace) -> SearchClient:
    return SearchClient(args.url, timeout=args.timeout, security=_security(args))


_EVENT_COLUMNS = ("user_id", "product_id", "timestamp", "event")


def _digest(path: Path) -> str:
    """What a file's event and update ids start with: its content's, so editing it changes them."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:16]


def _checked_csv(path: Path) -> tuple[list[str], int]:
    """A CSV file's header and number of rows, once every row has read well-formed (else
    CsvFormatError): a malformed file is refused before anything of it is sent. A pass over the
    file, not a copy of it in memory."""
    columns, rows = read_csv(path)
    return columns, sum(1 for _ in rows)


def read_events(path: Path) -> Iterator[tuple[int, Event]]:
    """The events of a generic events CSV (user_id, product_id, timestamp, event, basket_id), each
    with the file line it was read from. Each event's id is the file's digest and its line, so
    importing a file again counts nothing twice."""
    digest = _digest(path)
    columns, _ = _checked_csv(path)
    missing = [c for c in _EVENT_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    for line, row in read_csv(path)[1]:
        try:
            product, when = int64(row["product_id"]), parse_timestamp(row["timestamp"])
        except ValueError as exc:
            raise ValueError(f"{path}: line {line}: {exc}") from exc
        kind = event_type(row["event"])
        if kind is None:
            raise ValueError(f"{path}: line {line}: {row['event']!r}: {UNKNOWN_EVENT_TYPE}")
        event_id = f"{digest}:{line}"
        yield line, Event(row["user_id"], product, kind, when, event_id, row.get("basket_id") or "")


T = TypeVar("T")


def _batches(numbered: Iterable[tuple[int, T]], size: int) -> Iterator[tuple[list[int], list[T]]]:
    """(line, item) pairs in batches of ``size``: each batch's lines and its items."""
    pairs = iter(numbered)
    while batch := list(islice(pairs, size)):
        yield [line for line, _ in batch], [item for _, item in batch]


# Where a server's error names rows of the batch (0-based): the events endpoint names the first
# bad one ("PRODUCT_IDS[86] = ..."), the catalogue endpoint every one ("...: rows 0, 3").
_EVENT_POSITION = re.compile(r"\b[A-Z_]+\[(\d+)\]")
_UPDATE_ROWS = re.compile(r"\brows (\d+(?:, \d+)*)")


@contextmanager
def _file_lines(path: Path, lines: Sequence[int]) -> Iterator[None]:
    """Name the rows of a batch the server refuses by the lines of ``path`` they were read from
    (``lines``: the batch's, in order)."""
    try:
        yield
    except SearchError as exc:
        position = _EVENT_POSITION.search(exc.message)
        if position:
            message = f"{path} line {lines[int(position[1])]}: {exc.message}"
        elif _UPDATE_ROWS.search(exc.message):
            message = f"{path}: " + _UPDATE_ROWS.sub(
                lambda rows: "lines " + ", ".join(str(lines[int(r)]) for r in rows[1].split(", ")),
                exc.message,
            )
        else:
            raise
        raise type(exc)(message, exc.status) from None


def events_main(argv: list[str] | None = None) -> int:
    """``shopserve events import FILE``: back-fill a log through the events endpoint."""
    parser = argparse.ArgumentParser(
        prog="shopserve events", description="Back-fill events through the events endpoint."
    )
    parser.add_argument("action", choices=["import"])
    parser.add_argument("file", type=Path, help="an events CSV in the generic format")
    parser.add_argument("--batch-size", type=_batch_size, default=256, help="events per request")
    _connection(parser)
    args = parser.parse_args(argv)
    sent = new = 0
    try:
        with _client(args) as client:
            for lines, batch in _batches(read_events(args.file), args.batch_size):
                with _file_lines(args.file, lines):
                    new += client.record_many(batch)
                sent += len(batch)
    except (SearchError, OSError, ValueError) as exc:
        print(f"error after {sent} events: {exc}", file=sys.stderr)
        return 1
    print(f"sent {sent} events from {args.file}: {new} new, {sent - new} recorded before")
    return 0


class CatalogueFileError(ValueError):
    """A catalogue update file's line cannot be read; the message names it."""


def _change(row: dict[str, str]) -> ProductChange:
    """A catalogue update file's row; ValueError naming what is wrong with it."""
    row = {CATALOGUE_ALIASES.get(k, k): v.strip() for k, v in row.items()}
    operation = row.get("operation", "").lower() or "upsert"
    if operation not in ("upsert", "delete"):
        raise ValueError(f"operation {operation!r} is not upsert or delete")
    try:
        product_id = int64(row["product_id"])
    except ValueError as exc:
        raise ValueError(f"product_id {exc}") from None
    try:
        price = float(row["price"]) if row.get("price") else None
    except ValueError:
        raise ValueError(f"price {row['price']!r} is not a number") from None
    return ProductChange(
        product_id,
        row.get("title", ""),
        price,
        in_stock(row.get("in_stock")),
        row.get("category", ""),
        delete=operation == "delete",
    )


def read_catalogue_changes(
    path: Path, batch_size: int
) -> Iterator[tuple[str, list[int], list[ProductChange]]]:
    """Batches of a catalogue update file (the catalogue format plus an optional ``operation``
    column, upsert or delete), each with an update id made of the file's digest and its first
    line, so that applying a file again changes nothing twice, and its rows' file lines."""
    digest = _digest(path)
    columns, count = _checked_csv(path)
    if "product_id" not in {CATALOGUE_ALIASES.get(c, c) for c in columns}:
        raise CatalogueFileError(f"{path}: missing columns ['product_id'] (it has {columns})")
    if not count:
        raise CatalogueFileError(f"{path} has no rows")

    def changes() -> Iterator[tuple[int, ProductChange]]:
        for line, row in read_csv(path)[1]:
            try:
                yield line, _change(row)
            except ValueError as exc:
                raise CatalogueFileError(f"{path}: line {line}: {exc}") from None

    for lines, batch in _batches(changes(), batch_size):
        yield f"{digest}:{lines[0]}", lines, batch


def catalogue_main(argv: list[str] | None = None) -> int:
    """``shopserve catalogue apply FILE``: upsert and delete products while serving."""
    parser = argparse.ArgumentParser(
        prog="shopserve catalogue",
        description="Upsert and delete products on a running server (the catalogue format plus "
        "an operation column: upsert, the default, or delete).",
    )
    parser.add_argument("action", choices=["apply"])
    parser.add_argument(
        "file", type=Path, help="a catalogue CSV, optionally with an operation column"
    )
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default=500,
        help="products per update (each all or nothing)",
    )
    _connection(parser)
    args = parser.parse_args(argv)
    sent = applied = 0
    try:
        with _client(args) as client:
            for update_id, lines, changes in read_catalogue_changes(args.file, args.batch_size):
                with _file_lines(args.file, lines):
                    applied += client.update_catalogue(changes, update_id).applied
                sent += len(changes)
    except SearchError as exc:
        print(f"error after {sent} products: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidRequestError) else 1
    except (OSError, ValueError) as exc:
        print(f"error after {sent} products: {exc}", file=sys.stderr)
        return 2
    print(
        f"sent {sent} products from {args.file}: {applied} applied, {sent - applied} applied before"
    )
    return 0


def forget_main(argv: list[str] | None = None) -> int:
    """``shopserve forget USER_ID``: erase everything stored about a shopper."""
    parser = argparse.ArgumentParser(
        prog="shopserve forget", description="Erase everything stored about a shopper."
    )
    parser.add_argument("user_id")
    _connection(parser)
    args = parser.parse_args(argv)
    try:
        with _client(args) as client:
            found = client.forget(args.user_id)
    except SearchError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidRequestError) else 1
    except ValueError as exc:  # no operator's key given
        print(f"error: {exc} (shopserve forget --admin-key-file FILE)", file=sys.stderr)
        return 2
    print("forgotten" if found else "nothing was stored about this shopper")
    return 0
