"""The graph's two ONNX models as ONNX Runtime sessions: the text encoder and the ranker."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm.auto import tqdm

from .store import model_digest
from .tokenize import QueryTokenizer

log = logging.getLogger("shopserve.models")

# Set by shopserve serve for its model processes: where each model's copy optimised for this
# machine, with its pre-packed weights, is kept (see prepacked_model).
PREPACKED_DIR_ENV = "SHOPSERVE_PREPACKED_DIR"
PREPACKED_FILE = "model.onnx"
RANKER_METADATA_KEY = "shopserve.ranker"  # a ranker's feature contract in its ONNX metadata
# An INT8 graph's form, in its ONNX metadata (export/qdq.py writes it). TensorRT's form runs on CPU
# as written (DequantizeLinear, then a float MatMul): ONNX Runtime fuses Q/DQ pairs into INT8
# kernels that, on x86 without VNNI, saturate 16-bit sums of products where the weights use the
# whole INT8 range. TensorRT's INT8 GEMMs sum in INT32 and do not (benchmarks/gpu_encoder.py).
QDQ_FORMAT_KEY = "shopserve.qdq.format"
TENSORRT_QDQ_FORMAT = "QDQ QInt8 symmetric activations; QInt8 symmetric weights"


# How a CPU's ONNX Runtime kernels add the INT8 encoder's products. x86 without VNNI (AVX2, and
# AVX-512 without VNNI) multiplies UINT8 by INT8 with vpmaddubsw, which adds pairs of products in 16
# bits and saturates; with VNNI or AMX, and on Arm, products are summed in 32 bits. A graph with
# 8-bit weights therefore embeds a text differently on the two kinds: mean cosine 0.9918 on 1,650
# Home Depot texts (the full store's encoder, 2026-12-04) between an AVX2 machine's fused kernels
# and the same graph run unfused, which sums in 32 bits as VNNI does; as much as the INT8 error.
INT32_SUMS, INT16_PAIR_SUMS, UNKNOWN_SUMS = "int32", "int16 pairs", "unknown"
_INT32_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Weights of at most this many bits cannot saturate those 16-bit pairs: a weight in [-64, 64] times
# an activation in [0, 255], twice, is at most 32,640 (below 32,767). A CPU store's INT8 encoder
# has 7-bit weights since 2026-12-05, and so embeds alike on both kinds; its manifest says so
# (``encoder.int8.weight_bits``), and stores built before, with 8-bit weights, do not.
EXACT_WEIGHT_BITS = 7


def int8_weight_bits(int8: Mapping) -> int:
    """The weight bits of a manifest's INT8 encoder record (``encoder.int8``); builds from
    before the record said had 8."""
    return int(int8.get("weight_bits", 8))


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo's text, read once a process ("" where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def int8_sums(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """How this machine adds INT8 products (``cpuinfo``: /proc/cpuinfo's text, ``machine``:
    platform.machine(), both read here when None)."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return INT32_SUMS
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return INT32_SUMS if any(f in flags for f in _INT32_DOT_FLAGS) else INT16_PAIR_SUMS
    return UNKNOWN_SUMS


def int8_sums_mismatch(manifest: Mapping, here: str) -> str | None:
    """Why a build's INT8 encoder answers queries on this machine (whose sums are ``here``)
    otherwise than it embedded the catalogue, or None. Builds that do not record it, FP32 and GPU
    encoders, INT8 encoders whose weights cannot saturate, and machines of unknown kind are not
    judged."""
    encoder = manifest.get("encoder", {})
    built = manifest.get("catalogue_embeddings", {}).get("int8_sums")
    if encoder.get("target") != "cpu" or "int8" not in encoder:
        return None
    if int8_weight_bits(encoder["int8"]) <= EXACT_WEIGHT_BITS:
        return None
    if built in (None, UNKNOWN_SUMS) or here == UNKNOWN_SUMS or built == here:
        return None
    return (
        f"the catalogue was embedded on a CPU that adds INT8 products in {built}, and this one "
        f"adds them in {here}: the INT8 encoder embeds queries here otherwise than it embedded "
        "the titles (mean cosine about 0.992 between the two kinds), which costs search quality. "
        "Rebuild the store on this kind of machine (docs/serving.md#int8-and-the-cpu)"
    )


def _session_options(
    threads: int, as_written: bool = False, quiet: bool = False
) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle threads must sleep, not spin: on 2 cores a spinning pool starves the other steps.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if as_written:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if quiet:
        options.log_severity_level = 3
    return options


def _session(model: Path | str | bytes, options: ort.SessionOptions) -> ort.InferenceSession:
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def runs_as_written(metadata: Mapping[str, str]) -> bool:
    """Whether a graph with this ONNX metadata is TensorRT's INT8 form."""
    return metadata.get(QDQ_FORMAT_KEY) == TENSORRT_QDQ_FORMAT


def cpu_session(
    model: Path | str | bytes,
    threads: int = 1,
    quiet: bool = False,
    as_written: bool | None = None,
) -> ort.InferenceSession:
    """A CPU session over a model file or its bytes; TensorRT's INT8 form runs as written.
    ``as_written`` None: read from the graph's metadata (a second session where it says so)."""
    if as_written is None:
        session = _session(model, _session_options(threads, quiet=quiet))
        if not runs_as_written(session.get_modelmeta().custom_metadata_map):
            return session
        as_written = True
    return _session(model, _session_options(threads, as_written, quiet))


