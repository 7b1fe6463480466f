"""Product filters: in stock, a price range, a category.

The build keeps the catalogue's filterable columns (``price``, ``in_stock``, ``category``) as arrays
by catalogue row (:class:`Attributes`, ``retrieve/N/attributes.npz``). A request's optional inputs
(``IN_STOCK``, ``PRICE_MIN``, ``PRICE_MAX``, ``CATEGORY``) become a :class:`ProductFilter`, and the
filter a boolean mask over the catalogue that retrieval searches inside (so a filtered query still
returns k results when k products pass). A product whose price or stock the catalogue leaves empty
never passes a filter on that attribute.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shopserve.formats import IN_STOCK_VALUES, in_stock

from . import store
from .validation import InvalidRequest, check_flag, decode_number, decode_text

FILTER_INPUTS = ("IN_STOCK", "PRICE_MIN", "PRICE_MAX", "CATEGORY")
MAX_CATEGORY_BYTES = 512
MAX_PRICE = float(np.finfo(np.float32).max)  # prices are served as float32
_CATEGORY_SEPARATOR = re.compile(r"\s*[/>|]\s*")


def category_path(category: object) -> tuple[str, ...]:
    """A category's levels, lower-cased: 'Frozen / Frozen Pizza' -> ('frozen', 'frozen pizza')."""
    text = str(category or "").strip()
    return tuple(p.strip().lower() for p in _CATEGORY_SEPARATOR.split(text)) if text else ()


@dataclass(frozen=True)
class ProductFilter:
    """What a request allows; the default allows everything."""

    in_stock: bool = False
    price_min: float | None = None
    price_max: float | None = None
    category: tuple[str, ...] = ()  # a category path: its products and those of its subcategories

    @property
    def empty(self) -> bool:
        return self == ProductFilter()


def _price(raw: object, name: str) -> float | None:
    if raw is None:
        return None
    price = decode_number(raw, name, integer=False)
    if not math.isfinite(price) or price < 0:
        raise InvalidRequest(f"{name} must be a finite number ≥ 0, got {price}")
    return float(price)


def parse_filter(inputs: Mapping[str, object] | None) -> ProductFilter:
    """A request's filter inputs (absent ones None), checked: prices finite, ≥ 0 and in order, a
    category a non-empty path."""
    if not inputs:
        return ProductFilter()
    price_min = _price(inputs.get("PRICE_MIN"), "PRICE_MIN")
    price_max = _price(inputs.get("PRICE_MAX"), "PRICE_MAX")
    if price_min is not None and price_max is not None and price_min > price_max:
        raise InvalidRequest(f"PRICE_MIN ({price_min}) is above PRICE_MAX ({price_max})")
    raw_category = inputs.get("CATEGORY")
    category = ()
    if raw_category is not None:
        # A request's empty levels are left out ('snacks >' asks for 'snacks'). A catalogue's
        # paths keep theirs: stores code their categories by the paths as they were read.
        text = decode_text(raw_category, "CATEGORY", MAX_CATEGORY_BYTES)
        category = tuple(level for level in category_path(text) if level)
        if not category:
            raise InvalidRequest("CATEGORY names no category, only separators")
    return ProductFilter(
        check_flag(inputs.get("IN_STOCK"), "IN_STOCK"), price_min, price_max, category
    )


class CatalogueAttributeError(ValueError):
    """A catalogue column cannot be read as a filterable attribute; the message names the rows."""


def _bad_rows(rows: list[int]) -> str:
    shown = ", ".join(str(r + 2) for r in rows[:5])  # file lines: a header, then 1-based rows
    return f"{shown}{', ...' if len(rows) > 5 else ''} ({len(rows)} in all)"


def _price_column(cells: Sequence[object]) -> np.ndarray:
    price = np.full(len(cells), np.nan, dtype=np.float32)
    bad = []
    for row, cell in enumerate(cells):
        text = str(cell or "").strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if 0 <= value <= MAX_PRICE:  # NaN fails too
            price[row] = value
        else:
            bad.append(row)
    if bad:
        raise CatalogueAttributeError(
            f"price must be a number from 0 to {MAX_PRICE:.3g} (float32's largest) or empty; "
            f"lines {_bad_rows(bad)}"
        )
    return price


def _stock_column(cells: Sequence[object]) -> np.ndarray:
    """In stock or not per row; an empty cell (unknown) is not in stock to a filter."""
    values, bad = [], []
    for row, cell in enumerate(cells):
        try:
            values.append(in_stock(cell) or False)
        except ValueError:
            bad.append(row)
    if bad:
        raise CatalogueAttributeError(
            f"in_stock must be one of {IN_STOCK_VALUES} or empty; lines {_bad_rows(bad)}"
        )
    return np.array(values, dtype=bool)


def _category_column(cells: Sequence[object]) -> tuple[np.ndarray, tuple[tuple[str, ...], ...]]:
    """A code per row (-1: no category) and the distinct paths the codes index."""
    paths: dict[tuple[str, ...], int] = {}
    codes = [paths.setdefault(p, len(paths)) if p else -1 for p in map(category_path, cells)]
    return np.array(codes, dtype=np.int32), tuple(paths)


