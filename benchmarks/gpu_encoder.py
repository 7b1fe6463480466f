"""The GPU target's encoder graphs on a CUDA GPU, without TensorRT: numerics and a speed lead.

A store built with ``--target gpu`` ships ``encoder/1/model_qdq.onnx`` (signed INT8 Q/DQ, for
TensorRT's INT8 mode) and ``model_fp32.onnx`` (for its FP16 mode). Where TensorRT is at hand,
``trtexec`` (``export/gpu.py``) is the check. Where only PyTorch is, this script runs both graphs
node by node on the GPU:

- ``int8``: the Q/DQ graph, each MatMul between a quantized activation and an INT8 weight as a real
  INT8 GEMM on the tensor cores (``torch._int_mm``, INT32 accumulation, then the two scales); the
  attention MatMuls between two quantized activations multiply their INT8 values exactly in FP32
  (every sum is below 2**24); every other node as the graph says;
- ``fp16``: the FP32 graph with its weights and activations in FP16 (constants clamped to FP16's
  range, as TensorRT does);
- ``fp32``: the FP32 graph in FP32 with TF32 off, which checks this interpreter itself.

Each is compared, text by text, with ONNX Runtime on CPU: the FP32 graph (the reference) and the
Q/DQ graph (the build's accuracy gate ran on those numbers). Two steps, because the GPU machine
need not have shopserve installed::

    # where the store and shopserve are: tokenize and embed with ONNX Runtime on CPU
    python benchmarks/gpu_encoder.py reference --repository STORE --texts texts.txt --out ref.npz
    # where the GPU is (needs numpy, onnx and torch only)
    python benchmarks/gpu_encoder.py run --repository STORE --reference ref.npz --out gpu.json

The speed it reports is PyTorch eager (one kernel launch per ONNX node), a lower bound on what an
engine built by TensorRT does with the same graph.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ENCODER = Path("encoder") / "1"
QDQ_FILE = "model_qdq.onnx"
FP32_FILE = "model_fp32.onnx"
BATCH = 256  # texts per encoder call, sorted by length so each batch pads little
MODES = ("fp32", "fp16", "int8")  # the graph each runs: FP32, FP32, Q/DQ
FP16_MAX = 65504.0
TIMED_SECONDS = 2.0  # timed passes over the texts repeat until this much has passed
EXACT_FP32_SUM = 2**24  # integers up to this add exactly in FP32


# --------------------------------------------------------------------------- reference (CPU)


def reference(repository: Path, texts: Sequence[str], out: Path, qdq: Path, fp32: Path) -> None:
    """Tokenize ``texts`` with the store's tokenizer and embed them with ONNX Runtime on CPU."""
    from shopserve.ensemble.tokenize import QueryTokenizer, WordPiece
    from shopserve.export import qdq as qdq_module

    tokenizer = QueryTokenizer(WordPiece.load(repository / "tokenize" / "1"))
    batches = qdq_module.calibration_batches(tokenizer, list(texts), batch_size=BATCH)
    arrays: dict[str, np.ndarray] = {}
    seconds = {}
    for name, graph in (("fp32", fp32), ("qdq", qdq)):
        started = time.perf_counter()
        arrays[f"{name}_cpu"] = qdq_module.embed(graph, batches)
        seconds[name] = time.perf_counter() - started
    for i, (ids, mask) in enumerate(batches):
        arrays[f"ids_{i}"], arrays[f"mask_{i}"] = ids, mask
    arrays["cpu_seconds"] = np.array([seconds["fp32"], seconds["qdq"]])
    np.savez_compressed(out, **arrays)
    print(
        f"{len(texts)} texts in {len(batches)} batches; ONNX Runtime on CPU: "
        f"FP32 {seconds['fp32']:.1f} s, Q/DQ {seconds['qdq']:.1f} s -> {out}"
    )


# --------------------------------------------------------------------------- the interpreter


