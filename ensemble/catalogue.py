"""Live catalogue updates: products added, changed, repriced, sold out and delisted while serving.

A request (:func:`parse_update`) carries an update id and parallel arrays: one operation
(``upsert`` or ``delete``), product id, title and optional price, stock and category per product.
It is checked whole (every bad row named, nothing applied), its titles embedded by the served
encoder, and appended to the **catalogue log** (:mod:`.catalogue_log`) in one transaction; an update
id seen before is not applied again.

Every model instance that serves the catalogue keeps a :class:`LiveCatalogue`: the build's catalogue
with the log folded over it, refreshed from the log before each execution, so an acknowledged update
is visible to the next request on every instance and, through a shared Redis, on every server. A
changed or new product is searched beside the build's indexes (its vector scanned exactly, its title
scored with the build's BM25 statistics) and merged at query time; a deleted or superseded row is
masked out of retrieval, recommendations and events.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import store
from .filters import Attributes, category_path
from .lexical import LexicalIndex, QueryTerms, SparseScores
from .store import Catalogue
from .validation import InvalidRequest, decode_text, has_word, plain_text

if TYPE_CHECKING:
    from .catalogue_log import CatalogueLog
    from .retrieve import Retriever

log = logging.getLogger("shopserve.catalogue")

OPERATIONS = ("upsert", "delete")
MAX_PRODUCTS_PER_UPDATE = 1024
MAX_TITLE_BYTES = 1024
MAX_UPDATE_ID_BYTES = 128
UNKNOWN_STOCK = -1  # IN_STOCK_STATES: -1 unknown, 0 sold out, 1 in stock
Embed = Callable[[list[str]], np.ndarray]  # titles -> L2-normalised embeddings [n, d]


@dataclass(frozen=True)
class ProductUpdate:
    """One row of an update: an upsert gives the whole product (an attribute left out is unknown)."""

    operation: str
    product_id: int
    title: str = ""
    price: float = math.nan
    in_stock: int = UNKNOWN_STOCK
    category: str = ""

    def fields(self) -> tuple:
        """operation, product id, title, price (None: unknown), stock, category."""
        price = None if math.isnan(self.price) else self.price
        return (self.operation, self.product_id, self.title, price, self.in_stock, self.category)


@dataclass(frozen=True)
class CatalogueUpdate:
    update_id: str
    products: tuple[ProductUpdate, ...]

    def digest(self) -> str:
        """What a retry must repeat: the same update id with other rows is refused."""
        rows = [list(p.fields()) for p in self.products]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:32]

    def upserts(self) -> list[ProductUpdate]:
        return [p for p in self.products if p.operation == "upsert"]


@dataclass(frozen=True)
class CatalogueRecord:
    """One entry of the catalogue log: a product's new state (or its deletion)."""

    position: str
    logged_at: float
    update_id: str
    product: ProductUpdate
    encoder: str  # the digest of the encoder whose vector this is ("" for a delete)
    vector: np.ndarray | None


def _flat(raw: object) -> np.ndarray | None:
    if raw is None:
        return None
    if not isinstance(raw, np.ndarray):
        raw = np.asarray(raw)
    return raw.reshape(-1)


def _bad(rows: Iterable[int]) -> str:
    rows = sorted(set(rows))
    shown = ", ".join(str(r) for r in rows[:10])
    return f"{shown}{', ...' if len(rows) > 10 else ''}"


