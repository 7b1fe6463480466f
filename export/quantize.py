"""The INT8 accuracy gate (cosine to FP32 and dev nDCG), and ONNX Runtime's dynamic INT8.

The build gates the static Q/DQ graph (:mod:`shopserve.export.qdq`). Dynamic INT8 was the served
encoder before it; the benchmarks still make it from a store's FP32 graph to measure against.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("shopserve.export.quantize")

MIN_MEAN_COSINE = 0.99
MIN_GATE_TEXTS = 1000
MAX_NDCG_DROP = 0.01  # relative


class AccuracyGateError(RuntimeError):
    """The quantized model is not accurate enough to ship; the build stops."""


@dataclass(frozen=True)
class GateReport:
    texts: int
    mean_cosine: float
    min_cosine: float
    ndcg_fp32: float
    ndcg_int8: float
    relative_ndcg_drop: float
    queries: int
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def quantize_int8(source: Path, destination: Path, per_channel: bool = True) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    destination.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        str(source), str(destination), per_channel=per_channel, weight_type=QuantType.QInt8
    )
    return destination


def accuracy_gate(
    fp32_embeddings: np.ndarray,
    int8_embeddings: np.ndarray,
    ndcg: Callable[[str], float],
    queries: int,
) -> GateReport:
    """Check INT8 against FP32 embeddings of the same real texts, and the nDCG both reach.

    ``ndcg(precision)`` returns the dev re-ranking nDCG@10 with the encoder of that precision; it
    is only computed once the cheaper cosine criterion holds. Raises AccuracyGateError naming the
    failed criterion.
    """
    texts = len(fp32_embeddings)
    if texts < MIN_GATE_TEXTS:
        raise AccuracyGateError(f"the gate needs at least {MIN_GATE_TEXTS} texts, got {texts}")
    cosines = np.sum(fp32_embeddings * int8_embeddings, axis=1) / (
        np.linalg.norm(fp32_embeddings, axis=1) * np.linalg.norm(int8_embeddings, axis=1)
    )
    if cosines.mean() < MIN_MEAN_COSINE:
        raise AccuracyGateError(
            f"INT8 accuracy gate failed: mean cosine to FP32 is {cosines.mean():.4f} on {texts} "
            f"texts (needs >= {MIN_MEAN_COSINE}; min {cosines.min():.4f}); nDCG not evaluated"
        )
    ndcg_fp32, ndcg_int8 = ndcg("fp32"), ndcg("int8")
    drop = (ndcg_fp32 - ndcg_int8) / ndcg_fp32 if ndcg_fp32 > 0 else 0.0
    failures = []
    if drop > MAX_NDCG_DROP:
        failures.append(
            f"dev re-ranking nDCG@10 fell {drop:.2%} from {ndcg_fp32:.4f} to {ndcg_int8:.4f} "
            f"on {queries} queries (allowed {MAX_NDCG_DROP:.0%})"
        )
    report = GateReport(
        texts=texts,
        mean_cosine=float(cosines.mean()),
        min_cosine=float(cosines.min()),
        ndcg_fp32=ndcg_fp32,
        ndcg_int8=ndcg_int8,
        relative_ndcg_drop=drop,
        queries=queries,
        passed=not failures,
    )
    log.info("INT8 accuracy gate: %s", report)
    if failures:
        raise AccuracyGateError("INT8 accuracy gate failed: " + "; ".join(failures))
    return report