class GraphRunner:
    """An ONNX encoder graph run node by node with PyTorch (the ops a BERT export uses)."""

    def __init__(self, model: onnx.ModelProto, device: str, dtype, int8_gemm: bool) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.dtype = dtype  # what ONNX's FLOAT runs as
        self.int8_gemm = int8_gemm
        self.graph = model.graph
        self.producer = {out: node for node in self.graph.node for out in node.output}
        last_use = {n: i for i, node in enumerate(self.graph.node) for n in self._reads(node)}
        self.freed = [[] for _ in self.graph.node]  # values no node reads after node i
        for name, i in last_use.items():
            if name not in self.producer or self.producer[name].op_type != "Constant":
                self.freed[i].append(name)
        self.constants = {
            i.name: self._tensor(numpy_helper.to_array(i)) for i in model.graph.initializer
        }
        for node in self.graph.node:
            if node.op_type == "Constant":
                (attribute,) = node.attribute
                self.constants[node.output[0]] = self._tensor(numpy_helper.to_array(attribute.t))
        self._values: dict = {}
        self.int8_matmuls = 0  # MatMuls run as INT8 GEMMs in the last call
        self.exact_matmuls = 0  # quantized x quantized MatMuls, INT8 values multiplied exactly

    def _tensor(self, array: np.ndarray):
        tensor = self.torch.from_numpy(np.array(array)).to(self.device)
        if tensor.dtype == self.torch.float32 and self.dtype != self.torch.float32:
            tensor = tensor.clamp(-FP16_MAX, FP16_MAX).to(self.dtype)
        return tensor

    def _reads(self, node: onnx.NodeProto) -> list[str]:
        """The values ``node`` reads: a MatMul also reads the INT8 values behind its inputs."""
        names = [name for name in node.input if name]
        if node.op_type == "MatMul":
            behind = [self.producer.get(name) for name in names]
            names += [
                p.input[0] for p in behind if p is not None and p.op_type == "DequantizeLinear"
            ]
        return names

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The encoder's EMBEDDING rows for a batch of token ids and their attention mask."""
        (embedding,) = self.run({"INPUT_IDS": ids, "ATTENTION_MASK": mask}, ["EMBEDDING"])
        return embedding

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """The graph's ``outputs`` for the input arrays ``feeds``, as float32 or integer arrays."""
        torch = self.torch
        values = dict(self.constants)
        for name, array in feeds.items():
            tensor = torch.from_numpy(array).to(self.device)
            values[name] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        self.int8_matmuls = self.exact_matmuls = 0
        self._values = values  # the MatMul fast paths read the INT8 values behind a Q/DQ pair
        with torch.no_grad():
            for node, freed in zip(self.graph.node, self.freed, strict=True):
                if node.op_type == "Constant":
                    continue
                inputs = [values[name] if name else None for name in node.input]
                for name, value in zip(node.output, self._run(node, inputs), strict=False):
                    values[name] = value
                for name in freed:
                    if name not in self.constants and name not in outputs:
                        del values[name]
        results = [values[name] for name in outputs]
        return [
            r.float().cpu().numpy() if r.is_floating_point() else r.cpu().numpy() for r in results
        ]

    def _run(self, node: onnx.NodeProto, inputs: list) -> list:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMul":
            return [self._matmul(node, *inputs)]
        op = _OPS.get(node.op_type)
        if op is None:
            raise NotImplementedError(f"{node.op_type} ({node.name}) is not interpreted")
        result = op(self, inputs, attributes)
        return result if isinstance(result, list) else [result]

    def _quantized(self, name: str):
        """(int8 values, scale) where ``name`` is DequantizeLinear of an INT8 tensor with zero point
        0 (per-tensor, or per-column of a 2-D weight); else None."""
        node = self.producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
            return None
        zero = self.constants.get(node.input[2])
        if zero is None or zero.dtype != self.torch.int8 or bool(zero.any()):
            return None
        return node.input[0], self.constants[node.input[1]]

    def _matmul(self, node: onnx.NodeProto, a, b):
        torch = self.torch
        left, right = self._quantized(node.input[0]), self._quantized(node.input[1])
        if not (self.int8_gemm and left and right):
            return torch.matmul(a, b)
        (left_name, left_scale), (right_name, right_scale) = left, right
        if right_name in self.constants and left_scale.numel() == 1:
            return self._int8_gemm(node, left_name, left_scale, right_name, right_scale)
        # activation x activation (attention): exact products of the INT8 values in FP32
        qa, qb = self._values[left_name], self._values[right_name]
        if 127 * 128 * qa.shape[-1] >= EXACT_FP32_SUM:
            raise ValueError(
                f"{node.name}: sums of {qa.shape[-1]} INT8 products are not exact in FP32"
            )
        self.exact_matmuls += 1
        return torch.matmul(qa.float(), qb.float()) * (left_scale * right_scale)

    def _int_mm(self, rows, weight):
        """INT8 x INT8 -> INT32; some cuBLASLt builds want the weight column-major."""
        try:
            return self.torch._int_mm(rows, weight.contiguous())
        except RuntimeError:
            return self.torch._int_mm(rows, weight.t().contiguous().t())

    def _int8_gemm(self, node, left_name: str, left_scale, right_name: str, right_scale):
        torch = self.torch
        qa, qw = self._values[left_name], self.constants[right_name]
        rows = qa.reshape(-1, qa.shape[-1])
        padding = max(0, 17 - rows.shape[0])  # cuBLASLt's INT8 GEMM wants more than 16 rows
        if padding:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, padding))
        product = self._int_mm(rows.contiguous(), qw)[: rows.shape[0] - padding]
        self.int8_matmuls += 1
        scaled = product.float() * (left_scale.float() * right_scale.float())
        return scaled.reshape(*qa.shape[:-1], qw.shape[-1])


