"""``python -m shopserve.export milvus``: load a built store's item vectors into a Milvus collection,
check the collection's recall@100 against exact search (and FAISS's on the same queries), then point
the store's retrieve version at it. Nothing of the store changes unless the check passes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from shopserve.ensemble import store
from shopserve.ensemble.dense import (
    MILVUS_BACKEND,
    MOMENTS_FILE,
    DenseIndex,
    VectorIndex,
)
from shopserve.ensemble.milvus import ROW_FIELD, VECTOR_FIELD, MilvusIndex, connect
from shopserve.ensemble.models import OnnxEncoder
from shopserve.ensemble.pipeline import load_tokenizer
from tqdm.auto import tqdm

from .index import EF_SEARCH_CHOICES, RECALL_DEPTH, IndexQualityError, exact_top
from .repository import record_rewritten_files, sole_writer

log = logging.getLogger("shopserve.export.milvus")

INSERT_BATCH = 2000
RECALL_QUERIES = 500  # catalogue texts, embedded by the store's own encoder
QUERY_WORDS = 3
SEARCH_BATCH = 100
INDEX_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class MilvusCheck:
    ef_search: int  # the efSearch Milvus serves with
    recall_at_100: float  # Milvus against exact search, at that efSearch
    faiss_recall_at_100: float  # the store's FAISS index at its own efSearch, on the same queries
    overlap_with_faiss: float  # share of FAISS's top-100 that Milvus also returns
    recall_by_ef_search: dict[int, float]


@dataclass(frozen=True)
class MilvusReport:
    uri: str
    collection: str
    items: int
    load_s: float
    queries: int
    check: MilvusCheck


@contextmanager
def milvus_lite_server(folder: Path, port: int, start_timeout_s: float = 60) -> Iterator[str]:
    """A Milvus Lite gRPC server (the ``milvus-lite`` wheel) on 127.0.0.1:``port``, its data and
    log in ``folder``, for trying the backend on one machine; yields its URI."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(folder / "data")]
    with open(folder / "milvus.log", "wb") as log_file:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"Milvus Lite did not start: {(folder / 'milvus.log').read_text()[-2000:]}"
                )
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


def linked_store_copy(repository: Path, destination: Path) -> Path:
    """A copy of a store to load into Milvus beside the original: the retrieve model's files
    hard-linked (the large ones; this command replaces, never writes through, the files it
    changes), the rest copied (ONNX's checker refuses weights that have several hard links)."""
    retrieve = (Path(repository) / store.RETRIEVE).resolve()

    def place(source: str, target: str) -> str:
        if Path(source).resolve().is_relative_to(retrieve):
            os.link(source, target)
            return target
        return shutil.copy2(source, target)

    return Path(shutil.copytree(repository, destination, copy_function=place))


def default_collection(repository: Path, version: int) -> str:
    """``shopserve_<version>_<first 12 hex of the index file's digest>``: one per built index."""
    digest = json.loads((repository / store.MANIFEST_FILE).read_text())["files"]
    key = f"{store.RETRIEVE}/{version}/{store.DENSE_INDEX_FILE}"
    return f"shopserve_v{version}_{digest[key][:12]}"


def create_collection(client, collection: str, dense: DenseIndex, replace: bool) -> None:
    """An empty collection with the FAISS index's HNSW settings (M, efConstruction)."""
    from pymilvus import DataType

    if client.has_collection(collection):
        if not replace:
            raise RuntimeError(
                f"Milvus already has a collection {collection!r}: pass --replace to load it again"
            )
        client.drop_collection(collection)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(ROW_FIELD, DataType.INT64, is_primary=True)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dense.stored.shape[1])
    index = client.prepare_index_params()
    hnsw = dense.index.hnsw
    index.add_index(
        field_name=VECTOR_FIELD,
        index_type="HNSW",
        metric_type="IP",
        params={"M": int(hnsw.nb_neighbors(1)), "efConstruction": int(hnsw.efConstruction)},
    )
    client.create_collection(collection, schema=schema, index_params=index)


def insert_vectors(client, collection: str, vectors: np.ndarray) -> None:
    for start in tqdm(range(0, len(vectors), INSERT_BATCH), desc="Milvus insert", unit="batch"):
        batch = vectors[start : start + INSERT_BATCH]
        client.insert(
            collection,
            [{ROW_FIELD: start + i, VECTOR_FIELD: v} for i, v in enumerate(batch)],
        )
    client.flush(collection)
    wait_for_index(client, collection, len(vectors))
    # Loaded again: Milvus Lite, right after building, still searches the freshly flushed rows
    # exactly (recall 1.0 here, measured) until the collection's segments are loaded anew.
    client.release_collection(collection)
    client.load_collection(collection)


def wait_for_index(client, collection: str, rows: int, timeout_s: float = INDEX_TIMEOUT_S) -> None:
    """Until Milvus has built the HNSW index over all ``rows``: it builds after the flush, and
    searches the rows not yet indexed exactly, which would flatter the recall check."""
    deadline = time.monotonic() + timeout_s
    with tqdm(total=rows, desc="Milvus index", unit="row") as bar:
        while True:
            state = client.describe_index(collection, VECTOR_FIELD)
            bar.update(int(state.get("indexed_rows", 0)) - bar.n)
            if state.get("state") == "Finished" and int(state.get("indexed_rows", 0)) >= rows:
                return
            if state.get("state") == "Failed" or time.monotonic() > deadline:
                raise RuntimeError(f"Milvus did not index {collection!r}: {state}")
            time.sleep(1)


