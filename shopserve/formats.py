"""How the generic files read (well-formed UTF-8 CSV; the catalogue's column names, ids and stock,
the events' types and timestamps): one reading for the build (shopserve.export, shopserve.ensemble)
and for the CLI's ``events import`` and ``catalogue apply`` (shopserve.client). Standard library
only, so the client imports it without the export's or the server's dependencies."""

from __future__ import annotations

import csv
import io
import re
from datetime import datetime, timezone
from pathlib import Path


class CsvFormatError(ValueError):
    """A file that is not well-formed CSV in UTF-8; the message names the file and the line."""


class _Lines:
    """A text's lines for csv.reader, noting whether the reader asked past the last one."""

    def __init__(self, text: str) -> None:
        self._lines = iter(io.StringIO(text, newline=""))
        self.ended = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        try:
            return next(self._lines)
        except StopIteration:
            self.ended = True
            raise


def read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and the rows of a CSV file, each row with the file line it starts on (the header
    is line 1; blank lines are skipped). The file must be UTF-8 (a spreadsheet's byte-order mark is
    skipped) and well-formed, or CsvFormatError names the file and the line: of a byte that is not
    UTF-8, of a row with more or fewer fields than the header, of a quote that is never closed
    (it would swallow the rows after it)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CsvFormatError(
            f"{path}: line {line}: byte {data[exc.start]:#04x} (at offset {exc.start}) is not "
            "UTF-8; the file must be UTF-8 (iconv -f LATIN1 -t UTF-8 converts a Latin-1 file)"
        ) from None
    lines = _Lines(text)
    reader = csv.reader(lines, strict=True)
    header: list[str] | None = None
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return header or [], rows
        except csv.Error as exc:
            problem = "a quote in this row is never closed" if lines.ended else str(exc)
            raise CsvFormatError(f"{path}: line {start}: {problem}") from None
        if not fields:
            continue
        if header is None:
            header = fields
        elif len(fields) != len(header):
            raise CsvFormatError(
                f"{path}: line {start}: expected {len(header)} fields, got {len(fields)}"
            )
        else:
            rows.append((start, dict(zip(header, fields, strict=True))))


def int64(cell: object) -> int:
    """A cell's integer, such as a product id (an INT64 tensor's); ValueError if it is not one or
    does not fit in 64 bits."""
    text = str(cell).strip()
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None
    if not -(2**63) <= number < 2**63:
        raise ValueError(f"{number} does not fit in a 64-bit integer")
    return number


EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")
# Other systems' names for them, as their logs write them: read case-blind, with '-' as '_', so
# that a shop's log needs no renaming.
EVENT_ALIASES = {
    "addtocart": "add_to_cart",  # RetailRocket
    "transaction": "purchase",  # RetailRocket
    "cart": "add_to_cart",  # REES46
    "view_item": "view",  # Google Analytics 4
    "select_item": "click",  # Google Analytics 4
}
UNKNOWN_EVENT_TYPE = (
    f"unknown event types (known: {', '.join(EVENT_TYPES)}, "
    f"or {', '.join(EVENT_ALIASES)}; drop other events' rows first)"
)
_UTC_SUFFIX = re.compile(
    r"\s*(?:UTC|GMT)$", re.IGNORECASE
)  # "2019-10-01 00:00:00 UTC" (BigQuery's)


def event_type(name: object) -> str | None:
    """The event type (one of EVENT_TYPES) an events file's name or alias stands for; None if
    it is none of them."""
    text = str(name or "").strip().lower().replace("-", "_")
    text = EVENT_ALIASES.get(text, text)
    return text if text in EVENT_TYPES else None


def parse_timestamp(value: object) -> float:
    """Epoch seconds from ISO 8601 text (UTC unless it says otherwise, as a trailing "UTC" or
    "GMT" does) or a number of seconds; ValueError if it is neither."""
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    parsed = datetime.fromisoformat(_UTC_SUFFIX.sub("+00:00", text))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


# The catalogue file's column names as Home Depot's data writes them.
CATALOGUE_ALIASES = {"product_uid": "product_id", "product_title": "title"}
# in_stock: ours, and the availability values of schema.org and Google Merchant feeds ("InStock",
# "https://schema.org/OutOfStock", "in_stock", "out of stock"), read case-blind.
IN_STOCK_YES = ("1", "true", "yes", "y", "instock")
IN_STOCK_NO = ("0", "false", "no", "n", "outofstock", "soldout")
IN_STOCK_VALUES = "1/true/yes/y/in_stock or 0/false/no/n/out_of_stock/sold_out"


def in_stock(cell: object) -> bool | None:
    """Whether a catalogue file's in_stock cell says in stock; None for an empty cell (unknown).
    ValueError for any other value."""
    text = str(cell or "").strip().lower().rpartition("/")[2]
    if not text:
        return None
    key = text.replace("_", "").replace("-", "").replace(" ", "")
    if key in IN_STOCK_YES:
        return True
    if key in IN_STOCK_NO:
        return False
    raise ValueError(f"in_stock must be one of {IN_STOCK_VALUES} or empty, not {text!r}")