def _dtype(runner: GraphRunner, to: int):
    mapping = {
        onnx.TensorProto.FLOAT: runner.dtype,
        onnx.TensorProto.INT64: runner.torch.int64,
        onnx.TensorProto.INT32: runner.torch.int32,
        onnx.TensorProto.BOOL: runner.torch.bool,
        onnx.TensorProto.INT8: runner.torch.int8,
        onnx.TensorProto.FLOAT16: runner.torch.float16,
    }
    return mapping[to]


def _axes(value, rank: int) -> list[int]:
    return sorted(int(a) % rank for a in value)


def _unsqueeze(r, inputs, _a):
    data, axes = inputs
    rank = data.dim() + axes.numel()
    for axis in _axes(axes.tolist(), rank):
        data = data.unsqueeze(axis)
    return data


def _div(r, inputs, _a):
    a, b = inputs
    if a.dtype.is_floating_point:
        return a / b
    return r.torch.div(a, b, rounding_mode="trunc")


def _gather(r, inputs, a):
    data, indices = inputs
    axis = a.get("axis", 0) % data.dim()
    flat = indices.reshape(-1) % data.shape[axis]
    picked = data.index_select(axis, flat)
    return picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))


def _reshape(r, inputs, _a):
    data, shape = inputs
    target = [data.shape[i] if s == 0 else s for i, s in enumerate(shape.tolist())]
    return data.reshape(target)


def _slice(r, inputs, _a):
    data, starts, ends = inputs[:3]
    axes = inputs[3].tolist() if len(inputs) > 3 and inputs[3] is not None else range(len(starts))
    steps = inputs[4].tolist() if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.dim()
    for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes, steps, strict=True):
        size = data.shape[axis]
        index[axis] = slice(max(-size, min(start, size)), max(-size, min(end, size)), step)
    return data[tuple(index)]


def _quantize(r, inputs, a):
    x, scale, zero = inputs
    axis = a.get("axis", 1)
    if scale.numel() > 1:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    q = r.torch.round(x.float() / scale.float()) + zero.float()
    info = r.torch.iinfo(zero.dtype)  # int8 (TensorRT's) or uint8
    return q.clamp(info.min, info.max).to(zero.dtype)


