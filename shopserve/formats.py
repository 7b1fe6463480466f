"""How the generic files read (well-formed UTF-8 CSV; the catalogue's column names, ids and stock,
the events' types and timestamps): one reading for the build (shopserve.export, shopserve.ensemble)
and for the CLI's ``events import`` and ``catalogue apply`` (shopserve.client). Standard library
only, so the client imports it without the export's or the server's dependencies."""

from __future__ import annotations

import codecs
import csv
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path


class CsvFormatError(ValueError):
    """A file that is not well-formed CSV in UTF-8; the message names the file and the line."""


class _Lines:
    """A text file's lines for csv.reader, noting whether the reader asked past the last one."""

    def __init__(self, handle: Iterator[str]) -> None:
        self._lines = handle
        self.ended = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        try:
            return next(self._lines)
        except StopIteration:
            self.ended = True
            raise


CsvRows = Iterator[tuple[int, dict[str, str]]]


def read_csv(path: Path) -> tuple[list[str], CsvRows]:
    """The header of a CSV file and its rows, read as they are iterated, each with the file line it
    starts on (the header is line 1; blank lines are skipped). The file must be UTF-8 (a
    spreadsheet's byte-order mark is skipped) and well-formed, or CsvFormatError names the file and
    the line: of a byte that is not UTF-8, of a row with more or fewer fields than the header, of a
    quote that is never closed (it would swallow the rows after it)."""
    handle = path.open(encoding="utf-8-sig", newline="")
    lines = _Lines(handle)
    reader = csv.reader(lines, strict=True)

    def next_fields() -> tuple[int, list[str]] | None:
        """The next non-blank row and the line it starts on; None at the end."""
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return None
            except csv.Error as exc:
                raise CsvFormatError(f"{path}: line {start}: {_csv_problem(exc, lines)}") from None
            except UnicodeDecodeError:
                raise CsvFormatError(_not_utf8(path)) from None
            if fields:
                return start, fields

    def rows(header: list[str]) -> CsvRows:
        with handle:
            while (found := next_fields()) is not None:
                start, fields = found
                if len(fields) != len(header):
                    raise CsvFormatError(
                        f"{path}: line {start}: expected {len(header)} fields, got {len(fields)}"
                    )
                yield start, dict(zip(header, fields, strict=True))

    try:
        first = next_fields()
    except BaseException:
        handle.close()
        raise
    if first is None:
        handle.close()
        return [], iter(())
    return first[1], rows(first[1])


def _csv_problem(error: csv.Error, lines: _Lines) -> str:
    if lines.ended:
        return "a quote in this row is never closed"
    if "field larger than field limit" in str(error):  # a quote left open swallows what follows
        return f"a field runs past {csv.field_size_limit():,} characters: is a quote never closed?"
    return str(error)


def _not_utf8(path: Path) -> str:
    """Where the first byte that is not UTF-8 is in ``path`` (read again, a block at a time)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with path.open("rb") as raw:
        while block := raw.read(1 << 16):
            pending = len(decoder.getstate()[0])  # the end of the last block, still undecoded
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                at = offset - pending + exc.start  # exc.object: those bytes, then this block
                line += block.count(b"\n", 0, max(exc.start - pending, 0))
                return (
                    f"{path}: line {line}: byte {exc.object[exc.start]:#04x} (at offset {at}) is "
                    "not UTF-8; the file must be UTF-8 (iconv -f LATIN1 -t UTF-8 converts a "
                    "Latin-1 file)"
                )
            offset, line = offset + len(block), line + block.count(b"\n")
    return f"{path}: the file must be UTF-8"


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
