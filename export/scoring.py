"""Exact scores of one query against the whole catalogue (for training and evaluation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from shopserve.ensemble.features import FUSION_WEIGHTS, CatalogueStats, ranking_features
from shopserve.ensemble.lexical import LexicalIndex, QueryTerms, SparseScores


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
        stats = CatalogueStats.of(
            SparseScores.of_dense(self.bm25), float(self.cosine.mean()), float(self.cosine.std())
        )
        return ranking_features(
            lexical, self.terms, rows, self.cosine[rows], self.bm25[rows], stats
        )

    def fused(self) -> np.ndarray:
        """The baseline fusion: weighted per-query z-scores of BM25 and cosine (FUSION_WEIGHTS)."""
        return FUSION_WEIGHTS["bm25_z"] * _zscore(self.bm25) + FUSION_WEIGHTS["cosine_z"] * _zscore(
            self.cosine
        )


def _zscore(values: np.ndarray) -> np.ndarray:
    std = values.std()
    return (values - values.mean()) / std if std > 0 else np.zeros_like(values)