def _dequantize(r, inputs, a):
    q, scale, zero = inputs
    if scale.numel() > 1:
        shape = [1] * q.dim()
        shape[a.get("axis", 1) % q.dim()] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q.float() - zero.float()) * scale.float()).to(r.dtype)


def _layer_norm(r, inputs, a):
    x, scale, bias = inputs
    axis = a.get("axis", -1) % x.dim()
    shape = x.shape[axis:]
    return r.torch.nn.functional.layer_norm(x, shape, scale, bias, a.get("epsilon", 1e-5))


def _constant_of_shape(r, inputs, a):
    value = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
    fill = r._tensor(value)
    return r.torch.full(inputs[0].tolist(), fill.item(), dtype=fill.dtype, device=r.device)


def _reduce(function: str):
    def run(r, inputs, a):
        data = inputs[0]
        axes = a.get("axes")
        if axes is None and len(inputs) > 1 and inputs[1] is not None:
            axes = inputs[1].tolist()
        axes = _axes(axes, data.dim()) if axes else list(range(data.dim()))
        keep = bool(a.get("keepdims", 1))
        if function == "l2":
            return data.float().pow(2).sum(dim=axes, keepdim=keep).sqrt().to(data.dtype)
        return getattr(data, function)(dim=axes, keepdim=keep)

    return run


def _clip(r, inputs, _a):
    x = inputs[0]
    low = inputs[1] if len(inputs) > 1 else None
    high = inputs[2] if len(inputs) > 2 else None
    return x.clamp(min=low, max=high)


_OPS: dict[str, Callable] = {
    "Identity": lambda r, i, a: i[0],
    "Add": lambda r, i, a: i[0] + i[1],
    "Sub": lambda r, i, a: i[0] - i[1],
    "Mul": lambda r, i, a: i[0] * i[1],
    "Div": _div,
    "Pow": lambda r, i, a: i[0].pow(i[1]),
    "Sqrt": lambda r, i, a: i[0].sqrt(),
    "Erf": lambda r, i, a: r.torch.erf(i[0]),
    "Tanh": lambda r, i, a: r.torch.tanh(i[0]),
    "Softmax": lambda r, i, a: r.torch.softmax(i[0], dim=a.get("axis", -1)),
    "Transpose": lambda r, i, a: i[0].permute(*a["perm"]),
    "Concat": lambda r, i, a: r.torch.cat(i, dim=a["axis"]),
    "Shape": lambda r, i, a: r.torch.tensor(list(i[0].shape), dtype=r.torch.int64, device=r.device),
    "Cast": lambda r, i, a: i[0].to(_dtype(r, a["to"])),
    "Where": lambda r, i, a: r.torch.where(i[0], i[1], i[2]),
    "IsNaN": lambda r, i, a: r.torch.isnan(i[0]),
    "And": lambda r, i, a: r.torch.logical_and(i[0], i[1]),
    "Equal": lambda r, i, a: i[0] == i[1],
    "GreaterOrEqual": lambda r, i, a: i[0] >= i[1],
    "Expand": lambda r, i, a: i[0].expand(
        r.torch.broadcast_shapes(i[0].shape, tuple(i[1].tolist()))
    ),
    "Flatten": lambda r, i, a: i[0].reshape(int(np.prod(i[0].shape[: a.get("axis", 1)])), -1),
    "Range": lambda r, i, a: r.torch.arange(i[0].item(), i[1].item(), i[2].item(), device=r.device),
    "Unsqueeze": _unsqueeze,
    "Gather": _gather,
    "Reshape": _reshape,
    "Slice": _slice,
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "LayerNormalization": _layer_norm,
    "ConstantOfShape": _constant_of_shape,
    "ReduceSum": _reduce("sum"),
    "ReduceMean": _reduce("mean"),
    "ReduceL2": _reduce("l2"),
    "Clip": _clip,
}


# --------------------------------------------------------------------------- run (GPU)


def _batches(saved) -> list[tuple[np.ndarray, np.ndarray]]:
    count = sum(1 for key in saved.files if key.startswith("ids_"))
    return [(saved[f"ids_{i}"], saved[f"mask_{i}"]) for i in range(count)]


