"""How the generic files' cells read (the catalogue's column names and stock, the events' types
and timestamps): one reading for the build (shopserve.export, shopserve.ensemble) and for the CLI's
``events import`` and ``catalogue update`` (shopserve.client). Standard library only, so the client
imports it without the export's or the server's dependencies."""

from __future__ import annotations

import re
from datetime import datetime, timezone

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
