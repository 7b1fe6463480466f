"""Lexical retrieval over product titles: BM25 with English stemming and stopwords, plus each
title's distinct word terms and character trigrams for the ranker's overlap features. Titles and
queries are case- and accent-folded first (:func:`fold`), so "cafe" finds "Café".

The build writes the index (shopserve.export.lexical, with bm25s); serving reads it as memory-mapped
arrays and analyses queries itself, exactly as the build analysed the titles. No serving process
imports bm25s or SciPy, which cost each model instance about 11 MiB of its own memory.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import Stemmer

from .store import REBUILD, StoreFormatError, Vocabulary, mapped

STEMMER_LANGUAGE = "english"
TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")  # words of two or more word characters
_WORD = re.compile(r"\w+")
# A saved index's files: the analyzer's settings and BM25's parameters, the BM25 weights, the two
# vocabularies, and each title's word and trigram ids.
ANALYZER_FILE = "analyzer.json"
BM25_PREFIX = "bm25"
VOCABULARY_PREFIX = "vocabulary"
TRIGRAM_VOCABULARY_PREFIX = "trigram_vocabulary"
WORDS_PREFIX = "title_words"
TRIGRAMS_PREFIX = "title_trigrams"
# Letters below this code point (Latin and Greek) lose their accents when folded; other scripts
# keep their combining marks, which there tell letters apart (Cyrillic й and и, Devanagari's vowels).
_ACCENTED_SCRIPTS_END = 0x0400


def fold(text: str) -> str:
    """``text`` case-folded, in compatibility form, and without the accents of Latin and Greek
    letters: "Café", "CAFE" and "ｃａｆｅ" read "cafe", "Straße" reads "strasse", whether
    the accents came precomposed or as combining marks."""
    if text.isascii():
        return text.lower()
    kept, base = [], ""
    for char in unicodedata.normalize("NFKD", text.casefold()):
        if not unicodedata.combining(char):
            base = char
        elif base and ord(base) < _ACCENTED_SCRIPTS_END:
            continue
        kept.append(char)
    return unicodedata.normalize("NFC", "".join(kept))


def top_rows(scores: np.ndarray, n: int) -> np.ndarray:
    """Rows of the ``n`` highest positive scores, best first, ties broken by row (at the n-th
    score too: of products tied there, the lowest rows are kept)."""
    positive = np.flatnonzero(scores > 0)
    if positive.size > n:  # sort only those at or above the n-th highest score (ties kept)
        values = scores[positive]
        positive = positive[values >= np.partition(values, values.size - n)[values.size - n]]
    return positive[np.lexsort((positive, -scores[positive]))][:n]


def char_trigrams(text: str) -> list[str]:
    """Distinct character trigrams of each lower-cased word padded with '#': robust to typos."""
    grams = (
        padded[i : i + 3]
        for word in _WORD.findall(text.lower())
        for padded in (f"#{word}#",)
        for i in range(len(padded) - 2)
    )
    return list(dict.fromkeys(grams))


@dataclass(frozen=True)
class TermSets:
    """One set of term ids per catalogue row, stored flat (``ids[offsets[r]:offsets[r + 1]]``)."""

    ids: np.ndarray  # int64
    offsets: np.ndarray  # int64 [rows + 1]

    @classmethod
    def from_lists(cls, rows: Iterable[Iterable[int]]) -> TermSets:
        distinct = [list(dict.fromkeys(r)) for r in rows]
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in distinct])]).astype(np.int64)
        ids = np.fromiter((i for r in distinct for i in r), dtype=np.int64, count=offsets[-1])
        return cls(ids, offsets)

    def save(self, prefix: Path) -> None:
        """``<prefix>.ids.npy`` and ``<prefix>.offsets.npy``: plain arrays, so they can be mapped."""
        np.save(f"{prefix}.ids.npy", self.ids)
        np.save(f"{prefix}.offsets.npy", self.offsets)

    @classmethod
    def load(cls, prefix: Path) -> TermSets:
        """The sets saved at ``prefix``, memory-mapped read-only (shared by every process)."""
        if not Path(f"{prefix}.ids.npy").exists() and Path(f"{prefix}.npz").exists():
            raise StoreFormatError(f"{Path(prefix).parent}: {REBUILD}")
        return cls(mapped(f"{prefix}.ids.npy"), mapped(f"{prefix}.offsets.npy"))

    def sizes(self, rows: np.ndarray) -> np.ndarray:
        return self.offsets[rows + 1] - self.offsets[rows]

    def matches(self, query_ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """How many of each row's terms are among ``query_ids`` (float32 [len(rows)])."""
        lengths = self.sizes(rows)
        total = int(lengths.sum())
        if total == 0 or query_ids.size == 0:
            return np.zeros(len(rows), dtype=np.float32)
        segment_starts = np.cumsum(lengths) - lengths
        positions = np.repeat(self.offsets[rows] - segment_starts, lengths) + np.arange(total)
        hits = np.isin(self.ids[positions], query_ids).astype(np.float32)
        sums = np.add.reduceat(hits, np.minimum(segment_starts, total - 1))
        return np.where(lengths > 0, sums, 0.0).astype(np.float32)


