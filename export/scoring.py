"""Exact scores of one query against the whole catalogue (for training and evaluation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from shopserve.ensemble.features import CatalogueStats, ranking_features
from shopserve.ensemble.lexical import LexicalIndex, QueryTerms


@dataclass(frozen=True)
class QueryScores:
    terms: QueryTerms
    bm25: np.ndarray  # [catalogue]
    cosine: np.ndarray  # [catalogue]

    @classmethod
    def compute(
        cls, lexical: LexicalIndex, embeddings: np.ndarray, query: str, query_embedding: np.ndarray
    ) -> QueryScores:
        terms = lexical.analyze(query)
        return cls(terms, lexical.scores(terms), embeddings @ query_embedding)

    def features(self, lexical: LexicalIndex, rows: np.ndarray) -> np.ndarray:
        """Ranker features of ``rows``, computed exactly (no ANN)."""
        stats = CatalogueStats.of(self.bm25, float(self.cosine.mean()), float(self.cosine.std()))
        return ranking_features(
            lexical, self.terms, rows, self.cosine[rows], self.bm25[rows], stats
        )

    def fused(self) -> np.ndarray:
        """The baseline fusion: mean of the per-query z-scores of BM25 and cosine."""
        return 0.5 * _zscore(self.bm25) + 0.5 * _zscore(self.cosine)


def _zscore(values: np.ndarray) -> np.ndarray:
    std = values.std()
    return (values - values.mean()) / std if std > 0 else np.zeros_like(values)
