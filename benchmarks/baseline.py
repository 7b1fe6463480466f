"""Baseline (a): the same search in plain PyTorch FP32 eager behind FastAPI/uvicorn, one process.

What many teams run: the sentence-transformers encoder as a ``transformers`` AutoModel (shopserve's
pooled export module), exact dense search as a torch matmul over FP32 catalogue embeddings, the same
BM25 lexical retrieval and ranking features (``shopserve.ensemble``), the same trained ranker weights
in a torch module, then softmax + top-k. Run it with::

    python -m benchmarks.baseline --repository model_repository --embeddings FILE.npy --port PORT
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from .common import PROJECT, BenchmarkError

log = logging.getLogger("benchmarks.baseline")

INT8_INDEX_EMBEDDINGS = "int8-index"  # smoke tests: the shipped index's vectors, no FP32 cache


def _torch():
    import torch

    return torch


def load_ranker(onnx_path: Path):
    """The trained ranker as a torch module, its weights read from the ONNX initializers."""
    from shopserve.export.monotone import load_frozen

    return load_frozen(onnx_path)


def load_embeddings(repository: Path, source: str) -> np.ndarray:
    """FP32 catalogue embeddings from a ``.npy`` file, or the shipped index's (INT8) vectors."""
    if source == INT8_INDEX_EMBEDDINGS:
        import faiss
        from shopserve.ensemble import store

        index = faiss.read_index(
            str(store.latest_version_dir(repository, store.RETRIEVE) / store.DENSE_INDEX_FILE)
        )
        return index.reconstruct_n(0, index.ntotal)
    return np.load(source)


def exact_dense_index(embeddings: np.ndarray):
    """A DenseIndex whose search is exact: one torch matmul over every catalogue embedding."""
    from shopserve.ensemble.dense import DenseIndex, EmbeddingMoments

    torch = _torch()

    class ExactDenseIndex(DenseIndex):
        """DenseIndex's interface (and its catalogue cosine moments) without HNSW."""

        def __init__(self, vectors: np.ndarray) -> None:  # no faiss index to wrap
            self.embeddings = np.ascontiguousarray(vectors, dtype=np.float32)
            self.matrix = torch.from_numpy(self.embeddings)
            self.moments = EmbeddingMoments.of(self.embeddings)

        @property
        def size(self) -> int:
            return len(self.embeddings)

        def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
            with torch.inference_mode():
                scores = torch.from_numpy(np.asarray(queries, dtype=np.float32)) @ self.matrix.T
                top = torch.topk(scores, min(n, self.size), dim=1)
            return top.indices.numpy().astype(np.int64), top.values.numpy()

        def vectors(self, rows: np.ndarray) -> np.ndarray:
            return self.embeddings[np.asarray(rows, dtype=np.int64)]

    return ExactDenseIndex(embeddings)


class TorchSearch:
    """tokenize -> PyTorch encoder -> exact dense ∪ BM25 + features -> PyTorch ranker -> top-k."""

    def __init__(self, repository: Path, embeddings: np.ndarray) -> None:
        from shopserve.ensemble import store
        from shopserve.ensemble.lexical import LexicalIndex
        from shopserve.ensemble.pipeline import load_tokenizer
        from shopserve.ensemble.postprocess import PostProcessor
        from shopserve.ensemble.retrieve import Retriever
        from shopserve.export.encoder import pooled_encoder, trained_weights

        latest = store.latest_version_dir
        params = store.config_parameters(repository, store.RETRIEVE)
        self.tokenizer = load_tokenizer(repository)
        manifest = json.loads((repository / store.MANIFEST_FILE).read_text())
        self.encoder = pooled_encoder(trained_weights(manifest))
        self.retriever = Retriever(
            exact_dense_index(embeddings),
            LexicalIndex.load(latest(repository, store.RETRIEVE) / store.LEXICAL_INDEX_DIR),
            dense_depth=int(params["dense_depth"]),
            lexical_depth=int(params["lexical_depth"]),
        )
        self.ranker = load_ranker(latest(repository, store.RANKER) / store.ONNX_FILE)
        self.postprocessor = PostProcessor(
            store.Catalogue.load(latest(repository, store.POSTPROCESS) / store.CATALOGUE_FILE)
        )

    def search(self, query: str | bytes, top_k: int = 10):
        from shopserve.ensemble.validation import check_top_k, decode_query

        torch = _torch()
        text = decode_query(query)
        k = check_top_k(top_k)
        input_ids, attention_mask = self.tokenizer.batch([text])  # no padding for one query
        with torch.inference_mode():
            embedding = self.encoder(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
        candidates = self.retriever(text, embedding[0].numpy())
        with torch.inference_mode():
            logits = self.ranker(torch.from_numpy(candidates.features)).numpy()
        return self.postprocessor(candidates.rows, logits, k)


class SearchRequest(BaseModel):
    """The baseline's request body (module level: FastAPI resolves the annotation by name)."""

    query: str
    top_k: int = 10


def create_app(search: TorchSearch):
    """The FastAPI app: ``POST /search {"query", "top_k"}`` and ``GET /health``."""
    from fastapi import FastAPI, HTTPException
    from shopserve.ensemble.validation import InvalidRequest

    app = FastAPI(title="shopserve baseline (PyTorch FP32 eager)")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/search")
    def run_search(request: SearchRequest) -> dict:  # a sync endpoint: FastAPI's threadpool
        try:
            result = search.search(request.query, request.top_k)
        except InvalidRequest as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return {
            "product_ids": result.product_ids.tolist(),
            "scores": result.scores.tolist(),
            "titles": result.titles,
        }

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline", description=__doc__)
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument(
        "--embeddings",
        required=True,
        help=f"FP32 catalogue embeddings (.npy), or {INT8_INDEX_EMBEDDINGS!r} for smoke tests",
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import uvicorn

    torch = _torch()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    started = time.monotonic()
    search = TorchSearch(args.repository, load_embeddings(args.repository, args.embeddings))
    search.search("warm up query", 10)
    log.info(
        "baseline loaded in %.1f s (torch %s, %d intra-op threads)",
        time.monotonic() - started,
        torch.__version__,
        torch.get_num_threads(),
    )
    uvicorn.run(
        create_app(search),
        host="127.0.0.1",
        port=args.port,
        workers=1,
        log_level="warning",
        access_log=False,
    )
    return 0


class BaselineServer:
    """Baseline (a) as a child process (a context manager), ready when ``/health`` answers."""

    def __init__(
        self,
        repository: Path,
        embeddings: str,
        port: int,
        log_file: Path,
        torch_threads: int = 0,
    ) -> None:
        self.command = [
            sys.executable,
            "-m",
            "benchmarks.baseline",
            f"--repository={Path(repository).resolve()}",
            f"--embeddings={embeddings}",
            f"--port={port}",
            f"--torch-threads={torch_threads}",
        ]
        self.port = port
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> BaselineServer:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as handle:
            self.process = subprocess.Popen(
                self.command,
                cwd=PROJECT,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=dict(os.environ),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchmarkError(
                    f"the baseline exited with code {self.process.returncode}; see {self.log_file}"
                )
            try:
                with urllib.request.urlopen(f"http://{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise BenchmarkError(
            f"the baseline was not ready within {timeout:.0f} s; see {self.log_file}"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> BaselineServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
