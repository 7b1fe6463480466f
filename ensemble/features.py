"""The feature tensor for one query and its candidate products.

The learned ranker reads only bounded features that mean the same on any catalogue (RANKER_FEATURES):
cosine, BM25 relative to the query's best in the catalogue, and term and trigram coverage, all in
[0, 1] (cosine in [-1, 1]). The two catalogue z-scores feed only the unsupervised
z-score fusion (FUSION_WEIGHTS), the fallback for a store whose transferred ranker does worse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .lexical import LexicalIndex, QueryTerms, SparseScores

if TYPE_CHECKING:
    from .catalogue import LiveTitleTerms

FEATURE_NAMES = (
    "cosine",  # encoder cosine of query and title
    "bm25_ratio",  # BM25 over the best BM25 in the catalogue for this query
    "query_coverage",  # share of the query's distinct terms found in the title
    "title_coverage",  # share of the title's distinct terms found in the query
    "query_trigram_coverage",  # share of the query's character trigrams found in the title
    "title_trigram_coverage",  # share of the title's character trigrams found in the query
    "cosine_z",  # cosine standardised over the whole catalogue for this query (fusion only)
    "bm25_z",  # BM25 standardised over the whole catalogue for this query (fusion only)
)
NUM_FEATURES = len(FEATURE_NAMES)
# Every feature the learned ranker reads is a relevance signal: its score is non-decreasing in each.
RANKER_FEATURES = FEATURE_NAMES[:6]
FUSION_WEIGHTS = {"cosine_z": 0.5, "bm25_z": 0.5}


@dataclass(frozen=True)
class CatalogueStats:
    """How one query's scores are distributed over the whole catalogue."""

    best_bm25: float
    bm25_mean: float
    bm25_std: float
    cosine_mean: float
    cosine_std: float

    @classmethod
    def of(cls, bm25: SparseScores, cosine_mean: float, cosine_std: float) -> CatalogueStats:
        """From the query's BM25 over the catalogue, held sparsely: the moments count the rows
        without a term as zeros, in float64, without touching them."""
        values = bm25.values.astype(np.float64)
        mean = values.sum() / bm25.size if bm25.size else 0.0
        squares = ((values - mean) ** 2).sum() + (bm25.size - len(values)) * mean**2
        return cls(
            float(bm25.values.max(initial=0.0)),
            float(mean),
            float(np.sqrt(squares / bm25.size)) if bm25.size else 0.0,
            cosine_mean,
            cosine_std,
        )


def _standardise(values: np.ndarray, mean: float, std: float) -> np.ndarray:
    return (values - mean) / std if std > 0 else np.zeros_like(values)


def ranking_features(
    lexical: LexicalIndex | LiveTitleTerms,
    terms: QueryTerms,
    rows: np.ndarray,
    cosine: np.ndarray,
    bm25: np.ndarray,
    stats: CatalogueStats,
) -> np.ndarray:
    """Features ``[len(rows), NUM_FEATURES]`` (float32) in the order of FEATURE_NAMES."""
    rows = np.asarray(rows, dtype=np.int64)
    matches = lexical.words.matches(terms.word_ids, rows)
    title_terms = lexical.words.sizes(rows).astype(np.float32)
    gram_matches = lexical.trigrams.matches(terms.trigram_ids, rows)
    title_grams = lexical.trigrams.sizes(rows).astype(np.float32)
    features = np.empty((len(rows), NUM_FEATURES), dtype=np.float32)
    features[:, 0] = cosine
    features[:, 1] = bm25 / stats.best_bm25 if stats.best_bm25 > 0 else 0.0
    features[:, 2] = matches / max(len(terms.words), 1)
    features[:, 3] = matches / np.maximum(title_terms, 1.0)
    features[:, 4] = gram_matches / max(terms.trigram_count, 1)
    features[:, 5] = gram_matches / np.maximum(title_grams, 1.0)
    features[:, 6] = _standardise(cosine, stats.cosine_mean, stats.cosine_std)
    features[:, 7] = _standardise(bm25, stats.bm25_mean, stats.bm25_std)
    return features