def recall_queries(repository: Path, version: int, count: int, seed: int = 7) -> np.ndarray:
    """``count`` texts of the catalogue, embedded by the version's served encoder: half of them
    whole titles, half the first QUERY_WORDS words of others (short, as shoppers' queries are,
    and harder for HNSW: their neighbours are less distinct)."""
    titles = store.load_catalogue(repository, version).titles
    picked = np.random.default_rng(seed).choice(len(titles), min(count, len(titles)), False)
    texts = [
        titles[row] if i % 2 else " ".join(titles[row].split()[:QUERY_WORDS])
        for i, row in enumerate(picked)
    ]
    encoder = OnnxEncoder(store.in_process_model_file(repository, store.ENCODER, version))
    return encoder.embed_texts(load_tokenizer(repository, version), texts)


def top_rows(
    index: VectorIndex, queries: np.ndarray, depth: int, ef_search: int | None = None
) -> np.ndarray:
    """Each query's top-``depth`` rows, asked SEARCH_BATCH queries at a time."""
    return np.vstack(
        [
            index.search(queries[start : start + SEARCH_BATCH], depth, ef_search)[0]
            for start in range(0, len(queries), SEARCH_BATCH)
        ]
    )


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def choose_ef_search(milvus: MilvusIndex, dense: DenseIndex, queries: np.ndarray) -> MilvusCheck:
    """The smallest efSearch (from the store's own up) at which Milvus finds at least as many of
    the exact top-100 as the store's FAISS index does; none up to the largest choice fails."""
    truth = exact_top(dense.stored, queries, RECALL_DEPTH)
    faiss_found = top_rows(dense, queries, RECALL_DEPTH)
    target = recall(faiss_found, truth)
    by_ef = {}
    for ef in [ef for ef in EF_SEARCH_CHOICES if ef >= dense.ef_search] or [dense.ef_search]:
        found = top_rows(milvus, queries, RECALL_DEPTH, ef)
        by_ef[ef] = round(recall(found, truth), 4)
        log.info("Milvus recall@100 at efSearch %d: %.4f (FAISS %.4f)", ef, by_ef[ef], target)
        if by_ef[ef] >= target:
            return MilvusCheck(
                ef, by_ef[ef], round(target, 4), round(recall(found, faiss_found), 4), by_ef
            )
    raise IndexQualityError(
        f"Milvus recall@100 is {max(by_ef.values()):.4f} at best (efSearch up to {max(by_ef)}), "
        f"below the store's FAISS index ({target:.4f}); the store still serves FAISS"
    )


def load_into_milvus(
    repository: Path,
    uri: str,
    collection: str | None = None,
    version: int | None = None,
    replace: bool = False,
) -> MilvusReport:
    """Load, check, and point retrieve version ``version`` (the newest) at the collection."""
    repository = Path(repository)
    with sole_writer(repository):
        version_dir = store.version_dir(repository, store.RETRIEVE, version)
        version = int(version_dir.name)
        params = store.config_parameters(repository, store.RETRIEVE, version)
        dense = DenseIndex.load(version_dir / store.DENSE_INDEX_FILE, int(params["ef_search"]))
        collection = collection or default_collection(repository, version)
        client = connect(uri)
        started = time.perf_counter()
        create_collection(client, collection, dense, replace)
        insert_vectors(client, collection, dense.stored)
        load_s = time.perf_counter() - started
        log.info("loaded %d vectors into %s in %.1f s", dense.size, collection, load_s)

        milvus = MilvusIndex(client, collection, dense.size, dense.moments, dense.ef_search)
        queries = recall_queries(repository, version, RECALL_QUERIES)
        check = choose_ef_search(milvus, dense, queries)
        point_at_collection(version_dir, uri, collection, dense, check.ef_search)
        return MilvusReport(uri, collection, dense.size, round(load_s, 1), len(queries), check)


def point_at_collection(
    version_dir: Path, uri: str, collection: str, dense: DenseIndex, ef_search: int
) -> None:
    """Write the moments and the version's backend settings. Each file is replaced whole (a new
    inode), so a store copied with hard links keeps its own."""
    moments = version_dir / MOMENTS_FILE
    staged = moments.with_suffix(".tmp.npy")
    dense.moments.save(staged)
    os.replace(staged, moments)
    fitted = store.fitted_parameters(version_dir) | {
        "dense_backend": MILVUS_BACKEND,
        "milvus_uri": uri,
        "milvus_collection": collection,
        "milvus_rows": str(dense.size),
        "milvus_ef_search": str(ef_search),
    }
    store.write_fitted_parameters(version_dir, fitted)
    record_rewritten_files(version_dir)
    log.info("%s now retrieves from Milvus %s (%s)", version_dir, collection, uri)


def detach(repository: Path, version: int | None = None) -> Path:
    """Point retrieve version ``version`` (the newest) back at its own FAISS index."""
    version_dir = store.version_dir(Path(repository), store.RETRIEVE, version)
    fitted = {
        key: value
        for key, value in store.fitted_parameters(version_dir).items()
        if key != "dense_backend" and not key.startswith("milvus_")
    }
    with sole_writer(repository):
        store.write_fitted_parameters(version_dir, fitted)
        (version_dir / MOMENTS_FILE).unlink(missing_ok=True)
        record_rewritten_files(version_dir)
    log.info("%s retrieves from its FAISS index again", version_dir)
    return version_dir
