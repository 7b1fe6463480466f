"""Catalogue embeddings reused across builds.

Embedding the catalogue is the build's longest step after fine-tuning. The served encoder gives a
title the same embedding in any batch, to float rounding (measured: 5e-8 for the static INT8 graph),
so a title's embedding depends only on the graph, the tokenizer, ONNX Runtime and how the CPU adds
INT8 products (``int8_sums``: x86 without VNNI saturates 16-bit sums). The cache is keyed by those,
one file per key, and holds one row per title (by a digest of the title). A rebuild embeds
only the titles its cache lacks: after a 1 % catalogue change, about 1 % of the catalogue.

The file grows with every distinct title a key's encoder has embedded; a new encoder starts a new
file. Deleting ``$SHOPSERVE_CACHE/embeddings`` is always safe.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime
from shopserve.ensemble import store
from shopserve.ensemble.models import OnnxEncoder, int8_sums
from shopserve.ensemble.tokenize import QueryTokenizer

from .cache import cache_key, cache_root

log = logging.getLogger("shopserve.export.embeddings")

DIGEST_BYTES = 16


@dataclass(frozen=True)
class EmbeddingReport:
    """Of the catalogue's distinct titles, how many were embedded and how many came from the cache."""

    titles: int
    distinct_titles: int
    embedded: int
    from_cache: int
    cache_file: str
    int8_sums: str  # how the CPU that embedded them adds INT8 products (models.int8_sums)

    def as_dict(self) -> dict:
        return asdict(self)


def title_digests(titles: Sequence[str]) -> np.ndarray:
    return np.array(
        [hashlib.sha256(t.encode()).digest()[:DIGEST_BYTES] for t in titles],
        dtype=f"S{DIGEST_BYTES}",
    )


def cache_file_for(encoder_file: Path, tokenizer_file: Path, max_length: int) -> Path:
    """The cache file of one encoder graph, tokenizer, ONNX Runtime version and kind of CPU (an
    INT8 graph embeds otherwise where the CPU adds INT8 products otherwise)."""
    key = cache_key(
        store.model_digest(encoder_file),
        store.file_digest(tokenizer_file),
        max_length,
        onnxruntime.__version__,
        int8_sums(),
    )
    return cache_root("embeddings") / f"{key}.npz"


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        return np.empty(0, dtype=f"S{DIGEST_BYTES}"), np.empty((0, 0), dtype=np.float32)
    with np.load(path) as stored:
        return stored["digests"], stored["embeddings"]


def _write(path: Path, digests: np.ndarray, embeddings: np.ndarray) -> None:
    """Replace the file whole (a concurrent build's rows may be lost: it is only a cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.stem}.partial-{os.getpid()}.npz")
    np.savez(staging, digests=digests, embeddings=embeddings)
    os.replace(staging, path)


def embed_catalogue(
    embed: Callable[[list[str]], np.ndarray], titles: Sequence[str], cache_file: Path
) -> tuple[np.ndarray, EmbeddingReport]:
    """Every title's embedding (rows in ``titles`` order): from ``cache_file`` where it holds the
    title, else from ``embed`` (which then joins the cache)."""
    digests = title_digests(titles)
    unique, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    cached_digests, cached = _read(cache_file)
    position = np.searchsorted(cached_digests, unique)
    position[position == len(cached_digests)] = 0
    hit = (
        cached_digests[position] == unique
        if len(cached_digests)
        else np.zeros(len(unique), dtype=bool)
    )
    missing = np.flatnonzero(~hit)
    fresh = embed([titles[first[i]] for i in missing]) if len(missing) else None
    width = fresh.shape[1] if fresh is not None else cached.shape[1]
    rows = np.empty((len(unique), width), dtype=np.float32)
    if hit.any():
        rows[hit] = cached[position[hit]]
    if fresh is not None:
        rows[missing] = fresh
        merged = np.concatenate([cached_digests, unique[missing]])
        order = np.argsort(merged, kind="stable")
        stacked = np.concatenate([cached.reshape(-1, width), fresh])
        _write(cache_file, merged[order], stacked[order])
    report = EmbeddingReport(
        titles=len(titles),
        distinct_titles=len(unique),
        embedded=len(missing),
        from_cache=len(unique) - len(missing),
        cache_file=str(cache_file),
        int8_sums=int8_sums(),
    )
    log.info(
        "catalogue embeddings: %d of %d distinct titles embedded, %d from the cache (%s)",
        report.embedded,
        report.distinct_titles,
        report.from_cache,
        cache_file,
    )
    return rows[inverse], report


class BuildEmbeddings:
    """One encoder's text embeddings within a build. Texts embedded with ``keep=True`` are kept,
    and every later call reuses them: the accuracy gate's dev titles and queries serve the
    catalogue, recall and training steps (a text embeds alike in any batch, to float rounding)."""

    def __init__(self, encoder: OnnxEncoder, tokenizer: QueryTokenizer) -> None:
        self.encoder = encoder
        self.tokenizer = tokenizer
        self._kept: dict[str, np.ndarray] = {}

    def __call__(
        self, texts: Sequence[str], progress: str | None = None, keep: bool = False
    ) -> np.ndarray:
        """Each text's embedding (rows in ``texts`` order); only texts not kept are embedded."""
        if not texts:  # as OnnxEncoder.embed_texts answers no texts
            return np.empty((0, 0), dtype=np.float32)
        fresh = [t for t in dict.fromkeys(texts) if t not in self._kept]
        rows = self.encoder.embed_texts(self.tokenizer, fresh, progress=progress) if fresh else []
        embedded = dict(zip(fresh, rows, strict=True))
        if keep:
            self._kept.update(embedded)
        return np.stack([self._kept[t] if t in self._kept else embedded[t] for t in texts])