def _cosines(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    dot = (reference * other).sum(axis=1)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1)
    cosine = dot / np.maximum(norms, 1e-12)
    return {"mean": float(cosine.mean()), "min": float(cosine.min())}


def run_mode(mode: str, graph: onnx.ModelProto, batches, device: str) -> tuple[np.ndarray, dict]:
    """Embed every batch once (kept), then again in timed passes; the embeddings and the timing."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.float16 if mode == "fp16" else torch.float32
    runner = GraphRunner(graph, device, dtype, int8_gemm=mode == "int8")
    rows = np.concatenate([runner(ids, mask) for ids, mask in batches])
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    synchronize()
    passes, started = 0, time.perf_counter()
    while passes == 0 or time.perf_counter() - started < TIMED_SECONDS:
        for ids, mask in batches:
            runner(ids, mask)
        synchronize()
        passes += 1
    seconds = time.perf_counter() - started
    timing = {
        "timed_passes": passes,
        "seconds": round(seconds, 4),
        "texts_per_s": round(passes * len(rows) / seconds, 1),
        "int8_gemm_matmuls": runner.int8_matmuls,
        "exact_int8_value_matmuls": runner.exact_matmuls,
    }
    return rows, timing


def run(
    repository: Path, reference_file: Path, out: Path, modes: Sequence[str], device: str
) -> dict:
    import torch

    saved = np.load(reference_file)
    batches = _batches(saved)
    fp32_cpu, qdq_cpu = saved["fp32_cpu"], saved["qdq_cpu"]
    graphs = {"fp32": FP32_FILE, "fp16": FP32_FILE, "int8": QDQ_FILE}
    report = {
        "device": torch.cuda.get_device_name(0)
        if device.startswith("cuda")
        else f"{device} ({platform.machine()})",
        "torch": torch.__version__,
        "texts": len(fp32_cpu),
        "batch": BATCH,
        "onnxruntime_cpu": {
            "qdq_vs_fp32_cosine": _cosines(fp32_cpu, qdq_cpu),
            "fp32_seconds": float(saved["cpu_seconds"][0]),
            "qdq_seconds": float(saved["cpu_seconds"][1]),
        },
        "modes": {},
    }
    for mode in modes:
        graph = onnx.load(repository / ENCODER / graphs[mode])
        rows, timing = run_mode(mode, graph, batches, device)
        entry = {"vs_fp32_cpu": _cosines(fp32_cpu, rows), **timing}
        if mode == "int8":
            entry["vs_qdq_cpu"] = _cosines(qdq_cpu, rows)
        report["modes"][mode] = entry
        print(mode, json.dumps(entry), flush=True)
        out.write_text(json.dumps(report, indent=1) + "\n")  # after each mode: kept if one fails
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    steps = parser.add_subparsers(dest="step", required=True)
    ref = steps.add_parser("reference", help="tokenize and embed with ONNX Runtime on CPU")
    ref.add_argument(
        "--repository", type=Path, required=True, help="a store built with --target gpu"
    )
    ref.add_argument("--texts", type=Path, required=True, help="one text per line")
    ref.add_argument("--out", type=Path, required=True)
    gpu = steps.add_parser("run", help="the graphs through PyTorch on the GPU, compared")
    gpu.add_argument("--repository", type=Path, required=True)
    gpu.add_argument("--reference", type=Path, required=True, help="what `reference` wrote")
    gpu.add_argument("--out", type=Path, required=True)
    gpu.add_argument("--modes", default=",".join(MODES))
    gpu.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.step == "reference":
        texts = [
            line for line in args.texts.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        if not texts:
            parser.error(f"{args.texts} holds no text")
        encoder = args.repository / ENCODER
        reference(args.repository, texts, args.out, encoder / QDQ_FILE, encoder / FP32_FILE)
    else:
        modes = [m for m in args.modes.split(",") if m]
        unknown = set(modes) - set(MODES)
        if unknown:
            parser.error(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
        run(args.repository, args.reference, args.out, modes, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
