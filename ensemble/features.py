"""The ranker's feature tensor for one query and its candidate products."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .lexical import LexicalIndex

FEATURE_NAMES = (
    "cosine",  # encoder cosine of query and title
    "cosine_gap",  # cosine minus the best cosine among the query's candidates
    "cosine_z",  # cosine standardised over the whole catalogue for this query
    "bm25",  # BM25 of the title
    "bm25_ratio",  # BM25 over the best BM25 in the catalogue for this query
    "bm25_z",  # BM25 standardised over the whole catalogue for this query
    "query_coverage",  # share of the query's distinct terms found in the title
    "title_coverage",  # share of the title's distinct terms found in the query
    "title_length",  # log(1 + distinct title terms): an item-level statistic
    "query_length",  # log(1 + distinct query terms)
)
NUM_FEATURES = len(FEATURE_NAMES)


@dataclass(frozen=True)
class CatalogueStats:
    """How one query's scores are distributed over the whole catalogue."""

    best_bm25: float
    bm25_mean: float
    bm25_std: float
    cosine_mean: float
    cosine_std: float

    @classmethod
    def of(cls, bm25: np.ndarray, cosine_mean: float, cosine_std: float) -> CatalogueStats:
        return cls(
            float(bm25.max(initial=0.0)),
            float(bm25.mean()),
            float(bm25.std()),
            cosine_mean,
            cosine_std,
        )


def _standardise(values: np.ndarray, mean: float, std: float) -> np.ndarray:
    return (values - mean) / std if std > 0 else np.zeros_like(values)


def term_matches(lexical: LexicalIndex, query_ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """How many of each row's distinct title terms are among ``query_ids``."""
    starts = lexical.doc_offsets[rows]
    lengths = lexical.doc_offsets[rows + 1] - starts
    total = int(lengths.sum())
    if total == 0 or query_ids.size == 0:
        return np.zeros(len(rows), dtype=np.float32)
    segment_starts = np.cumsum(lengths) - lengths
    positions = np.repeat(starts - segment_starts, lengths) + np.arange(total)
    hits = np.isin(lexical.doc_tokens[positions], query_ids).astype(np.float32)
    sums = np.add.reduceat(hits, np.minimum(segment_starts, total - 1))
    return np.where(lengths > 0, sums, 0.0).astype(np.float32)


def ranking_features(
    lexical: LexicalIndex,
    query_terms: list[str],
    rows: np.ndarray,
    cosine: np.ndarray,
    bm25: np.ndarray,
    stats: CatalogueStats,
) -> np.ndarray:
    """Features ``[len(rows), NUM_FEATURES]`` (float32) in the order of FEATURE_NAMES."""
    rows = np.asarray(rows, dtype=np.int64)
    distinct_terms = len(set(query_terms))
    matches = term_matches(lexical, lexical.token_ids(query_terms), rows)
    title_lengths = (lexical.doc_offsets[rows + 1] - lexical.doc_offsets[rows]).astype(np.float32)
    features = np.empty((len(rows), NUM_FEATURES), dtype=np.float32)
    features[:, 0] = cosine
    features[:, 1] = cosine - (cosine.max() if len(rows) else 0.0)
    features[:, 2] = _standardise(cosine, stats.cosine_mean, stats.cosine_std)
    features[:, 3] = bm25
    features[:, 4] = bm25 / stats.best_bm25 if stats.best_bm25 > 0 else 0.0
    features[:, 5] = _standardise(bm25, stats.bm25_mean, stats.bm25_std)
    features[:, 6] = matches / max(distinct_terms, 1)
    features[:, 7] = matches / np.maximum(title_lengths, 1.0)
    features[:, 8] = np.log1p(title_lengths)
    features[:, 9] = np.log1p(distinct_terms)
    return features
