"""Static INT8 Q/DQ encoder for TensorRT's explicit quantization (signed, symmetric, per-channel).

ONNX Runtime's ``quantize_static`` (QDQ format) writes QuantizeLinear/DequantizeLinear pairs on both
inputs of every quantized MatMul: QInt8 activations and weights, zero points 0, per-channel weight
scales along the output-channel axis. Activation scales are calibrated once on real texts (cached),
and the MatMuls left in FP32 are chosen by measurement (:func:`choose_fp32_matmuls`): each MatMul's
sensitivity is the mean cosine to FP32 when only its quantization is reverted, and the most
sensitive ones stay FP32 until the held-out mean cosine reaches the target. The chosen MatMuls and
the calibration are written into the model's ``metadata_props``; :func:`tensorrt_qdq_problems`
checks the placement TensorRT expects.

Placement matters more than calibration: ``quantize_static`` alone also puts Q/DQ on the MatMul
outputs and lets the residual Adds read the INT8-rounded LayerNorm outputs (MiniLM, all MatMuls
INT8: mean cosine 0.84 to FP32 on Home Depot texts). With Q/DQ on the MatMul inputs only it is
0.98, and 0.992 with the four most sensitive MatMuls (FFN outputs of layers 0-3) left in FP32.
The build calls :func:`build_qdq_encoder`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from shopserve.ensemble.models import (
    EXACT_WEIGHT_BITS,
    QDQ_FORMAT_KEY,
    TENSORRT_QDQ_FORMAT,
    cpu_session,
    runs_as_written,
)

log = logging.getLogger("shopserve.export.qdq")

Batch = tuple[np.ndarray, np.ndarray]  # (input_ids, attention_mask), int64 [batch, seq]

METADATA_FP32 = "shopserve.qdq.fp32_matmuls"  # JSON list of node names kept in FP32
METADATA_CALIBRATION = "shopserve.qdq.calibration"  # JSON object: method, batches, rows, ...
METADATA_SELECTION = "shopserve.qdq.selection"  # JSON object: target and measured cosines
METADATA_FORMAT = QDQ_FORMAT_KEY
QDQ_FORMATS = {
    True: TENSORRT_QDQ_FORMAT,  # runs as written on CPU (ensemble/models.py says why)
    False: "QDQ QUInt8 asymmetric activations; QInt8 symmetric 7-bit weights",  # ONNX Runtime CPU's
}
# TensorRT's INT8 GEMMs sum in INT32: its graph keeps 8-bit weights. ONNX Runtime's CPU graph gets
# 7-bit weights (quantize_static's reduce_range), which x86 without VNNI adds without saturating,
# so it embeds a text alike on every CPU (ensemble/models.py, EXACT_WEIGHT_BITS).
WEIGHT_BITS = {True: 8, False: EXACT_WEIGHT_BITS}
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
QUANTIZED_OPS = ("MatMul", "Gemm")
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}


# --------------------------------------------------------------------------- quantization


def _extra_options(method: str, percentile: float, signed: bool) -> dict:
    options: dict = {
        "ActivationSymmetric": signed,
        "WeightSymmetric": True,
        "CalibTensorRangeSymmetric": signed,
        # Q/DQ on the MatMul inputs only (TensorRT's placement); never on the MatMul outputs.
        "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
    }
    if method == "percentile":
        options["CalibPercentile"] = percentile
    if method != "minmax":
        options["CalibStridedMinMax"] = 1  # one batch per collect: histograms merge across them
    return options


def _calibrate_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r} is not one of {CALIBRATION_METHODS}")
    return {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]


def _reader(batches: Sequence[Batch]):
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        """Feeds the batches; ``set_range`` lets ORT collect them one at a time (their sequence
        lengths differ, which the histogram calibrators cannot stack)."""

        def __init__(self) -> None:
            self.set_range(0, len(batches))

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._feeds = iter(
                {"INPUT_IDS": ids, "ATTENTION_MASK": mask}
                for ids, mask in batches[start_index:end_index]
            )

        def get_next(self) -> dict | None:
            return next(self._feeds, None)

    return _Reader()


def quantize_qdq(
    fp32_model: Path,
    destination: Path,
    calibration: Sequence[Batch] | None,
    keep_fp32: Sequence[str] = (),
    per_channel: bool = True,
    method: str = "minmax",
    percentile: float = 99.999,
    cache: Path | None = None,
    signed: bool = True,
) -> Path:
    """Write the Q/DQ INT8 graph of ``fp32_model`` to ``destination``; MatMuls in ``keep_fp32`` stay
    FP32.

    ``calibration`` holds (input_ids, attention_mask) int64 batches of real texts, padded as served
    (length-sorted batches, see :func:`calibration_batches`). ``cache`` (optional) holds the
    calibrated activation ranges: when it exists they are reused and nothing is calibrated again
    (``calibration`` then only feeds the metadata, and may be None); otherwise it is written. Q/DQ
    end up on the quantized MatMuls' inputs only (:func:`restrict_to_matmul_inputs`). The FP32
    MatMuls and the calibration go into ``metadata_props``. ``signed``: symmetric INT8 activations
    as TensorRT's explicit quantization takes them; otherwise asymmetric UINT8 activations, which
    ONNX Runtime's CPU kernels run several times faster, with 7-bit weights (:data:`WEIGHT_BITS`).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    destination.parent.mkdir(parents=True, exist_ok=True)
    names = set(matmul_names(onnx.load(str(fp32_model), load_external_data=False)))
    unknown = sorted(set(keep_fp32) - names)
    if unknown:
        raise ValueError(f"keep_fp32 names no MatMul/Gemm of the model: {unknown}")
    with _quiet():
        quantize_static(
            str(fp32_model),
            str(destination),
            _reader(calibration) if calibration is not None else None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=per_channel,
            activation_type=QuantType.QInt8 if signed else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=WEIGHT_BITS[signed] == 7,
            nodes_to_exclude=list(keep_fp32),
            calibrate_method=_calibrate_method(method),
            extra_options=_extra_options(method, percentile, signed),
            calibration_cache_path=str(cache) if cache is not None else None,
        )
    model = onnx.load(str(destination))
    restrict_to_matmul_inputs(model)
    calibration_info: dict = {"method": method, "per_channel": per_channel}
    if method == "percentile":
        calibration_info["percentile"] = percentile
    if calibration is not None:
        calibration_info["batches"] = len(calibration)
        calibration_info["rows"] = int(sum(ids.shape[0] for ids, _ in calibration))
        calibration_info["mean_tokens"] = round(
            float(np.mean([mask.sum(axis=1).mean() for _, mask in calibration])), 2
        )
    set_metadata(
        model,
        {
            METADATA_FP32: json.dumps(sorted(keep_fp32)),
            METADATA_CALIBRATION: json.dumps(calibration_info, sort_keys=True),
            METADATA_FORMAT: QDQ_FORMATS[signed],
        },
    )
    onnx.save(model, str(destination))
    return destination


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence ONNX Runtime's quantization chatter (root-logger warnings, progress prints)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    """Set (replace) entries of ``model.metadata_props``."""
    kept = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        model.metadata_props.add(key=key, value=value)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def matmul_names(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul/Gemm nodes, in graph order."""
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]


def calibration_batches(tokenizer, texts: Sequence[str], batch_size: int = 16) -> list[Batch]:
    """Tokenize ``texts`` into length-sorted batches, each padded to its longest text only.

    That is how the served graph sees them (one query, or batches of similar length), so padding
    tokens do not widen the calibrated activation ranges.
    """
    ordered = sorted(texts, key=len)
    return [
        tokenizer.batch(ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size)
    ]


# --------------------------------------------------------------------------- measurement


def embed(model: onnx.ModelProto | Path, batches: Sequence[Batch], threads: int = 2) -> np.ndarray:
    """EMBEDDING rows of all ``batches``, concatenated (TensorRT's form as written, see
    :func:`shopserve.ensemble.models.cpu_session`)."""
    if isinstance(model, Path):
        session = cpu_session(model, threads, quiet=True)
    else:  # a graph in hand says its form: one session, not two
        as_written = runs_as_written(metadata(model))
        session = cpu_session(model.SerializeToString(), threads, True, as_written)
    rows = [
        session.run(["EMBEDDING"], {"INPUT_IDS": ids, "ATTENTION_MASK": mask})[0]
        for ids, mask in batches
    ]
    return np.concatenate(rows)


def cosines(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    dot = (reference * other).sum(axis=1)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1)
    return dot / np.maximum(norms, 1e-12)


def revert_to_fp32(
    qdq: onnx.ModelProto, fp32: onnx.ModelProto, nodes: Iterable[str]
) -> onnx.ModelProto:
    """A copy of ``qdq`` in which the MatMuls ``nodes`` read their FP32 inputs again.

    The same graph ``quantize_static(nodes_to_exclude=nodes)`` gives with the same activation
    ranges, without quantizing again: the MatMul takes the original tensor names (the FP32 weight
    initializers are copied from ``fp32``) and Q/DQ nodes left without consumers are dropped.
    """
    nodes = set(nodes)
    if not nodes:
        return qdq
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    originals = {n.name: n for n in fp32.graph.node if n.name in nodes}
    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    have = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.name in originals:
            del node.input[:]
            node.input.extend(originals[node.name].input)
            for name in node.input:
                if name in fp32_inits and name not in have:
                    model.graph.initializer.append(fp32_inits[name])
                    have.add(name)
    _drop_dead(model)
    return model


def restrict_to_matmul_inputs(model: onnx.ModelProto) -> None:
    """Keep activation Q/DQ only where a quantized MatMul/Gemm reads them.

    ``quantize_static`` points every consumer of a quantized tensor at its DequantizeLinear output:
    the residual Add and the Shape ops after a LayerNorm would read the INT8-rounded tensor too.
    TensorRT wants Q/DQ on the quantized MatMuls' inputs only, so the other consumers read the
    FP32 tensor again, and Q/DQ pairs left without consumers are dropped.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.op_type in QUANTIZED_OPS and any(
            producer.get(name) is not None and producer[name].op_type == "DequantizeLinear"
            for name in node.input
        ):
            continue
        for index, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[index] = q.input[0]
    _drop_dead(model)


def _drop_dead(model: onnx.ModelProto) -> None:
    graph = model.graph
    while True:
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        dead = [
            n
            for n in graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in used
        ]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {name for n in graph.node for name in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


@dataclass(frozen=True)
class QdqChoice:
    """The measured choice of FP32 MatMuls (cosines: to FP32 on the held-out batches)."""

    keep_fp32: tuple[str, ...]
    method: str
    mean_cosine: float
    min_cosine: float
    target_cosine: float
    reached: bool
    all_quantized_mean_cosine: float
    sensitivity: dict[str, float]  # mean cosine with only that MatMul in FP32
    steps: list[tuple[int, float, float]] = field(default_factory=list)  # (kept, mean, min)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def choose_fp32_matmuls(
    fp32_model: Path,
    calibration: Sequence[Batch],
    held_out: Sequence[Batch],
    target_cosine: float = 0.99,
    method: str = "minmax",
    percentile: float = 99.999,
    sensitivity_rows: int = 128,
    max_fp32: int | None = None,
    cache: Path | None = None,
    per_channel: bool = True,
    signed: bool = True,
) -> QdqChoice:
    """Choose, by measurement, the fewest MatMuls to keep FP32 for ``target_cosine``.

    Calibrates once, quantizes every MatMul, then measures each MatMul's sensitivity (mean cosine to
    FP32 on the first ``sensitivity_rows`` held-out rows when only that MatMul is reverted to
    FP32). MatMuls are kept FP32 in order of sensitivity; the shortest prefix whose mean cosine on
    all ``held_out`` batches reaches the target is found by doubling then bisection (cosine rises
    with the prefix length). If no prefix up to ``max_fp32`` reaches it, the best measured prefix
    is returned with ``reached=False``.
    """
    started = time.monotonic()
    fp32 = onnx.load(str(fp32_model))
    names = matmul_names(fp32)
    max_fp32 = len(names) if max_fp32 is None else min(max_fp32, len(names))
    with tempfile.TemporaryDirectory(prefix="qdq.") as tmp:
        cache = cache or Path(tmp) / "ranges.cache"
        qdq_path = quantize_qdq(
            fp32_model,
            Path(tmp) / "all.onnx",
            calibration if not cache.exists() else None,
            method=method,
            percentile=percentile,
            cache=cache,
            per_channel=per_channel,
            signed=signed,
        )
        qdq = onnx.load(str(qdq_path))
    small = _spread_rows(held_out, sensitivity_rows)
    reference_small = embed(fp32, small)
    reference = embed(fp32, held_out)
    base = cosines(reference, embed(qdq, held_out))
    log.info("all %d MatMuls quantized: mean cosine %.4f", len(names), base.mean())
    # Sensitivities are only measured when some MatMul has to, and may, go back to FP32.
    sensitivity = {
        name: float(
            cosines(reference_small, embed(revert_to_fp32(qdq, fp32, [name]), small)).mean()
        )
        for name in (names if base.mean() < target_cosine and max_fp32 > 0 else [])
    }
    order = sorted(sensitivity, key=lambda n: -sensitivity[n])

    measured: dict[int, tuple[float, float]] = {0: (float(base.mean()), float(base.min()))}

    def measure(k: int) -> float:
        if k not in measured:
            c = cosines(reference, embed(revert_to_fp32(qdq, fp32, order[:k]), held_out))
            measured[k] = (float(c.mean()), float(c.min()))
            log.info("%d MatMuls FP32: mean cosine %.4f (min %.4f)", k, *measured[k])
        return measured[k][0]

    # Doubling, then bisection: low fails the target, high (if any) reaches it.
    low, high = 0, (0 if measured[0][0] >= target_cosine else None)
    k = 1
    while high is None and k <= max_fp32:
        if measure(k) >= target_cosine:
            high = k
        else:
            low = k
            k = max_fp32 if k < max_fp32 < 2 * k else 2 * k
    while high is not None and high - low > 1:
        mid = (low + high) // 2
        if measure(mid) >= target_cosine:
            high = mid
        else:
            low = mid
    chosen = max(measured, key=lambda kk: measured[kk][0]) if high is None else high
    mean, worst = measured[chosen]
    return QdqChoice(
        keep_fp32=tuple(order[:chosen]),
        method=method,
        mean_cosine=mean,
        min_cosine=worst,
        target_cosine=target_cosine,
        reached=mean >= target_cosine,
        all_quantized_mean_cosine=measured[0][0],
        sensitivity=sensitivity,
        steps=[(kk, *measured[kk]) for kk in sorted(measured)],
        seconds=time.monotonic() - started,
    )


def _spread_rows(batches: Sequence[Batch], rows: int) -> list[Batch]:
    """About ``rows`` rows of whole batches spread evenly over ``batches`` (short and long texts)."""
    total = sum(ids.shape[0] for ids, _ in batches)
    if rows >= total:
        return list(batches)
    count = max(1, round(len(batches) * rows / total))
    picks = np.unique(np.linspace(0, len(batches) - 1, count).round().astype(int))
    return [batches[i] for i in picks]


def build_qdq_encoder(
    fp32_model: Path,
    destination: Path,
    calibration: Sequence[Batch],
    held_out: Sequence[Batch],
    target_cosine: float = 0.992,
    method: str = "percentile",
    max_fp32: int | None = None,
    per_channel: bool = True,
    signed: bool = True,
) -> QdqChoice:
    """Choose the FP32 MatMuls (:func:`choose_fp32_matmuls`), write the Q/DQ graph, check it.

    The activation ranges are calibrated once and shared by the search and the written graph.
    ``target_cosine`` is met on ``held_out`` (keep them apart from the texts of the accuracy gate;
    0.992 leaves a margin for the gate's 0.99). Raises ``QdqPlacementError`` if the written graph
    fails :func:`qdq_model_problems`. ``metadata_props`` also get the measured selection.
    """
    with tempfile.TemporaryDirectory(prefix="qdq.") as tmp:
        cache = Path(tmp) / "ranges.cache"
        choice = choose_fp32_matmuls(
            fp32_model,
            calibration,
            held_out,
            target_cosine,
            method,
            max_fp32=max_fp32,
            cache=cache,
            per_channel=per_channel,
            signed=signed,
        )
        quantize_qdq(
            fp32_model,
            destination,
            calibration,
            choice.keep_fp32,
            per_channel=per_channel,
            method=method,
            cache=cache,
            signed=signed,
        )
    model = onnx.load(str(destination))
    selection = {
        "target_cosine": target_cosine,
        "mean_cosine": round(choice.mean_cosine, 5),
        "min_cosine": round(choice.min_cosine, 5),
        "all_quantized_mean_cosine": round(choice.all_quantized_mean_cosine, 5),
        "held_out_rows": int(sum(ids.shape[0] for ids, _ in held_out)),
        "reached": choice.reached,
    }
    set_metadata(model, {METADATA_SELECTION: json.dumps(selection, sort_keys=True)})
    onnx.save(model, str(destination))
    problems = qdq_model_problems(destination, tensorrt=signed)
    if problems:
        raise QdqPlacementError(f"{destination}: " + "; ".join(problems[:10]))
    return choice


class QdqPlacementError(RuntimeError):
    """The Q/DQ graph is not in the form TensorRT's explicit quantization expects."""


# --------------------------------------------------------------------------- checks


def _constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # the checker reports broken models; their types stay unknown here
        inferred = model
    graph = inferred.graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*graph.input, *graph.output, *graph.value_info]
        if v.type.HasField("tensor_type")
    }
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


