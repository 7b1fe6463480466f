"""FP32 catalogue embeddings and the HNSW index over them, cached per built repository.

Baseline (a) searches the FP32 embeddings exactly; variant (b) serves an HNSW index built over them
with the same parameters as the shipped INT8 index. Embedding 54,667 titles takes minutes on two
cores, so both are cached under ``benchmarks/work/cache/<manifest checksum>/``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from shopserve.ensemble import store
from shopserve.ensemble.dense import DEFAULT_EF_CONSTRUCTION, DenseIndex
from shopserve.ensemble.models import OnnxEncoder
from shopserve.ensemble.pipeline import load_tokenizer

from .common import WORK_DIR, cpu_lock, repository_key
from .variants import DYNAMIC_INT8_ENCODER_FILE, FP32_ENCODER_FILE

log = logging.getLogger("benchmarks.fp32")

EMBED_THREADS = 2


@dataclass(frozen=True)
class Fp32Artefacts:
    embeddings: Path  # float32 [items, 384], L2-normalised, catalogue row order
    index: Path  # faiss IndexHNSWFlat over them


def cache_dir(repository: Path) -> Path:
    return WORK_DIR / "cache" / repository_key(repository)


def _embed_catalogue(repository: Path) -> np.ndarray:
    catalogue = store.Catalogue.load(
        store.latest_version_dir(repository, store.POSTPROCESS) / store.CATALOGUE_FILE
    )
    encoder = OnnxEncoder(
        store.latest_version_dir(repository, store.ENCODER) / FP32_ENCODER_FILE, EMBED_THREADS
    )
    return encoder.embed_texts(
        load_tokenizer(repository), catalogue.titles, progress="FP32 catalogue embeddings"
    )


def _hnsw_m(repository: Path) -> int:
    import faiss

    index = faiss.read_index(
        str(store.latest_version_dir(repository, store.RETRIEVE) / store.DENSE_INDEX_FILE)
    )
    return int(index.hnsw.nb_neighbors(1))


def dynamic_int8_encoder(repository: Path) -> Path:
    """The store's FP32 encoder quantized as the encoder was shipped before (dynamic QInt8,
    per-channel weights), cached: the "before" side of the benchmark."""
    from shopserve.export.quantize import quantize_int8

    path = cache_dir(repository) / DYNAMIC_INT8_ENCODER_FILE
    if not path.exists():
        source = store.latest_version_dir(repository, store.ENCODER) / FP32_ENCODER_FILE
        quantize_int8(source, path.with_suffix(".tmp.onnx"))
        path.with_suffix(".tmp.onnx").rename(path)
    return path


def ensure(repository: Path) -> Fp32Artefacts:
    """Return the cached FP32 artefacts of ``repository``, computing what is missing."""
    directory = cache_dir(repository)
    directory.mkdir(parents=True, exist_ok=True)
    artefacts = Fp32Artefacts(directory / "catalogue_fp32.npy", directory / "dense_fp32.faiss")
    if not artefacts.embeddings.exists():
        log.info("embedding the catalogue with the FP32 encoder (minutes; cached in %s)", directory)
        with cpu_lock("FP32 catalogue embeddings"):
            started = time.monotonic()
            embeddings = _embed_catalogue(repository)
            np.save(directory / "catalogue_fp32.tmp.npy", embeddings)
            (directory / "catalogue_fp32.tmp.npy").rename(artefacts.embeddings)
        log.info("FP32 embeddings done in %.0f s", time.monotonic() - started)
    if not artefacts.index.exists():
        params = store.config_parameters(repository, store.RETRIEVE)
        m = _hnsw_m(repository)
        log.info(
            "building the FP32 HNSW index (M=%d, efConstruction=%d)", m, DEFAULT_EF_CONSTRUCTION
        )
        with cpu_lock("FP32 HNSW index"):
            index = DenseIndex.build(
                np.load(artefacts.embeddings), m=m, ef_search=int(params["ef_search"])
            )
            index.save(directory / "dense_fp32.tmp.faiss")
            (directory / "dense_fp32.tmp.faiss").rename(artefacts.index)
    return artefacts
