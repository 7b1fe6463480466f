"""Hybrid candidate generation (dense ANN top-N ∪ lexical top-N) and feature fusion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .dense import VectorIndex
from .features import CatalogueStats, ranking_features
from .lexical import LexicalIndex

if TYPE_CHECKING:
    from .catalogue import LiveCatalogue

DEFAULT_DENSE_DEPTH = 100
DEFAULT_LEXICAL_DEPTH = 100


@dataclass(frozen=True)
class Candidates:
    rows: np.ndarray  # int64 [n]: catalogue rows, ascending
    features: np.ndarray  # float32 [n, NUM_FEATURES]


class Retriever:
    def __init__(
        self,
        dense: VectorIndex,
        lexical: LexicalIndex,
        dense_depth: int = DEFAULT_DENSE_DEPTH,
        lexical_depth: int = DEFAULT_LEXICAL_DEPTH,
    ) -> None:
        if dense.size != lexical.size:
            raise ValueError(f"dense index has {dense.size} items, lexical {lexical.size}")
        self.dense = dense
        self.lexical = lexical
        self.dense_depth = dense_depth
        self.lexical_depth = lexical_depth
        self.live: LiveCatalogue | None = None  # catalogue updates since the build, when served

    def __call__(
        self, query: str, embedding: np.ndarray, allowed: np.ndarray | None = None
    ) -> Candidates:
        """The candidates of one query: only rows ``allowed`` (a boolean mask) when given."""
        if self.live is not None and self.live.changed:
            return self._live_candidates(query, embedding, allowed)
        embedding = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
        if allowed is None:
            dense_rows = self.dense.search(embedding, self.dense_depth)[0][0]
        else:
            dense_rows = self.dense.search_within(embedding, self.dense_depth, allowed)
        terms = self.lexical.analyze(query)
        bm25 = self.lexical.sparse_scores(terms)  # the statistics stay the whole catalogue's
        rows = np.union1d(dense_rows[dense_rows >= 0], bm25.top(self.lexical_depth, allowed))
        cosine = self.dense.vectors(rows) @ embedding[0]
        stats = CatalogueStats.of(bm25, *self.dense.cosine_moments(embedding[0]))
        features = ranking_features(self.lexical, terms, rows, cosine, bm25.at(rows), stats)
        return Candidates(rows=rows, features=features)

    def _live_candidates(
        self, query: str, embedding: np.ndarray, allowed: np.ndarray | None
    ) -> Candidates:
        """Candidates over the live catalogue: the build's indexes searched inside its rows that
        are still current, the rows written since searched exactly beside them, merged."""
        live = self.live
        embedding = np.asarray(embedding, dtype=np.float32).reshape(-1)
        base_rows = self.dense.search_within(
            embedding, self.dense_depth, live.base_allowed(allowed)
        )
        delta_rows, delta_scores = live.search_delta(embedding, self.dense_depth, allowed)
        # the dense side's depth over both: the best of the build's and the delta's together
        merged = np.concatenate([base_rows, delta_rows])
        scores = np.concatenate([self.dense.vectors(base_rows) @ embedding, delta_scores])
        dense_rows = merged[np.argsort(-scores, kind="stable")[: self.dense_depth]]
        terms = live.lexicon.query_terms(self.lexical.analyze(query), query)
        bm25 = live.delta_bm25(terms.words, self.lexical.sparse_scores(terms))
        rows = np.union1d(dense_rows, bm25.top(self.lexical_depth, allowed))
        cosine = live.vectors(rows) @ embedding
        stats = CatalogueStats.of(bm25, *self.dense.cosine_moments(embedding))
        features = ranking_features(live.terms, terms, rows, cosine, bm25.at(rows), stats)
        return Candidates(rows=rows, features=features)
