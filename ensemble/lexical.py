"""Lexical retrieval over product titles: BM25 (bm25s) with English stemming and stopwords."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

STOPWORDS = "en"
STEMMER_LANGUAGE = "english"


def top_rows(scores: np.ndarray, n: int) -> np.ndarray:
    """Rows of the ``n`` highest positive scores, best first, ties broken by row."""
    positive = np.flatnonzero(scores > 0)
    if positive.size > n:
        keep = np.argpartition(-scores[positive], n - 1)[:n]
        positive = positive[keep]
    return positive[np.lexsort((positive, -scores[positive]))]


class LexicalIndex:
    """BM25 over titles plus each title's distinct token ids (for term-overlap features)."""

    def __init__(self, bm25: bm25s.BM25, doc_tokens: np.ndarray, doc_offsets: np.ndarray) -> None:
        self.bm25 = bm25
        self.stemmer = Stemmer.Stemmer(STEMMER_LANGUAGE)
        self.vocab: dict[str, int] = bm25.vocab_dict
        self.doc_tokens = doc_tokens
        self.doc_offsets = doc_offsets

    @classmethod
    def build(cls, titles: Sequence[str], show_progress: bool = True) -> LexicalIndex:
        stemmer = Stemmer.Stemmer(STEMMER_LANGUAGE)
        tokenized = bm25s.tokenize(
            list(titles), stopwords=STOPWORDS, stemmer=stemmer, show_progress=show_progress
        )
        bm25 = bm25s.BM25()
        bm25.index(tokenized, show_progress=show_progress)
        distinct = [list(dict.fromkeys(ids)) for ids in tokenized.ids]
        lengths = np.array([len(ids) for ids in distinct], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.fromiter((i for ids in distinct for i in ids), dtype=np.int64, count=offsets[-1])
        # bm25s numbers tokens in the tokenizer's vocabulary; map them to the index's vocabulary.
        to_index = np.array(
            [bm25.vocab_dict[token] for token, _ in sorted(tokenized.vocab.items(), key=_by_id)],
            dtype=np.int64,
        )
        return cls(bm25, to_index[flat] if flat.size else flat, offsets)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.bm25.save(str(directory), show_progress=False)
        np.save(directory / "doc_tokens.npy", self.doc_tokens)
        np.save(directory / "doc_offsets.npy", self.doc_offsets)
        (directory / "analyzer.json").write_text(
            json.dumps({"stopwords": STOPWORDS, "stemmer": STEMMER_LANGUAGE})
        )

    @classmethod
    def load(cls, directory: Path) -> LexicalIndex:
        bm25 = bm25s.BM25.load(str(directory))
        return cls(
            bm25, np.load(directory / "doc_tokens.npy"), np.load(directory / "doc_offsets.npy")
        )

    @property
    def size(self) -> int:
        return len(self.doc_offsets) - 1

    def analyze(self, text: str) -> list[str]:
        """Lower-cased, stopword-free, stemmed tokens of ``text``."""
        (tokens,) = bm25s.tokenize(
            [text],
            stopwords=STOPWORDS,
            stemmer=self.stemmer,
            return_ids=False,
            show_progress=False,
        )
        return tokens

    def token_ids(self, tokens: Sequence[str]) -> np.ndarray:
        """Distinct vocabulary ids of ``tokens`` (unknown tokens have none)."""
        ids = {self.vocab[t] for t in tokens if t in self.vocab}
        return np.fromiter(sorted(ids), dtype=np.int64, count=len(ids))

    def scores(self, tokens: Sequence[str]) -> np.ndarray:
        """BM25 score of every title for the analysed query ``tokens``."""
        if not tokens:
            return np.zeros(self.size, dtype=np.float32)
        return self.bm25.get_scores(list(tokens)).astype(np.float32, copy=False)

    def title_tokens(self, row: int) -> np.ndarray:
        return self.doc_tokens[self.doc_offsets[row] : self.doc_offsets[row + 1]]


def _by_id(item: tuple[str, int]) -> int:
    return item[1]
