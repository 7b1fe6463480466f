"""Lexical retrieval over product titles: BM25 (bm25s) with English stemming and stopwords, plus
each title's distinct word terms and character trigrams for the ranker's overlap features."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

from .store import REBUILD, StoreFormatError

STOPWORDS = "en"
STEMMER_LANGUAGE = "english"
_WORD = re.compile(r"\w+")
# A saved index's files (beside bm25s's own): each title's word and trigram ids.
WORDS_PREFIX = "title_words"
TRIGRAMS_PREFIX = "title_trigrams"


def top_rows(scores: np.ndarray, n: int) -> np.ndarray:
    """Rows of the ``n`` highest positive scores, best first, ties broken by row."""
    positive = np.flatnonzero(scores > 0)
    if positive.size > n:
        keep = np.argpartition(-scores[positive], n - 1)[:n]
        positive = positive[keep]
    return positive[np.lexsort((positive, -scores[positive]))]


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
        return cls(
            np.load(f"{prefix}.ids.npy", mmap_mode="r"),
            np.load(f"{prefix}.offsets.npy", mmap_mode="r"),
        )

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


@dataclass(frozen=True)
class QueryTerms:
    """A query analysed like the titles: stemmed word terms and character trigrams."""

    words: list[str]  # distinct, in order, unknown ones included
    word_ids: np.ndarray  # ids of the words the catalogue knows
    trigram_count: int
    trigram_ids: np.ndarray


class LexicalIndex:
    def __init__(
        self, bm25: bm25s.BM25, words: TermSets, trigrams: TermSets, trigram_vocab: list[str]
    ) -> None:
        self.bm25 = bm25
        self.stemmer = Stemmer.Stemmer(STEMMER_LANGUAGE)
        self.vocab: dict[str, int] = bm25.vocab_dict
        self.words = words
        self.trigrams = trigrams
        self.trigram_vocab = {gram: i for i, gram in enumerate(trigram_vocab)}

    @classmethod
    def build(cls, titles: Sequence[str], show_progress: bool = True) -> LexicalIndex:
        stemmer = Stemmer.Stemmer(STEMMER_LANGUAGE)
        tokenized = bm25s.tokenize(
            list(titles), stopwords=STOPWORDS, stemmer=stemmer, show_progress=show_progress
        )
        bm25 = bm25s.BM25()
        bm25.index(tokenized, show_progress=show_progress)
        # bm25s numbers tokens in the tokenizer's vocabulary; map them to the index's vocabulary.
        to_index = {i: bm25.vocab_dict[token] for token, i in tokenized.vocab.items()}
        words = TermSets.from_lists([to_index[i] for i in ids] for ids in tokenized.ids)
        trigram_vocab: dict[str, int] = {}
        trigrams = TermSets.from_lists(
            [trigram_vocab.setdefault(g, len(trigram_vocab)) for g in char_trigrams(title)]
            for title in titles
        )
        return cls(bm25, words, trigrams, list(trigram_vocab))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.bm25.save(str(directory), show_progress=False)
        self.words.save(directory / WORDS_PREFIX)
        self.trigrams.save(directory / TRIGRAMS_PREFIX)
        (directory / "analyzer.json").write_text(
            json.dumps(
                {
                    "stopwords": STOPWORDS,
                    "stemmer": STEMMER_LANGUAGE,
                    "trigram_vocab": list(self.trigram_vocab),
                }
            )
        )

    @classmethod
    def load(cls, directory: Path) -> LexicalIndex:
        analyzer = json.loads((directory / "analyzer.json").read_text())
        return cls(
            bm25s.BM25.load(str(directory), mmap=True),
            TermSets.load(directory / WORDS_PREFIX),
            TermSets.load(directory / TRIGRAMS_PREFIX),
            analyzer["trigram_vocab"],
        )

    @property
    def size(self) -> int:
        return len(self.words.offsets) - 1

    def distinct_terms(self, texts: list[str]) -> list[list[str]]:
        """Each text's distinct stemmed terms (stopwords dropped), in order, as the index has them."""
        tokens = bm25s.tokenize(
            texts, stopwords=STOPWORDS, stemmer=self.stemmer, return_ids=False, show_progress=False
        )
        return [list(dict.fromkeys(t)) for t in tokens]

    def analyze(self, text: str) -> QueryTerms:
        (words,) = self.distinct_terms([text])
        grams = char_trigrams(text)
        return QueryTerms(
            words,
            _known_ids(words, self.vocab),
            len(grams),
            _known_ids(grams, self.trigram_vocab),
        )

    def scores(self, terms: QueryTerms) -> np.ndarray:
        """BM25 score of every title for an analysed query."""
        if not terms.words:
            return np.zeros(self.size, dtype=np.float32)
        return self.bm25.get_scores(terms.words).astype(np.float32, copy=False)


def _known_ids(terms: Sequence[str], vocab: dict[str, int]) -> np.ndarray:
    ids = sorted({vocab[t] for t in terms if t in vocab})
    return np.asarray(ids, dtype=np.int64)