def _weight_channel_axis(node: onnx.NodeProto, rank: int) -> int:
    """Output-channel axis of the weight (input B) of a MatMul/Gemm."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return rank - 1


@dataclass(frozen=True)
class _GraphView:
    """A graph's constants, element types, and each tensor's producer and readers."""

    values: dict[str, np.ndarray]
    types: dict[str, int]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    outputs: set[str]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _GraphView:
        graph = model.graph
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        return cls(
            _constant_values(model),
            _elem_types(model),
            {out: node for node in graph.node for out in node.output},
            consumers,
            {o.name for o in graph.output},
        )

    def readers(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        return self.consumers.get(node.output[0], [])

    def is_dequantized(self, name: str) -> bool:
        node = self.producer.get(name)
        return node is not None and node.op_type == "DequantizeLinear"


def tensorrt_qdq_problems(
    model: onnx.ModelProto, keep_fp32: Sequence[str] | None = None
) -> list[str]:
    """What in ``model`` departs from TensorRT's explicit-quantization placement (empty: none).

    Checks: every QuantizeLinear feeds only DequantizeLinear; every zero point is int8 and 0;
    activation scales are per-tensor and their DequantizeLinear feeds quantized MatMul/Gemm inputs
    only (not a residual Add, Shape or the like); weight DequantizeLinear nodes read int8 initializers with a
    1-D scale along the weight's output-channel axis; every quantized MatMul/Gemm has
    DequantizeLinear on both inputs; the FP32 MatMuls (``keep_fp32``, by default the list in
    ``metadata_props``) have none; no Q/DQ on int64 (or any non-float) tensors.
    """
    view = _GraphView.of(model)
    if keep_fp32 is None:
        keep_fp32 = json.loads(metadata(model).get(METADATA_FP32, "[]"))
    keep = set(keep_fp32)
    nodes = {n.name: n for n in model.graph.node}
    problems = [
        f"FP32 MatMul {name!r} is not a MatMul/Gemm of the graph"
        for name in sorted(keep)
        if name not in nodes or nodes[name].op_type not in QUANTIZED_OPS
    ]
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            problems += _zero_point_problems(node, view) + _quantize_problems(node, view)
        elif node.op_type == "DequantizeLinear":
            problems += _zero_point_problems(node, view) + _dequantize_problems(node, view)
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS:
            problems += _matmul_problems(node, view, keep)
    return problems


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name!r}"


def _zero_point_problems(node: onnx.NodeProto, view: _GraphView) -> list[str]:
    """A Q/DQ node's zero point: a constant int8 0 (TensorRT's quantization is symmetric)."""
    if len(node.input) < 3 or not node.input[2]:
        return [f"{_label(node)}: no zero point (it defaults to uint8)"]
    zero_point = view.values.get(node.input[2])
    if zero_point is None:
        return [f"{_label(node)}: zero point {node.input[2]!r} is not a constant"]
    problems = []
    if zero_point.dtype != np.int8:
        problems.append(f"{_label(node)}: zero point is {zero_point.dtype}, not int8")
    if np.any(zero_point != 0):
        problems.append(f"{_label(node)}: zero point is not 0 (asymmetric)")
    return problems


def _quantize_problems(node: onnx.NodeProto, view: _GraphView) -> list[str]:
    """A QuantizeLinear quantizes a float tensor per tensor, read by DequantizeLinear only."""
    label, problems = _label(node), []
    source_type = view.types.get(node.input[0])
    if source_type is not None and source_type not in _FLOAT_TYPES:
        kind = TensorProto.DataType.Name(source_type).lower()
        problems.append(f"{label}: quantizes {kind} tensor {node.input[0]!r}")
    readers = view.readers(node)
    if not readers or node.output[0] in view.outputs:
        problems.append(f"{label}: output is not read by a DequantizeLinear")
    problems += [
        f"{label}: feeds {reader.op_type} {reader.name!r}, not DequantizeLinear"
        for reader in readers
        if reader.op_type != "DequantizeLinear"
    ]
    scale = view.values.get(node.input[1])
    if scale is not None and scale.size != 1:
        problems.append(f"{label}: activation scale is not per-tensor")
    return problems


def _dequantize_problems(node: onnx.NodeProto, view: _GraphView) -> list[str]:
    """An activation's DequantizeLinear (after a QuantizeLinear) is per tensor and feeds quantized
    MatMul/Gemm only; a weight's reads int8 with its scale along the output channels."""
    label, problems = _label(node), []
    source = node.input[0]
    scale = view.values.get(node.input[1])
    weight = view.values.get(source)
    if weight is None:
        upstream = view.producer.get(source)
        if upstream is None or upstream.op_type != "QuantizeLinear":
            problems.append(f"{label}: input {source!r} comes from no QuantizeLinear")
        if scale is not None and scale.size != 1:
            problems.append(f"{label}: activation scale is not per-tensor")
        return problems + [
            f"{label}: read by {reader.op_type} {reader.name!r}; INT8 activations "
            "belong on the quantized MatMul inputs only"
            for reader in view.readers(node)
            if reader.op_type not in QUANTIZED_OPS
        ]
    if weight.dtype != np.int8:
        problems.append(f"{label}: weight {source!r} is {weight.dtype}, not int8")
    for reader in view.readers(node):
        if reader.op_type not in QUANTIZED_OPS or reader.input[1] != node.output[0]:
            continue
        axis = _weight_channel_axis(reader, weight.ndim)
        attr_axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        attr_axis = attr_axis + weight.ndim if attr_axis < 0 else attr_axis
        if scale is None or scale.ndim != 1 or scale.size == 1:
            problems.append(f"{label}: weight scale of {reader.name!r} is not per-channel")
        elif scale.size != weight.shape[axis] or attr_axis != axis:
            problems.append(
                f"{label}: weight scale of {reader.name!r} is along axis {attr_axis} "
                f"({scale.size} values), not the output-channel axis {axis} "
                f"({weight.shape[axis]} channels)"
            )
    return problems


