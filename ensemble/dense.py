"""Dense retrieval: an HNSW inner-product index (FAISS) over L2-normalised item embeddings."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from . import store

DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 200
DEFAULT_EF_SEARCH = 128
# A filtered search scans the allowed rows exactly when they are this few, or this small a share of
# the catalogue (where HNSW restricted to them loses recall); otherwise HNSW searches inside them.
EXACT_FILTER_ROWS = 8192
EXACT_FILTER_SHARE = 0.1


class DenseIndex:
    """HNSW search, plus the first two moments of the item embeddings, so that the mean and spread
    of a query's cosine over the whole catalogue cost one 384x384 product instead of a full scan."""

    def __init__(self, index: faiss.IndexHNSWFlat, ef_search: int = DEFAULT_EF_SEARCH) -> None:
        self.index = index
        self.ef_search = ef_search
        self.index.hnsw.efSearch = ef_search
        storage = faiss.downcast_index(index.storage)  # the vectors, viewed without a copy
        self.stored = faiss.rev_swig_ptr(storage.get_xb(), index.ntotal * index.d).reshape(
            index.ntotal, index.d
        )
        self.stored.flags.writeable = False  # a loaded index maps its file read-only
        embeddings = self.stored.astype(np.float64)
        self.mean = embeddings.mean(0)
        self.second_moment = embeddings.T @ embeddings / max(len(embeddings), 1)

    def cosine_moments(self, query: np.ndarray) -> tuple[float, float]:
        """Mean and standard deviation of ``query``'s inner product over every item."""
        query = np.asarray(query, dtype=np.float64).reshape(-1)
        mean = float(query @ self.mean)
        variance = float(query @ self.second_moment @ query) - mean * mean
        return mean, float(np.sqrt(max(variance, 0.0)))

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        m: int = DEFAULT_HNSW_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int = DEFAULT_EF_SEARCH,
    ) -> DenseIndex:
        index = faiss.IndexHNSWFlat(embeddings.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
        return cls(index, ef_search)

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, ef_search: int = DEFAULT_EF_SEARCH) -> DenseIndex:
        """The index at ``path``, memory-mapped (vectors and graph): every process that serves
        it shares one copy of its pages."""
        return cls(faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC), ef_search)

    @classmethod
    def served(cls, repository: Path, version: int | None = None) -> DenseIndex:
        """The index a built store serves (``version``: the newest) at its configured efSearch."""
        params = store.config_parameters(repository, store.RETRIEVE, version)
        return cls.load(
            store.version_dir(repository, store.RETRIEVE, version) / store.DENSE_INDEX_FILE,
            int(params["ef_search"]),
        )

    @property
    def size(self) -> int:
        return self.index.ntotal

    def search(
        self, queries: np.ndarray, n: int, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n`` rows and inner products for each query row (``-1`` rows pad a short list);
        ``ef_search`` overrides the index's for this call."""
        params = None if ef_search is None else faiss.SearchParametersHNSW(efSearch=ef_search)
        scores, rows = self.index.search(
            np.ascontiguousarray(queries, dtype=np.float32), n, params=params
        )
        return rows, scores

    def search_within(self, query: np.ndarray, n: int, allowed: np.ndarray) -> np.ndarray:
        """The top-``n`` rows among ``allowed`` (a boolean mask over the rows) for one query, best
        first. Few allowed rows are scanned exactly; otherwise HNSW searches inside them with
        efSearch raised by 1/sqrt(their share): measured on Home Depot with random masks,
        recall@100 against exact filtered search 0.96 to 0.99 for shares of 12 % to 50 %."""
        allowed_rows = int(np.count_nonzero(allowed))
        share = allowed_rows / max(self.size, 1)
        bits = np.packbits(allowed, bitorder="little")  # alive until the search returns
        selector = faiss.IDSelectorBitmap(self.size, faiss.swig_ptr(bits))
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if allowed_rows <= EXACT_FILTER_ROWS or share < EXACT_FILTER_SHARE:
            index, params = self.index.storage, faiss.SearchParameters(sel=selector)
        else:
            ef = int(np.ceil(self.ef_search / np.sqrt(share)))
            index, params = self.index, faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
        _, found = index.search(query, n, params=params)
        return found[0][found[0] >= 0]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return self.stored[np.asarray(rows, dtype=np.int64)]