@dataclass(frozen=True, eq=False)
class Attributes:
    """The filterable attributes of every catalogue row (None: the catalogue has no such column)."""

    price: np.ndarray | None = None  # float32, NaN where unknown
    in_stock: np.ndarray | None = None  # bool; an empty cell is False
    category_codes: np.ndarray | None = None  # int32 into categories, -1 where none
    categories: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def from_columns(cls, columns: Mapping[str, Sequence[object]]) -> Attributes:
        """The ``price``, ``in_stock`` and ``category`` columns of a catalogue file, checked."""
        codes, categories = (
            _category_column(columns["category"]) if "category" in columns else (None, ())
        )
        return cls(
            _price_column(columns["price"]) if "price" in columns else None,
            _stock_column(columns["in_stock"]) if "in_stock" in columns else None,
            codes,
            categories,
        )

    def with_rows(
        self,
        rows: Sequence[int],
        count: int,
        prices: Sequence[float],
        stock: Sequence[int],
        categories: Sequence[tuple[str, ...]],
    ) -> Attributes:
        """These attributes over ``count`` rows, ``rows`` set to catalogue updates' values in
        order (a price NaN and a stock -1 are unknown). A column the build lacked starts with the
        first update that gives it."""

        def grown(values: np.ndarray | None, fill: object, dtype: type) -> np.ndarray:
            out = np.full(count, fill, dtype=dtype)
            if values is not None:
                out[: len(values)] = values
            return out

        price = self.price
        if price is not None or not all(math.isnan(p) for p in prices):
            price = grown(self.price, np.nan, np.float32)
            price[list(rows)] = prices
        in_stock = self.in_stock
        if in_stock is not None or any(s >= 0 for s in stock):
            in_stock = grown(self.in_stock, False, bool)
            in_stock[list(rows)] = [s == 1 for s in stock]
        codes, known = self.category_codes, self.categories
        if codes is not None or any(categories):
            codes = grown(self.category_codes, -1, np.int32)
            index = {path: code for code, path in enumerate(known)}
            for row, path in zip(rows, categories, strict=True):
                if path and path not in index:
                    index[path] = len(index)
                codes[row] = index[path] if path else -1
            known = tuple(index)
        return Attributes(price, in_stock, codes, known)

    def save(self, path: Path) -> None:
        arrays = {
            "price": self.price,
            "in_stock": self.in_stock,
            "category_codes": self.category_codes,
        }
        arrays = {k: v for k, v in arrays.items() if v is not None}
        if self.categories:
            arrays["categories"] = np.array([" / ".join(p) for p in self.categories], dtype=np.str_)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> Attributes:
        """The attributes a build wrote (none for a store built before filters existed)."""
        if not path.exists():
            return cls()
        with np.load(path) as stored:
            arrays = dict(stored)
        return cls(
            arrays.get("price"),
            arrays.get("in_stock"),
            arrays.get("category_codes"),
            tuple(category_path(c) for c in arrays.get("categories", ())),
        )

    def summary(self) -> dict:
        """What the manifest records: each filterable attribute and how many rows know it."""
        out: dict = {}
        if self.price is not None:
            known = self.price[~np.isnan(self.price)]
            out["price"] = {
                "known": int(known.size),
                "min": float(f"{known.min():.7g}") if known.size else None,  # float32's digits
                "max": float(f"{known.max():.7g}") if known.size else None,
            }
        if self.in_stock is not None:
            out["in_stock"] = {
                "in_stock": int(self.in_stock.sum()),
                "rows": int(self.in_stock.size),
            }
        if self.category_codes is not None:
            out["category"] = {
                "paths": len(self.categories),
                "known": int((self.category_codes >= 0).sum()),
            }
        return out

    def allowed(self, product_filter: ProductFilter) -> np.ndarray | None:
        """The rows ``product_filter`` allows (None: it allows every row), or InvalidRequest when
        it names an attribute this store does not have, or a category no product is in."""
        if product_filter.empty:
            return None
        mask: np.ndarray | None = None

        def narrow(rows: np.ndarray) -> None:
            nonlocal mask
            mask = rows if mask is None else mask & rows

        if product_filter.in_stock:
            narrow(self._column(self.in_stock, "IN_STOCK", "in_stock"))
        if product_filter.price_min is not None or product_filter.price_max is not None:
            price = self._column(self.price, "a price range", "price")
            low = -np.inf if product_filter.price_min is None else product_filter.price_min
            high = np.inf if product_filter.price_max is None else product_filter.price_max
            with np.errstate(invalid="ignore"):
                narrow((price >= low) & (price <= high))
        if product_filter.category:
            codes = self._column(self.category_codes, "CATEGORY", "category")
            matching = self._category_codes(product_filter.category)
            if not matching.size:
                raise InvalidRequest(
                    f"no product is in the category {' / '.join(product_filter.category)!r}"
                )
            narrow(np.isin(codes, matching))
        return mask

    def _column(self, values: np.ndarray | None, name: str, column: str) -> np.ndarray:
        if values is None:
            raise InvalidRequest(
                f"{name} filters on {column}, which this store's catalogue does not have"
            )
        return values

    @functools.lru_cache(maxsize=1024)  # noqa: B019 (lives as long as the model)
    def _category_codes(self, path: tuple[str, ...]) -> np.ndarray:
        return np.array(
            [code for code, c in enumerate(self.categories) if c[: len(path)] == path],
            dtype=np.int32,
        )


def load_attributes(repository: Path, version: int | None = None) -> Attributes:
    """The filterable attributes a built store serves."""
    return Attributes.load(
        store.version_dir(repository, store.RETRIEVE, version) / store.ATTRIBUTES_FILE
    )