def _matmul_problems(node: onnx.NodeProto, view: _GraphView, keep: set[str]) -> list[str]:
    """A quantized MatMul/Gemm reads DequantizeLinear on both inputs; an FP32 one on neither."""
    operands = list(node.input[:2])
    dequantized = [view.is_dequantized(name) for name in operands]
    if node.name in keep:
        if any(dequantized):
            return [f"{_label(node)} is listed FP32 but reads DequantizeLinear output"]
    elif not all(dequantized):
        missing = [name for name, dq in zip(operands, dequantized, strict=True) if not dq]
        return [f"{_label(node)}: no DequantizeLinear on input(s) {missing}"]
    return []


def saturating_weights(model: onnx.ModelProto) -> list[str]:
    """The INT8 weights of ``model`` (initializers a DequantizeLinear reads) with values beyond
    :data:`EXACT_WEIGHT_BITS` bits, whose products x86 without VNNI may add with saturation."""
    limit = 2 ** (EXACT_WEIGHT_BITS - 1)
    values = {i.name: i for i in model.graph.initializer if i.data_type == TensorProto.INT8}
    read = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return sorted(
        name
        for name in read & set(values)
        if np.abs(numpy_helper.to_array(values[name]).astype(np.int16)).max() > limit
    )


def qdq_model_problems(path: Path, tensorrt: bool = True) -> list[str]:
    """``onnx.checker`` (full check), and :func:`tensorrt_qdq_problems` of a graph meant for
    TensorRT, or :func:`saturating_weights` of one meant for ONNX Runtime on CPU."""
    problems: list[str] = []
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        problems.append(f"onnx.checker: {str(error).strip().splitlines()[0]}")
    model = onnx.load(str(path))
    if tensorrt:
        return problems + tensorrt_qdq_problems(model)
    return problems + [
        f"weight {name} uses more than {EXACT_WEIGHT_BITS} bits: x86 without VNNI may saturate "
        "its sums of products"
        for name in saturating_weights(model)
    ]
