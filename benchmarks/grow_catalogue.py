"""``python -m benchmarks grow-catalogue``: the Home Depot catalogue grown to N products, for the
scale scenario (issue 19). Rows come in this order, each labelled in a ``source`` column:

1. ``homedepot``: every Home Depot product, unchanged (the judged ones among them);
2. ``instacart``: real titles of another shop (Instacart's products), ids offset by
   INSTACART_ID_OFFSET, as many as are needed;
3. ``synthetic``: variants of the real titles above, ids from SYNTHETIC_ID_OFFSET. A variant is a
   real title drawn at random with every number in it replaced by another of as many digits, one
   longer word swapped for a word of another real title, and, for half of them, a variant word
   (a colour, a pack size) appended (always, where the rest left the title as it was). They look like catalogue titles to the encoder, the
   tokenizer and BM25, so they cost what real titles cost; they are **not** real products and
   measure cost only, never quality.

Deterministic for a given seed. The output is the generic catalogue format
(``product_id,title,source,category``), which ``python -m shopserve.export build --catalogue``
reads. The category files the real products under ``real/`` (``real/homedepot``,
``real/instacart``) and the variants under ``synthetic``, so that a search filtered to CATEGORY
``real`` leaves the variants out (the scale scenario measures quality so).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REAL_CATEGORY = "real"
INSTACART_ID_OFFSET = 10_000_000
SYNTHETIC_ID_OFFSET = 100_000_000
_NUMBER = re.compile(r"\d+")
_WORD = re.compile(r"[A-Za-z]{4,}")
VARIANT_WORDS = (
    "Black", "White", "Gray", "Blue", "Red", "Green", "Brown", "Silver", "Bronze", "Natural",
    "2-Pack", "3-Pack", "4-Pack", "6-Pack", "10-Pack", "Small", "Medium", "Large", "Pro", "Mini",
)  # fmt: skip


def real_titles(data_dir: Path) -> Iterator[tuple[int, str, str]]:
    """(id, title, source) of Home Depot's products, then Instacart's."""
    with (data_dir / "homedepot" / "products.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            yield int(row["product_uid"]), row["product_title"], "homedepot"
    with (data_dir / "instacart" / "products.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            yield INSTACART_ID_OFFSET + int(row["product_id"]), row["product_name"], "instacart"


def variant(title: str, donor: str, rng: np.random.Generator) -> str:
    """``title`` with its numbers redrawn, one longer word taken from ``donor``, maybe a suffix."""

    def other_number(match: re.Match) -> str:
        digits = len(match.group())
        low = 10 ** (digits - 1) if digits > 1 else 1
        return str(int(rng.integers(low, 10**digits)))

    changed = _NUMBER.sub(other_number, title)
    words, donor_words = list(_WORD.finditer(changed)), _WORD.findall(donor)
    if words and donor_words:
        swapped = words[int(rng.integers(len(words)))]
        replacement = donor_words[int(rng.integers(len(donor_words)))]
        changed = changed[: swapped.start()] + replacement + changed[swapped.end() :]
    if changed == title or rng.random() < 0.5:  # never a copy of the real title
        changed = f"{changed} {VARIANT_WORDS[int(rng.integers(len(VARIANT_WORDS)))]}"
    return changed


def grow(data_dir: Path, products: int, seed: int = 19) -> Iterator[tuple[int, str, str]]:
    """``products`` rows: the real ones first, then synthetic variants of them."""
    real: list[str] = []
    for count, row in enumerate(real_titles(data_dir)):
        if count == products:
            return
        real.append(row[1])
        yield row
    rng = np.random.default_rng(seed)
    for i in range(products - len(real)):
        base, donor = rng.integers(len(real), size=2)
        yield SYNTHETIC_ID_OFFSET + i, variant(real[base], real[donor], rng), "synthetic"


def write(data_dir: Path, products: int, output: Path, seed: int = 19) -> dict[str, int]:
    """Write the grown catalogue; returns how many rows each source gave."""
    output.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with output.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product_id", "title", "source", "category"])
        for product_id, title, source in grow(data_dir, products, seed):
            category = source if source == "synthetic" else f"{REAL_CATEGORY}/{source}"
            writer.writerow([product_id, title, source, category])
            counts[source] = counts.get(source, 0) + 1
    return counts
