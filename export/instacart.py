"""The Instacart dataset read through the generic catalogue and events formats.

Nothing downstream of this adapter knows about Instacart. It writes:

* ``items.csv``: ``product_id``, ``title`` (product_name), ``category`` ("department / aisle");
* ``events.csv``: ``user_id``, ``product_id``, ``timestamp`` (ISO 8601, UTC), ``event`` ("purchase"),
  ``basket_id`` (the order id): one row per order line.

Instacart gives no dates, only each user's order sequence (``order_number``), the days since the
previous order and the hour of day. Each user's first order is placed on BASE_DATE at its hour; every
later order ``days_since_prior_order`` days after the one before. Lines of one order are one second
apart in ``add_to_cart_order``, so the basket keeps its order; an order never precedes the one
before it.
"""

from __future__ import annotations

import csv
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from .data import read_rows

log = logging.getLogger("shopserve.export.instacart")

BASE_DATE = datetime(2017, 1, 1, tzinfo=timezone.utc)
ITEMS_FILE = "items.csv"
EVENTS_FILE = "events.csv"


def read_csv(path: Path) -> list[dict[str, str]]:
    """A CSV file's rows as dicts; DataError if it is missing or not well-formed UTF-8 CSV."""
    return [row for _, row in read_rows(path, {}, ())]


def write_generic(
    instacart: Path,
    destination: Path,
    users: int | None = None,
    extra_products: int | None = None,
) -> tuple[Path, Path]:
    """Convert the Instacart folder into the generic ``items.csv`` and ``events.csv``. A cut for a
    quick build: ``users`` keeps the first users (by id) and their orders; ``extra_products``
    keeps the products they bought plus that many others, drawn at random."""
    aisles = {r["aisle_id"]: r["aisle"] for r in read_csv(instacart / "aisles.csv")}
    departments = {
        r["department_id"]: r["department"] for r in read_csv(instacart / "departments.csv")
    }
    lines = read_csv(instacart / "order_lines.csv")
    lines.sort(
        key=lambda r: (int(r["user_id"]), int(r["order_number"]), int(r["add_to_cart_order"]))
    )
    if users is not None:
        kept = set(list(dict.fromkeys(r["user_id"] for r in lines))[:users])
        lines = [r for r in lines if r["user_id"] in kept]
    catalogue = read_csv(instacart / "products.csv")
    if extra_products is not None:
        catalogue = _cut_catalogue(catalogue, {r["product_id"] for r in lines}, extra_products)
    destination.mkdir(parents=True, exist_ok=True)
    items = destination / ITEMS_FILE
    with items.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product_id", "title", "category"])
        for row in catalogue:
            category = f"{departments[row['department_id']]} / {aisles[row['aisle_id']]}"
            writer.writerow([row["product_id"], row["product_name"], category])
    events = destination / EVENTS_FILE
    order_start: dict[str, datetime] = {}  # order id -> when it was placed
    previous: dict[str, datetime] = {}  # user id -> when their latest order was placed
    with events.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "product_id", "timestamp", "event", "basket_id"])
        for row in lines:
            order, user = row["order_id"], row["user_id"]
            if order not in order_start:
                day = previous[user].replace(hour=0) if user in previous else BASE_DATE
                days = float(row["days_since_prior_order"] or 0)
                placed = day + timedelta(days=days, hours=int(row["order_hour_of_day"]))
                if user in previous:  # same-day reorders at an earlier hour keep their sequence
                    placed = max(placed, previous[user] + timedelta(minutes=5))
                order_start[order] = previous[user] = placed
            when = order_start[order] + timedelta(seconds=int(row["add_to_cart_order"]))
            writer.writerow(
                [user, row["product_id"], when.strftime("%Y-%m-%dT%H:%M:%SZ"), "purchase", order]
            )
    log.info("wrote %s (%d products) and %s (%d events)", items, len(catalogue), events, len(lines))
    return items, events


def _cut_catalogue(
    catalogue: list[dict[str, str]], bought: set[str], extra: int
) -> list[dict[str, str]]:
    """The products bought, plus ``extra`` others drawn at random (seed 0); in file order."""
    others = [row["product_id"] for row in catalogue if row["product_id"] not in bought]
    picked = np.random.default_rng(0).choice(len(others), min(extra, len(others)), replace=False)
    keep = bought | {others[i] for i in picked.tolist()}
    return [row for row in catalogue if row["product_id"] in keep]
