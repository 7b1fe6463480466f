"""A smaller shop cut from the Home Depot data, in the generic formats: the judged products of the
first N queries plus other products drawn at random up to a catalogue size. The demo and the tests
build from such cuts; every query of the cut keeps all its judgments."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from .data import DataError
from .instacart import ITEMS_FILE, read_csv

log = logging.getLogger("shopserve.export.cut")

JUDGED_FILE = "judged.csv"


def cut_homedepot(
    data_dir: Path, destination: Path, queries: int, products: int, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``items.csv`` (product_id, title) and ``judged.csv`` (query, product_id,
    relevance) into ``destination``: the first ``queries`` queries of ``judgments.csv`` with all
    their judgments, and a catalogue of their judged products plus random others up to
    ``products``."""
    if queries < 1 or products < 1:
        raise DataError(f"a cut needs at least one query and one product ({queries}, {products})")
    judgments = read_csv(data_dir / "judgments.csv")
    chosen = set(list(dict.fromkeys(r["search_term"] for r in judgments))[:queries])
    judged = [r for r in judgments if r["search_term"] in chosen]
    catalogue = read_csv(data_dir / "products.csv")
    keep = {r["product_uid"] for r in judged}
    for index in np.random.default_rng(seed).permutation(len(catalogue)):
        if len(keep) >= products:
            break
        keep.add(catalogue[index]["product_uid"])
    destination.mkdir(parents=True, exist_ok=True)
    items, judged_file = destination / ITEMS_FILE, destination / JUDGED_FILE
    with items.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product_id", "title"])
        writer.writerows(
            (p["product_uid"], p["product_title"]) for p in catalogue if p["product_uid"] in keep
        )
    with judged_file.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["query", "product_id", "relevance"])
        writer.writerows((r["search_term"], r["product_uid"], r["relevance"]) for r in judged)
    log.info(
        "wrote %s (%d products) and %s (%d queries)", items, len(keep), judged_file, len(chosen)
    )
    return items, judged_file
