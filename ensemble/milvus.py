"""Dense retrieval on Milvus: the interface of :class:`~.dense.DenseIndex`, with the vectors and the
HNSW graph kept in a Milvus collection (a cluster, a standalone server or Milvus Lite) instead of
in each server's memory. ``python -m shopserve.export milvus`` loads a built store's vectors into
a collection and points the store's retrieve version at it (docs/milvus.md).

What stays in the server: the embeddings' two moments (``retrieve/N/dense_moments.npy``, 1.2 MB),
so the cosine statistics of the ranking features need no scan. Candidate vectors are fetched by
row; a filtered search sends its allowed rows (or the excluded ones, whichever list is shorter).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .dense import EXACT_FILTER_SHARE, MOMENTS_FILE, EmbeddingMoments

log = logging.getLogger("shopserve.milvus")

ROW_FIELD = "row"  # the primary key: the item's catalogue row
VECTOR_FIELD = "embedding"
TOKEN_ENV = "SHOPSERVE_MILVUS_TOKEN"  # "user:password" or an API key; never in a config file
TIMEOUT_S = 10.0  # connecting, and each search or fetch: a stuck Milvus fails the request
MAX_EF_SEARCH = 32768


class MilvusUnavailable(RuntimeError):
    """The Milvus server can't be reached or lacks the collection the store names."""


def connect(uri: str):
    """A ``MilvusClient`` for ``uri`` (``http://host:19530``; a local path opens Milvus Lite in
    this process), with the token from $SHOPSERVE_MILVUS_TOKEN when set."""
    from pymilvus import MilvusClient

    try:
        return MilvusClient(uri=uri, token=os.environ.get(TOKEN_ENV, ""), timeout=TIMEOUT_S)
    # pymilvus raises its own types, or gRPC's, for a server it can't reach
    except Exception as exc:
        raise MilvusUnavailable(f"cannot connect to Milvus at {uri}: {exc}") from exc


def search_params(ef_search: int) -> dict:
    return {"metric_type": "IP", "params": {"ef": int(ef_search)}}


def filtered_ef_search(ef_search: int, share: float) -> int:
    """efSearch for a search among ``share`` of the items. As on FAISS, raised by 1/sqrt(share);
    below EXACT_FILTER_SHARE, where FAISS scans the allowed rows exactly, by 1/share (capped), so
    the graph walk reaches nearly all of them: on Home Depot's dev queries at a 2 % share, 1/sqrt
    found 0.87 of the exact filtered top-100."""
    if share < EXACT_FILTER_SHARE:
        return min(MAX_EF_SEARCH, int(np.ceil(ef_search / share)))
    return max(ef_search, int(np.ceil(ef_search / np.sqrt(share))))


class MilvusIndex:
    """HNSW inner-product search in a Milvus collection of (row, embedding) records."""

    def __init__(
        self, client, collection: str, size: int, moments: EmbeddingMoments, ef_search: int
    ) -> None:
        self.client = client
        self.collection = collection
        self._size = size
        self.moments = moments
        self.ef_search = ef_search
        self.dimension = len(moments.mean)

    @classmethod
    def served(cls, version_dir: Path, params: dict[str, str]) -> MilvusIndex:
        """The collection a retrieve version names (``milvus_uri``, ``milvus_collection``), at
        the efSearch its load chose (``milvus_ef_search``)."""
        uri, collection = params["milvus_uri"], params["milvus_collection"]
        client = connect(uri)
        if not client.has_collection(collection):
            raise MilvusUnavailable(
                f"Milvus at {uri} has no collection {collection!r}: load it with "
                f"'python -m shopserve.export milvus' (docs/milvus.md)"
            )
        client.load_collection(collection)
        size = int(client.get_collection_stats(collection)["row_count"])
        expected = int(params["milvus_rows"])
        if size != expected:
            raise MilvusUnavailable(
                f"collection {collection!r} holds {size} items, the store {expected}: load it again"
            )
        log.info("dense retrieval on Milvus collection %s (%d items)", collection, size)
        moments = EmbeddingMoments.load(version_dir / MOMENTS_FILE)
        return cls(client, collection, size, moments, int(params["milvus_ef_search"]))

    @property
    def size(self) -> int:
        return self._size

    def cosine_moments(self, query: np.ndarray) -> tuple[float, float]:
        return self.moments.cosine(query)

    def _search(
        self, queries: np.ndarray, n: int, ef_search: int, where: str = ""
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dimension)
        hits = self.client.search(
            self.collection,
            data=list(queries),
            limit=n,
            filter=where,
            output_fields=[ROW_FIELD],
            search_params=search_params(ef_search),
            timeout=TIMEOUT_S,
        )
        rows = np.full((len(queries), n), -1, dtype=np.int64)
        scores = np.full((len(queries), n), -np.inf, dtype=np.float32)
        for i, found in enumerate(hits):
            rows[i, : len(found)] = [hit[ROW_FIELD] for hit in found]
            scores[i, : len(found)] = [hit["distance"] for hit in found]
        return rows, scores

    def search(
        self, queries: np.ndarray, n: int, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n`` rows and inner products for each query row (``-1`` rows pad a short list)."""
        return self._search(queries, n, ef_search or self.ef_search)

    def search_within(self, query: np.ndarray, n: int, allowed: np.ndarray) -> np.ndarray:
        """The top-``n`` rows among ``allowed`` (a boolean mask over the rows), best first."""
        included = np.flatnonzero(allowed)
        if len(included) == 0:
            return np.empty(0, dtype=np.int64)
        excluded = np.flatnonzero(~np.asarray(allowed, dtype=bool))
        if len(excluded) == 0:
            where = ""
        elif len(included) <= len(excluded):
            where = f"{ROW_FIELD} in {included.tolist()}"
        else:
            where = f"{ROW_FIELD} not in {excluded.tolist()}"
        ef = filtered_ef_search(self.ef_search, len(included) / max(self.size, 1))
        rows, _ = self._search(query, n, ef, where)
        return rows[0][rows[0] >= 0]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) == 0:
            return np.empty((0, self.dimension), dtype=np.float32)
        unique = np.unique(rows)
        records = self.client.get(
            self.collection, ids=unique.tolist(), output_fields=[VECTOR_FIELD], timeout=TIMEOUT_S
        )
        by_row = {int(r[ROW_FIELD]): r[VECTOR_FIELD] for r in records}
        missing = [int(r) for r in unique if int(r) not in by_row]
        if missing:
            raise MilvusUnavailable(f"collection {self.collection!r} lacks rows {missing[:5]}")
        found = np.asarray([by_row[int(r)] for r in unique], dtype=np.float32)
        return found[np.searchsorted(unique, rows)]