def parse_update(
    update_id: object,
    operations: object,
    product_ids: object,
    titles: object,
    prices: object | None = None,
    in_stock: object | None = None,
    categories: object | None = None,
) -> CatalogueUpdate:
    """Check a whole update; raise InvalidRequest naming every bad row (0-based) when any is."""
    uid = decode_text(update_id, "UPDATE_ID", MAX_UPDATE_ID_BYTES)
    arrays = {
        "OPERATIONS": _flat(operations),
        "PRODUCT_IDS": _flat(product_ids),
        "TITLES": _flat(titles),
        "PRICES": _flat(prices),
        "IN_STOCK": _flat(in_stock),
        "CATEGORIES": _flat(categories),
    }
    for name in ("OPERATIONS", "PRODUCT_IDS", "TITLES"):
        if arrays[name] is None:
            raise InvalidRequest(f"{name} is missing")
    lengths = {name: len(v) for name, v in arrays.items() if v is not None}
    if len(set(lengths.values())) != 1:
        raise InvalidRequest(f"the update's arrays differ in length: {lengths}")
    count = lengths["PRODUCT_IDS"]
    if not 1 <= count <= MAX_PRODUCTS_PER_UPDATE:
        raise InvalidRequest(
            f"an update holds 1 to {MAX_PRODUCTS_PER_UPDATE} products, got {count}"
        )
    ids = arrays["PRODUCT_IDS"]
    if not np.issubdtype(ids.dtype, np.integer):
        raise InvalidRequest(f"PRODUCT_IDS must be integers, got {ids.dtype}")
    prices_in = arrays["PRICES"]
    if prices_in is not None and not np.issubdtype(prices_in.dtype, np.floating):
        raise InvalidRequest(f"PRICES must be floats (NaN: unknown), got {prices_in.dtype}")
    stock_in = arrays["IN_STOCK"]
    if stock_in is not None and not np.issubdtype(stock_in.dtype, np.integer):
        raise InvalidRequest(
            f"IN_STOCK must be integers (1, 0, or -1: unknown), got {stock_in.dtype}"
        )
    problems: dict[str, list[int]] = {}
    products = []
    repeated = {pid for pid, n in Counter(ids.tolist()).items() if n > 1}
    for row in range(count):
        product, row_problems = _product(row, arrays, repeated)
        for problem in row_problems:
            problems.setdefault(problem, []).append(row)
        products.append(product)
    if problems:
        raise InvalidRequest(
            "nothing applied; bad rows: "
            + "; ".join(f"{problem}: rows {_bad(rows)}" for problem, rows in problems.items())
        )
    return CatalogueUpdate(uid, tuple(products))


def _text(raw: object) -> str | None:
    """A BYTES element as text; None when it is not valid UTF-8."""
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except (TypeError, UnicodeDecodeError):
        return None


def _product(
    row: int, arrays: dict[str, np.ndarray | None], repeated: set[int]
) -> tuple[ProductUpdate, list[str]]:
    problems = []
    operation = _text(arrays["OPERATIONS"][row])
    operation = (operation or "").strip().lower()
    if operation not in OPERATIONS:
        problems.append(f"unknown operation (not {' or '.join(OPERATIONS)})")
    pid = int(arrays["PRODUCT_IDS"][row])
    if pid < 0:
        problems.append("negative product id")
    if pid in repeated:
        problems.append("product id repeated in the update")
    raw_title = arrays["TITLES"][row]
    title = plain_text(_text(raw_title) or "").strip()
    if _text(raw_title) is None:
        problems.append("title is not UTF-8")
    elif len(title.encode("utf-8")) > MAX_TITLE_BYTES:
        problems.append(f"title over {MAX_TITLE_BYTES} bytes")
    elif operation == "upsert" and not title:
        problems.append("upsert without a title")
    elif operation == "upsert" and not has_word(title):
        problems.append("title without a letter or digit")
    price = math.nan if arrays["PRICES"] is None else float(arrays["PRICES"][row])
    if not math.isnan(price) and (not math.isfinite(price) or price < 0):
        problems.append("price not a number ≥ 0 (NaN: unknown)")
    stock = UNKNOWN_STOCK if arrays["IN_STOCK"] is None else int(arrays["IN_STOCK"][row])
    if stock not in (UNKNOWN_STOCK, 0, 1):
        problems.append("in_stock not 1, 0 or -1")
    category = (
        "" if arrays["CATEGORIES"] is None else plain_text(_text(arrays["CATEGORIES"][row]) or "")
    )
    if len(category.encode("utf-8")) > MAX_TITLE_BYTES:
        problems.append(f"category over {MAX_TITLE_BYTES} bytes")
    if operation == "delete":
        title, price, stock, category = "", math.nan, UNKNOWN_STOCK, ""
    return ProductUpdate(operation, pid, title, price, stock, category.strip()), problems