class Analyzer:
    """Text to BM25 terms: folded (:func:`fold`) words of two or more word characters, stopwords
    left out, Snowball-stemmed (the analysis of bm25s.tokenize, after folding), used for titles and
    queries alike; and to the character trigrams of the same folded words."""

    def __init__(
        self, stopwords: Iterable[str], language: str = STEMMER_LANGUAGE, folds: bool = True
    ) -> None:
        self.stopwords = sorted(set(stopwords))
        self.language = language
        self.folds = folds  # False: only lower-cased (indexes built before folding)
        self._stopwords = frozenset(self.stopwords)
        self._stemmer = Stemmer.Stemmer(language)

    def normalize(self, text: str) -> str:
        return fold(text) if self.folds else text.lower()

    def tokens(self, text: str) -> list[str]:
        """Every term of ``text`` in order, repeats kept."""
        normalized = self.normalize(text)
        words = [w for w in TOKEN_PATTERN.findall(normalized) if w not in self._stopwords]
        return self._stemmer.stemWords(words)

    def trigrams(self, text: str) -> list[str]:
        return char_trigrams(self.normalize(text))

    def terms(self, text: str) -> list[str]:
        """The distinct terms of ``text``, in order."""
        return list(dict.fromkeys(self.tokens(text)))


@dataclass(frozen=True)
class Bm25:
    """The build's BM25 weights (the Lucene variant; k1 and b as built): for each term, the titles
    that hold it and the term's weight in each, as a terms x titles matrix in CSC form."""

    weights: np.ndarray  # float32: by term, then title
    titles: np.ndarray  # int: the title (catalogue row) of each weight
    starts: np.ndarray  # int [terms + 1]: where each term's titles start
    documents: int
    k1: float
    b: float

    def save(self, prefix: Path) -> dict:
        """Write the arrays at ``prefix``; return the parameters the analyzer file keeps."""
        for part in ("weights", "titles", "starts"):
            np.save(f"{prefix}.{part}.npy", getattr(self, part))
        return {"documents": self.documents, "k1": self.k1, "b": self.b}

    @classmethod
    def load(cls, prefix: Path, parameters: dict) -> Bm25:
        return cls(
            *(mapped(f"{prefix}.{part}.npy") for part in ("weights", "titles", "starts")),
            int(parameters["documents"]),
            float(parameters["k1"]),
            float(parameters["b"]),
        )

    def document_frequency(self) -> np.ndarray:
        return np.diff(np.asarray(self.starts))

    def _postings(self, term_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The titles and weights of every posting of the terms, term by term."""
        if not term_ids:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        spans = [slice(self.starts[t], self.starts[t + 1]) for t in term_ids]
        titles = np.concatenate([self.titles[s] for s in spans])
        return titles, np.concatenate([self.weights[s] for s in spans])

    def scores(self, term_ids: Sequence[int]) -> np.ndarray:
        """Every title's BM25 for the terms ``term_ids`` (float32 [documents]), summed in their
        order as bm25s sums them, so a score is the same to the last bit."""
        scores = np.zeros(self.documents, dtype=np.float32)
        titles, weights = self._postings(term_ids)
        np.add.at(scores, titles, weights)
        return scores

    def sparse_scores(self, term_ids: Sequence[int]) -> SparseScores:
        """The same scores, held only for the titles that have a term: the work grows with the
        terms' postings, not with the catalogue."""
        titles, weights = self._postings(term_ids)
        rows, inverse = np.unique(titles, return_inverse=True)
        values = np.zeros(len(rows), dtype=np.float32)
        np.add.at(values, inverse, weights)  # each title's weights in the same order
        return SparseScores(rows.astype(np.int64), values, self.documents)


@dataclass(frozen=True)
class SparseScores:
    """Scores over a catalogue of ``size`` rows, zero but at ``rows`` (ascending)."""

    rows: np.ndarray  # int64, ascending
    values: np.ndarray  # float32
    size: int

    @classmethod
    def of_dense(cls, scores: np.ndarray) -> SparseScores:
        rows = np.flatnonzero(scores)
        return cls(rows, np.asarray(scores, dtype=np.float32)[rows], len(scores))

    def at(self, rows: np.ndarray) -> np.ndarray:
        """The scores of ``rows`` (float32)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(self.rows):
            return np.zeros(len(rows), dtype=np.float32)
        at = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
        return np.where(self.rows[at] == rows, self.values[at], 0.0).astype(np.float32)

    def top(self, n: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """Rows of the ``n`` highest positive scores among ``allowed`` (a boolean mask over the
        catalogue; every row when None), best first, ties broken by row (as :func:`top_rows`)."""
        values = self.values if allowed is None else self.values * allowed[self.rows]
        return self.rows[top_rows(values, n)]  # rows ascend, so position order is row order


@dataclass(frozen=True)
class QueryTerms:
    """A query analysed like the titles: stemmed word terms and character trigrams."""

    words: list[str]  # distinct, in order, unknown ones included
    word_ids: np.ndarray  # ids of the words the catalogue knows
    trigram_count: int
    trigram_ids: np.ndarray


@dataclass(frozen=True)
class LexicalIndex:
    """BM25 over the titles, and each title's word and trigram ids, with the vocabularies that
    number them. Built by shopserve.export.lexical; loaded, every array is memory-mapped."""

    analyzer: Analyzer
    bm25: Bm25
    vocabulary: Vocabulary
    words: TermSets
    trigram_vocabulary: Vocabulary
    trigrams: TermSets

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        bm25 = self.bm25.save(directory / BM25_PREFIX)
        self.vocabulary.save(directory / VOCABULARY_PREFIX)
        self.trigram_vocabulary.save(directory / TRIGRAM_VOCABULARY_PREFIX)
        self.words.save(directory / WORDS_PREFIX)
        self.trigrams.save(directory / TRIGRAMS_PREFIX)
        analyzer = {
            "stemmer": self.analyzer.language,
            "stopwords": self.analyzer.stopwords,
            "folds": self.analyzer.folds,
        }
        (directory / ANALYZER_FILE).write_text(json.dumps({**analyzer, "bm25": bm25}))

    @classmethod
    def load(cls, directory: Path) -> LexicalIndex:
        settings = json.loads((directory / ANALYZER_FILE).read_text())
        if "bm25" not in settings:  # bm25s's own files: the format before serving mapped them
            raise StoreFormatError(f"{directory}: {REBUILD}")
        return cls(
            # An index built before folding has no "folds": its titles were only lower-cased.
            Analyzer(settings["stopwords"], settings["stemmer"], settings.get("folds", False)),
            Bm25.load(directory / BM25_PREFIX, settings["bm25"]),
            Vocabulary.load(directory / VOCABULARY_PREFIX),
            TermSets.load(directory / WORDS_PREFIX),
            Vocabulary.load(directory / TRIGRAM_VOCABULARY_PREFIX),
            TermSets.load(directory / TRIGRAMS_PREFIX),
        )

    @property
    def size(self) -> int:
        return len(self.words.offsets) - 1

    def distinct_terms(self, texts: list[str]) -> list[list[str]]:
        """Each text's distinct terms (stopwords dropped), in order, as the index has them."""
        return [self.analyzer.terms(text) for text in texts]

    def analyze(self, text: str) -> QueryTerms:
        words = self.analyzer.terms(text)
        grams = self.analyzer.trigrams(text)
        return QueryTerms(
            words,
            _id_set(self.vocabulary.known_ids(words)),
            len(grams),
            _id_set(self.trigram_vocabulary.known_ids(grams)),
        )

    def scores(self, terms: QueryTerms) -> np.ndarray:
        """BM25 score of every title for an analysed query."""
        return self.bm25.scores(self.vocabulary.known_ids(terms.words))

    def sparse_scores(self, terms: QueryTerms) -> SparseScores:
        """The same, held only for the titles that have a query term."""
        return self.bm25.sparse_scores(self.vocabulary.known_ids(terms.words))


def _id_set(ids: list[int]) -> np.ndarray:
    return np.asarray(sorted(set(ids)), dtype=np.int64)
