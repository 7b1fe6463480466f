"""The graph's two ONNX models as ONNX Runtime sessions: the text encoder and the ranker."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm.auto import tqdm

from .tokenize import QueryTokenizer


def ort_session(model_path: Path | str, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle threads must sleep, not spin: on 2 cores a spinning pool starves the other steps.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """(INPUT_IDS, ATTENTION_MASK) -> L2-normalised, mean-pooled EMBEDDING."""

    def __init__(self, model_path: Path | str, threads: int = 1) -> None:
        self.session = ort_session(model_path, threads)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        (embedding,) = self.session.run(
            ["EMBEDDING"], {"INPUT_IDS": input_ids, "ATTENTION_MASK": attention_mask}
        )
        return embedding

    def embed_texts(
        self,
        tokenizer: QueryTokenizer,
        texts: Sequence[str],
        batch_size: int = 64,
        progress: str | None = None,
    ) -> np.ndarray:
        """Embed many texts; batches are formed from length-sorted texts to limit padding."""
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), 0), dtype=np.float32)
        chunks = range(0, len(texts), batch_size)
        for start in tqdm(chunks, desc=progress, unit="batch", disable=progress is None):
            rows = order[start : start + batch_size]
            embedding = self(*tokenizer.batch([texts[i] for i in rows]))
            if out.shape[1] == 0:
                out = np.empty((len(texts), embedding.shape[1]), dtype=np.float32)
            out[rows] = embedding
        return out


class OnnxRanker:
    """FEATURES [n, NUM_FEATURES] -> one relevance logit per candidate."""

    def __init__(self, model_path: Path | str, threads: int = 1) -> None:
        self.session = ort_session(model_path, threads)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        (scores,) = self.session.run(["SCORES"], {"FEATURES": features})
        return scores.reshape(-1)