class _DeltaLexicon:
    """BM25 and term sets for titles written since the build, scored with the build's statistics
    (document frequencies, catalogue size, mean title length), so their scores and features
    compare with the build's own rows. Words and trigrams the build never saw get ids past its
    vocabularies."""

    def __init__(self, lexical: LexicalIndex) -> None:
        self.lexical = lexical
        self.document_frequency = lexical.bm25.document_frequency()
        self.documents = max(lexical.bm25.documents, 1)
        self.mean_length = max(float(lexical.words.sizes(np.arange(lexical.size)).mean()), 1.0)
        self.k1, self.b = lexical.bm25.k1, lexical.bm25.b
        self.new_words: dict[str, int] = {}
        self.new_trigrams: dict[str, int] = {}
        # row -> its words, word ids and trigram ids
        self.rows: dict[int, tuple[frozenset[str], frozenset[int], frozenset[int]]] = {}
        self.postings: dict[str, dict[int, float]] = {}  # word -> {row: its term weight}
        # a word's posting as arrays (rows, weights), made when a query asks, dropped on a change
        self._posting_arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _word_id(self, word: str) -> int:
        known = self.lexical.vocabulary.get(word)
        if known is not None:
            return known
        return self.new_words.setdefault(word, len(self.lexical.vocabulary) + len(self.new_words))

    def _trigram_id(self, gram: str) -> int:
        known = self.lexical.trigram_vocabulary.get(gram)
        if known is not None:
            return known
        vocab = self.new_trigrams
        return vocab.setdefault(gram, len(self.lexical.trigram_vocabulary) + len(vocab))

    def put(self, row: int, title: str, words: list[str]) -> None:
        """Index ``row``'s new title, whose distinct terms are ``words`` (LexicalIndex.words)."""
        previous = self.rows.get(row)
        for word in previous[0] if previous else ():
            self.postings[word].pop(row, None)
            self._posting_arrays.pop(word, None)
        word_ids = frozenset(self._word_id(w) for w in words)
        grams = frozenset(self._trigram_id(g) for g in self.lexical.analyzer.trigrams(title))
        self.rows[row] = (frozenset(words), word_ids, grams)
        # BM25's Lucene term weight (as the build's) for a term the title holds once (titles rarely repeat one)
        norm = self.k1 * (1 - self.b + self.b * len(word_ids) / self.mean_length)
        for word in words:
            self.postings.setdefault(word, {})[row] = 1.0 / (1.0 + norm)
            self._posting_arrays.pop(word, None)

    def query_terms(self, terms: QueryTerms, text: str) -> QueryTerms:
        """``terms`` with the ids of words and trigrams only titles since the build have."""
        if not self.new_words and not self.new_trigrams:
            return terms
        extra_words = [self.new_words[w] for w in terms.words if w in self.new_words]
        grams = self.lexical.analyzer.trigrams(text)
        extra_grams = [self.new_trigrams[g] for g in grams if g in self.new_trigrams]
        return replace(
            terms,
            word_ids=np.union1d(terms.word_ids, np.array(extra_words, dtype=np.int64)),
            trigram_ids=np.union1d(terms.trigram_ids, np.array(extra_grams, dtype=np.int64)),
        )

    def _posting(self, word: str) -> tuple[np.ndarray, np.ndarray] | None:
        arrays = self._posting_arrays.get(word)
        if arrays is None:
            posting = self.postings.get(word)
            if not posting:
                return None
            arrays = (
                np.fromiter(posting, dtype=np.int64, count=len(posting)),
                np.fromiter(posting.values(), dtype=np.float64, count=len(posting)),
            )
            self._posting_arrays[word] = arrays
        return arrays

    def bm25(self, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The rows written since the build that hold any of the query's words (ascending), and
        their BM25: each row's terms summed in the query's order."""
        rows, weighted = [], []
        for word in words:
            posting = self._posting(word)
            if posting is None:
                continue
            known = self.lexical.vocabulary.get(word)
            df = int(self.document_frequency[known]) if known is not None else 0
            idf = math.log(1 + (self.documents - df + 0.5) / (df + 0.5))
            rows.append(posting[0])
            weighted.append(idf * posting[1])
        if not rows:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        unique, inverse = np.unique(np.concatenate(rows), return_inverse=True)
        scores = np.zeros(len(unique))
        np.add.at(scores, inverse, np.concatenate(weighted))  # in order: word by word
        return unique, scores.astype(np.float32)

    def sizes(self, rows: np.ndarray, trigrams: bool) -> np.ndarray:
        return np.array([len(self.rows[r][2 if trigrams else 1]) for r in rows.tolist()], np.int64)

    def matches(self, query_ids: np.ndarray, rows: np.ndarray, trigrams: bool) -> np.ndarray:
        wanted = set(query_ids.tolist())
        return np.array(
            [len(self.rows[r][2 if trigrams else 1] & wanted) for r in rows.tolist()],
            dtype=np.float32,
        )


class LiveTerms:
    """A row's distinct terms (words or trigrams) for the ranker's overlap features: the build's
    for rows it wrote, the delta's for rows written since (the interface of lexical.TermSets)."""

    def __init__(self, base, live: LiveCatalogue, trigrams: bool) -> None:
        self.base = base
        self.live = live
        self.trigrams = trigrams

    def _split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        return rows, self.live.in_delta(rows)

    def sizes(self, rows: np.ndarray) -> np.ndarray:
        rows, delta = self._split(rows)
        out = np.zeros(len(rows), dtype=np.int64)
        out[~delta] = self.base.sizes(rows[~delta])
        out[delta] = self.live.lexicon.sizes(rows[delta], self.trigrams)
        return out

    def matches(self, query_ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        rows, delta = self._split(rows)
        out = np.zeros(len(rows), dtype=np.float32)
        out[~delta] = self.base.matches(query_ids, rows[~delta])
        out[delta] = self.live.lexicon.matches(query_ids, rows[delta], self.trigrams)
        return out


@dataclass(frozen=True)
class LiveTitleTerms:
    """The live catalogue's title terms, as the ranker's features read them from a LexicalIndex."""

    words: LiveTerms
    trigrams: LiveTerms


class LiveTitles(Sequence[str]):
    """Titles by row: the build's (shared, mapped), with the titles set since over them."""

    def __init__(self, built: Sequence[str]) -> None:
        self.built = built
        self.changed: dict[int, str] = {}
        self.rows = len(built)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row: int) -> str:
        if row in self.changed:
            return self.changed[row]
        if not 0 <= row < self.rows:
            raise IndexError(f"title row {row} out of range ({self.rows} rows)")
        return self.built[row]

    def __setitem__(self, row: int, title: str) -> None:
        if not 0 <= row < self.rows:
            raise IndexError(f"title row {row} out of range ({self.rows} rows)")
        self.changed[row] = title

    def append(self, title: str) -> None:
        self.changed[self.rows] = title
        self.rows += 1


class LiveCatalogue:
    """The build's catalogue with the catalogue log folded over it.

    Rows ``0..base_rows-1`` are the build's, in its order; a product added since gets the next row.
    A changed product keeps its row, which then lives in the *delta*: its vector and title terms are
    the new ones, and the build's index no longer answers for it. ``alive`` masks deleted rows.
    """

    def __init__(
        self,
        catalogue: Catalogue,
        attributes: Attributes,
        encoder: str = "",
        stored_vectors: Callable[[np.ndarray], np.ndarray] | None = None,
        lexical: LexicalIndex | None = None,
        embed: Embed | None = None,
        log: CatalogueLog | None = None,
    ) -> None:
        self.log = log
        self.log_through = catalogue.log_through
        self.base_rows = len(catalogue)
        self.product_ids = catalogue.product_ids  # never written: a new product makes a new array
        self.titles = LiveTitles(catalogue.titles)
        self.row_of = catalogue.product_rows()
        self.alive = np.ones(self.base_rows, dtype=bool)
        self.attributes = attributes
        self.encoder = encoder
        self.embed = embed
        self.stored_vectors = stored_vectors
        self.lexicon = None if lexical is None else _DeltaLexicon(lexical)
        self.terms = (
            None
            if lexical is None
            else LiveTitleTerms(
                LiveTerms(lexical.words, self, False), LiveTerms(lexical.trigrams, self, True)
            )
        )
        self.delta_position: dict[int, int] = {}  # row -> its place in delta_vectors
        self.delta_array = np.empty(0, dtype=np.int64)  # the delta's rows, in that order
        self.superseded = np.zeros(self.base_rows, dtype=bool)  # the build's rows now in the delta
        self.delta_vectors = np.empty((0, 0), dtype=np.float32)  # a view of _vector_buffer
        self._vector_buffer = np.empty((0, 0), dtype=np.float32)
        self.position = ""  # the last log record folded
        self.applied = 0
        self.refresh_failures = 0  # refreshes that could not read the log

    def refresh(self) -> int:
        """Fold the log records appended since the last refresh; return how many."""
        if self.log is None:
            return 0
        records = list(self.log.records(self.position))
        return self.apply(records) if records else 0

    def listed_in_build(self, product_ids: np.ndarray) -> np.ndarray:
        """Whether each of ``product_ids`` is one of the build's products and still listed (a
        binary search each: events validate their products with it on every request)."""
        rows = self.row_of.rows(product_ids)
        listed = (rows >= 0) & (rows < self.base_rows)
        listed[listed] = self.alive[rows[listed]]
        return listed

    @property
    def rows(self) -> int:
        return len(self.product_ids)

    @property
    def changed(self) -> bool:
        return self.rows > self.base_rows or bool(self.delta_array.size) or not self.alive.all()

    @property
    def delta_rows(self) -> list[int]:
        return self.delta_array.tolist()

    def in_delta(self, rows: np.ndarray) -> np.ndarray:
        """Which ``rows`` the delta answers for: every product added since the build, and the
        build's products retitled since."""
        rows = np.asarray(rows, dtype=np.int64)
        added = rows >= self.base_rows
        return added | self.superseded[np.where(added, 0, rows)] & ~added

    def base_allowed(self, allowed: np.ndarray | None) -> np.ndarray | None:
        """The build's rows a request may be answered with: alive, not superseded, and allowed."""
        if not self.changed:
            return None if allowed is None else allowed[: self.base_rows]
        mask = self.alive[: self.base_rows] & ~self.superseded
        return mask if allowed is None else mask & allowed[: self.base_rows]

    def known(self, product_id: int) -> bool:
        row = self.row_of.get(product_id)
        return row is not None and bool(self.alive[row])

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        delta = self.in_delta(rows)
        if not delta.any():
            return self.stored_vectors(rows)
        out = np.empty((len(rows), self.delta_vectors.shape[1]), dtype=np.float32)
        out[~delta] = self.stored_vectors(rows[~delta])
        out[delta] = self.delta_vectors[[self.delta_position[r] for r in rows[delta].tolist()]]
        return out

    def apply(self, records: Sequence[CatalogueRecord]) -> int:
        """Fold log records in order (those the build folded already are skipped); return how
        many were read."""
        unfolded = [r for r in records if r.logged_at > self.log_through]
        upserts = [r for r in unfolded if r.product.operation == "upsert"]
        vectors = self._vectors(upserts) if self.lexicon is not None else [None] * len(upserts)
        retitled = [i for i, vector in enumerate(vectors) if vector is not None]
        titles = [upserts[i].product.title for i in retitled]
        words = self.lexicon.lexical.distinct_terms(titles) if retitled else []
        rows = self._place(unfolded)
        for i, terms in zip(retitled, words, strict=True):
            row = self.row_of[upserts[i].product.product_id]
            self._put_vector(row, np.asarray(vectors[i], dtype=np.float32).reshape(-1))
            self.lexicon.put(row, upserts[i].product.title, terms)
        if upserts:
            self.attributes = self.attributes.with_rows(
                [self.row_of[r.product.product_id] for r in upserts],
                rows,
                [r.product.price for r in upserts],
                [r.product.in_stock for r in upserts],
                [category_path(r.product.category) for r in upserts],
            )
        if records:
            self.position = records[-1].position
        self.applied += len(records)
        return len(records)

    def _vectors(self, upserts: Sequence[CatalogueRecord]) -> list[np.ndarray | None]:
        """Each upsert's vector; None where the product keeps its title (and so its vector). A new
        title logged without a vector, or by another build's encoder, is embedded here."""
        current: dict[int, str | None] = {}
        vectors: list[np.ndarray | None] = []
        to_embed = []
        for i, record in enumerate(upserts):
            product = record.product
            row = self.row_of.get(product.product_id)
            before = current.get(product.product_id, None if row is None else self.titles[row])
            current[product.product_id] = product.title
            if before == product.title:  # repriced, restocked, recategorised: the same vector
                vectors.append(None)
            elif record.vector is not None and record.encoder == self.encoder:
                vectors.append(record.vector)
            else:
                vectors.append(None)
                to_embed.append(i)
        if to_embed:
            if self.embed is None:
                raise RuntimeError("catalogue titles to embed, and no encoder here")
            embedded = self.embed([upserts[i].product.title for i in to_embed])
            for i, vector in zip(to_embed, embedded, strict=True):
                vectors[i] = vector
        return vectors

    def _place(self, records: Sequence[CatalogueRecord]) -> int:
        """Give new products their rows, set titles and which rows are listed, in log order;
        return the number of rows."""
        new = {
            r.product.product_id: None
            for r in records
            if r.product.operation == "upsert" and r.product.product_id not in self.row_of
        }
        if new:
            self.product_ids = np.concatenate([self.product_ids, np.fromiter(new, np.int64)])
            self.alive = np.concatenate([self.alive, np.ones(len(new), dtype=bool)])
            for pid in new:
                self.row_of.add(pid, len(self.titles))
                self.titles.append("")
        for record in records:
            row = self.row_of.get(record.product.product_id)
            if row is None:  # a delete of a product never listed
                continue
            upsert = record.product.operation == "upsert"
            self.alive[row] = upsert
            if upsert:
                self.titles[row] = record.product.title
        return len(self.titles)

    def _put_vector(self, row: int, vector: np.ndarray) -> None:
        if row in self.delta_position:
            self.delta_vectors[self.delta_position[row]] = vector
            return
        used = len(self.delta_array)
        if used == len(self._vector_buffer):  # grow by doubling: appends cost O(1) on average
            grown = np.empty((max(2 * used, 64), vector.size), dtype=np.float32)
            if used:
                grown[:used] = self._vector_buffer
            self._vector_buffer = grown
        self._vector_buffer[used] = vector
        self.delta_vectors = self._vector_buffer[: used + 1]
        self.delta_position[row] = used
        self.delta_array = np.append(self.delta_array, np.int64(row))
        if row < self.base_rows:
            self.superseded[row] = True

    def search_delta(
        self, query: np.ndarray, n: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The top-``n`` delta rows by inner product with ``query`` (exact), among ``allowed``,
        and their inner products."""
        rows = self.delta_array
        if not rows.size:
            return rows, np.empty(0, dtype=np.float32)
        keep = self.alive[rows] if allowed is None else self.alive[rows] & allowed[rows]
        scores = self.delta_vectors @ query  # all, then the kept: no copy of the vectors
        rows, scores = rows[keep], scores[keep]
        if len(rows) > n:
            top = np.argpartition(-scores, n - 1)[:n]
            rows, scores = rows[top], scores[top]
        best = np.argsort(-scores, kind="stable")
        return rows[best], scores[best]

    def delta_bm25(self, words: Sequence[str], scores: SparseScores) -> SparseScores:
        """``scores`` (the build's BM25 over its rows) over every row: superseded and deleted
        rows 0, rows written since scored against the build's statistics. Sparse, as the build's:
        the work grows with the query's postings, not with the catalogue."""
        if not self.changed:
            return scores
        kept = self.alive[scores.rows] & ~self.superseded[scores.rows]
        rows, values = scores.rows[kept], scores.values[kept]
        if self.delta_array.size and self.lexicon is not None:
            delta_rows, delta_values = self.lexicon.bm25(words)
            alive = self.alive[delta_rows]
            rows = np.concatenate([rows, delta_rows[alive]])
            values = np.concatenate([values, delta_values[alive]])
        order = np.argsort(rows, kind="stable")
        return SparseScores(rows[order], values[order], self.rows)

    def state(self) -> dict:
        """For logs and the selfcheck: how far the catalogue has moved from the build."""
        return {
            "position": self.position,
            "applied": self.applied,
            "added": self.rows - self.base_rows,
            "changed": len(self.delta_array),
            "deleted": int((~self.alive).sum()),
        }


def encoder_digest(repository: Path, version: int | None = None) -> str:
    """Names the encoder whose vectors a log record holds: a digest of its served graph."""
    return store.model_digest(store.in_process_model_file(repository, store.ENCODER, version))[:32]


def follow_catalogue_log(
    repository: Path,
    version: int | None,
    catalogue: Catalogue,
    attributes: Attributes,
    retriever: Retriever | None = None,
    embed: Embed | None = None,
) -> LiveCatalogue | None:
    """A served model's live catalogue, the log folded over the build's catalogue; None outside a
    server (no catalogue log named in the environment). Without a ``retriever`` (recommend, events)
    it tracks which products are listed, their titles and attributes, not their vectors."""
    from .catalogue_log import CATALOGUE_LOG_ENV, open_catalogue_log

    location = os.environ.get(CATALOGUE_LOG_ENV)
    if not location:
        return None
    live = LiveCatalogue(
        catalogue,
        attributes,
        encoder_digest(repository, version) if retriever is not None else "",
        None if retriever is None else retriever.dense.vectors,
        None if retriever is None else retriever.lexical,
        embed,
        open_catalogue_log(location),
    )
    live.refresh()
    log.info("catalogue: the build's %d products, then the log: %s", live.base_rows, live.state())
    return live


def refresh_catalogue(live: LiveCatalogue | None) -> None:
    """Fold the catalogue updates logged since the last request. When the log cannot be read (its
    Redis is down), the answer uses the catalogue as last read, and the miss is logged and counted."""
    if live is None:
        return
    try:
        live.refresh()
    except Exception as exc:  # any store failure: serve what was read, and say so
        live.refresh_failures += 1
        log.warning(
            "the catalogue log could not be read (%s): answering with the catalogue as of "
            "record %s",
            type(exc).__name__,
            live.position or "0 (the build)",
        )