def ort_session(model_path: Path | str, threads: int = 1) -> ort.InferenceSession:
    """A CPU session; in a server's model process (``PREPACKED_DIR_ENV`` set), over the model's
    pre-packed copy, so that the processes that run one model share its packed weights."""
    prepacked_dir = os.environ.get(PREPACKED_DIR_ENV)
    if prepacked_dir:
        return _session(
            prepacked_model(Path(model_path), Path(prepacked_dir)), _session_options(threads)
        )
    return cpu_session(model_path, threads)


def prepacked_model(model_path: Path, directory: Path) -> Path:
    """``model_path`` optimised for this machine, with the weights its kernels pre-pack saved
    beside it (ONNX Runtime's ``session.save_external_prepacked_constant_initializers``).

    A session over the copy maps the packed weights from the file instead of packing them on its
    heap: for the INT8 encoder, 13 MiB that every search instance held on its own. The copy is
    made once per model, machine and ONNX Runtime (the optimised graph may use this CPU's
    instructions), under a lock, and checked to answer exactly as the model does.
    """
    identity = f"{model_digest(model_path)} {ort.__version__} {_cpu_flags()}"
    key = f"{model_path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    copy = directory / key / PREPACKED_FILE
    if copy.exists():
        return copy
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not copy.exists():
            staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=directory))
            try:
                _save_prepacked(model_path, staging / PREPACKED_FILE)
                staging.chmod(0o755)
                staging.rename(copy.parent)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            log.info("%s: pre-packed for this machine in %s", model_path, copy.parent)
    return copy


def _save_prepacked(model_path: Path, destination: Path) -> None:
    options = _session_options(1)
    options.log_severity_level = (
        3  # not the warning that the copy suits only this machine: it is kept per machine
    )
    options.optimized_model_filepath = str(destination)
    for key, value in (
        ("session.optimized_model_external_initializers_file_name", destination.name + ".data"),
        ("session.optimized_model_external_initializers_min_size_in_bytes", "1024"),
        ("session.save_external_prepacked_constant_initializers", "1"),
    ):
        options.add_session_config_entry(key, value)
    original = _session(model_path, options)
    copy = _session(destination, _session_options(1))
    probe = _probe_inputs(original)
    expected, answered = original.run(None, probe), copy.run(None, probe)
    if not all(np.array_equal(a, b) for a, b in zip(expected, answered, strict=True)):
        raise RuntimeError(f"{model_path}: its pre-packed copy answers differently")


def _probe_inputs(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Ones of each input's type, every dimension the graph leaves open set to 4."""
    dtypes = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}
    return {
        i.name: np.ones([d if isinstance(d, int) else 4 for d in i.shape], dtypes[i.type])
        for i in session.get_inputs()
    }


def _cpu_flags() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return line
    return ""


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

    @property
    def contract(self) -> dict | None:
        """The feature contract the export recorded in the model (its inputs, and for a learned
        ranker each feature's training range); None for a model without one."""
        text = self.session.get_modelmeta().custom_metadata_map.get(RANKER_METADATA_KEY)
        return None if text is None else json.loads(text)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        (scores,) = self.session.run(["SCORES"], {"FEATURES": features})
        return scores.reshape(-1)


NETWORK_TENSORS = ("columns", "low", "high", "starts", "widths", "slopes", "w1", "b1", "w2")


class CalibratedNetwork:
    """A monotone ranker's function in NumPy, from the tensors its contract records (the export
    writes them: shopserve.export.monotone): ``score = sum(c) + tanh(c @ w1 + b1) @ w2``, where
    ``c`` is each read column clipped to its training range and put through its piecewise-linear
    calibrator. The explainer splits a logit along that sum: each calibrated column's own part,
    and the small interaction network's."""

    def __init__(self, tensors: dict) -> None:
        missing = [name for name in NETWORK_TENSORS if name not in tensors]
        if missing:
            raise ValueError(f"a calibrated network needs the tensors {missing}")
        self.columns = np.asarray(tensors["columns"], dtype=np.int64)
        self.low, self.high, self.starts, self.widths, self.slopes, self.w1, self.b1, self.w2 = (
            np.asarray(tensors[name], dtype=np.float64) for name in NETWORK_TENSORS[1:]
        )

    @classmethod
    def of(cls, ranker: OnnxRanker, check: np.ndarray) -> CalibratedNetwork | None:
        """The network a ranker's contract records, checked to score ``check`` (feature rows) as
        the ranker does; None for a ranker whose contract records none (another form, or a build
        from before the contract carried it)."""
        tensors = (ranker.contract or {}).get("network")
        if tensors is None:
            return None
        network = cls(tensors)
        check = np.asarray(check, dtype=np.float32)
        gap = float(np.abs(network(check) - ranker(check)).max())
        if gap > 1e-4:
            raise ValueError(f"the ranker's recorded network scores {gap:.1e} off its graph")
        return network

    def calibrate(self, features: np.ndarray) -> np.ndarray:
        """The calibrated columns ``c`` of feature rows, float64 [rows, read columns]."""
        x = np.clip(np.asarray(features, dtype=np.float64)[:, self.columns], self.low, self.high)
        segments = np.clip((x[..., None] - self.starts) / self.widths, 0.0, 1.0)
        return (segments * self.slopes).sum(-1)

    def interaction(self, calibrated: np.ndarray) -> np.ndarray:
        return np.tanh(calibrated @ self.w1 + self.b1) @ self.w2

    def __call__(self, features: np.ndarray) -> np.ndarray:
        calibrated = self.calibrate(features)
        return calibrated.sum(-1) + self.interaction(calibrated)
