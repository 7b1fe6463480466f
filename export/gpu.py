"""Triton model configs for the GPU path, and the ``trtexec`` line for a prebuilt TensorRT engine.

Every rendered ``config.pbtxt`` is parsed with Triton's own model-config schema
(``tritonclient.grpc.model_config_pb2``) and checked before it is returned or written, so a build
never ships a config the server would refuse.

The GPU encoder batches (``max_batch_size`` > 0, ``dynamic_batching``): the static Q/DQ INT8 graph
(export/qdq.py) and the FP32 graph are batch-invariant. Triton's dynamic batcher only joins requests of the same shape
(``[1, tokens]``), so queries of equal token count batch together; the rest run alone.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from shopserve.ensemble import store

EMBEDDING_DIM = 384
MAX_TOKENS = 256  # the tokenizer's truncation length (ensemble/tokenize.py)
PRECISIONS = ("INT8", "FP16")  # INT8: the Q/DQ graph; FP16: the FP32 graph
ENCODER_INPUTS = ("INPUT_IDS", "ATTENTION_MASK")
DEFAULT_MAX_BATCH = 64
DEFAULT_WORKSPACE_BYTES = 2 << 30
# Model files in encoder/1/ by precision (model_int8.onnx is the CPU store's UINT8 Q/DQ graph).
MODEL_FILES = {"INT8": "model_qdq.onnx", "FP16": "model_fp32.onnx"}


# The one-model "search" endpoint runs its steps in its Python process with ONNX Runtime on CPU; it
# loads the FP32 graph named here, not the engine's input (shopserve.ensemble.store.in_process_model_file).
IN_PROCESS_PARAMETER = (
    "# The one-model search endpoint runs its steps in-process on CPU: the FP32 graph.\n"
    'parameters { key: "in_process_model_filename" value: { string_value: "model_fp32.onnx" } }\n'
)


class GpuConfigError(ValueError):
    """A rendered config does not parse with Triton's schema or lacks what the GPU path needs."""


def parse_config(text: str):
    """Parse ``config.pbtxt`` text with Triton's ModelConfig schema; GpuConfigError if it fails."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise GpuConfigError(
            f"config.pbtxt does not parse as a Triton ModelConfig: {error}"
        ) from None
    return config


def _shape_spec(batch: int, tokens: int) -> str:
    return ",".join(f"{name}:{batch}x{tokens}" for name in ENCODER_INPUTS)


def _encoder_io() -> str:
    return (
        "input [\n"
        '  { name: "INPUT_IDS" data_type: TYPE_INT64 dims: [ -1 ] },\n'
        '  { name: "ATTENTION_MASK" data_type: TYPE_INT64 dims: [ -1 ] }\n'
        "]\n"
        f'output [ {{ name: "EMBEDDING" data_type: TYPE_FP32 dims: [ {EMBEDDING_DIM} ] }} ]\n'
    )


def _batching(max_batch_size: int, preferred: Sequence[int], delay_us: int) -> str:
    sizes = ", ".join(str(s) for s in preferred if s <= max_batch_size)
    return (
        "dynamic_batching {\n"
        + (f"  preferred_batch_size: [ {sizes} ]\n" if sizes else "")
        + f"  max_queue_delay_microseconds: {delay_us}\n"
        "}\n"
    )


def encoder_config(
    precision: str = "INT8",
    max_batch_size: int = DEFAULT_MAX_BATCH,
    instances: int = 1,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    engine_cache_path: str | None = None,
    opt_batch: int = 8,
    opt_tokens: int = 16,
    max_tokens: int = MAX_TOKENS,
    max_queue_delay_us: int = 500,
    preferred_batch_sizes: Sequence[int] = (8, 16, 32),
    name: str = "encoder",
    model_filename: str | None = None,
) -> str:
    """``config.pbtxt`` of the encoder on the onnxruntime backend, TensorRT execution accelerator.

    ``precision`` "INT8" serves the Q/DQ graph (explicit quantization: TensorRT takes the scales
    from the graph, no calibration table); "FP16" serves the FP32 graph. The TensorRT profile
    spans 1x1 to ``max_batch_size`` x ``max_tokens`` so one engine (cached when
    ``engine_cache_path`` is set) serves every request shape. ``model_filename`` defaults to
    ``MODEL_FILES[precision]``.
    """
    if precision not in PRECISIONS:
        raise GpuConfigError(f"precision {precision!r} is not one of {PRECISIONS}")
    parameters = {
        "precision_mode": precision,
        "max_workspace_size_bytes": str(workspace_bytes),
        "trt_engine_cache_enable": "true",
        "trt_profile_min_shapes": _shape_spec(1, 1),
        "trt_profile_opt_shapes": _shape_spec(opt_batch, opt_tokens),
        "trt_profile_max_shapes": _shape_spec(max_batch_size, max_tokens),
    }
    if engine_cache_path:
        parameters["trt_engine_cache_path"] = engine_cache_path
    accelerator = "\n".join(
        f'        parameters {{ key: "{key}" value: "{value}" }}'
        for key, value in parameters.items()
    )
    model = "the static Q/DQ INT8 graph" if precision == "INT8" else "the FP32 graph in FP16"
    text = (
        f"# all-MiniLM-L6-v2, mean pooling and L2 norm in the graph: {model} on TensorRT.\n"
        "# Batch-invariant, so concurrent queries of one token count are batched together.\n"
        f'name: "{name}"\n'
        'backend: "onnxruntime"\n'
        f'default_model_filename: "{model_filename or MODEL_FILES[precision]}"\n'
        f"max_batch_size: {max_batch_size}\n"
        + _encoder_io()
        + _batching(max_batch_size, preferred_batch_sizes, max_queue_delay_us)
        + "optimization {\n"
        "  execution_accelerators {\n"
        "    gpu_execution_accelerator: [\n"
        "      {\n"
        '        name: "tensorrt"\n'
        f"{accelerator}\n"
        "      }\n"
        "    ]\n"
        "  }\n"
        "}\n"
        f"instance_group [ {{ kind: KIND_GPU count: {instances} }} ]\n" + IN_PROCESS_PARAMETER
    )
    _check_encoder(text, max_batch_size, platform=None, precision=precision)
    return text


def encoder_plan_config(
    max_batch_size: int = DEFAULT_MAX_BATCH,
    instances: int = 1,
    max_queue_delay_us: int = 500,
    preferred_batch_sizes: Sequence[int] = (8, 16, 32),
    name: str = "encoder",
) -> str:
    """``config.pbtxt`` of the encoder as a TensorRT engine (``model.plan``, built by
    :func:`trtexec_command` with the same ``max_batch_size``)."""
    text = (
        "# all-MiniLM-L6-v2 as a TensorRT engine built at release time from the Q/DQ INT8 graph;\n"
        "# an engine only runs on the GPU model and TensorRT version it was built with.\n"
        f'name: "{name}"\n'
        'platform: "tensorrt_plan"\n'
        'default_model_filename: "model.plan"\n'
        f"max_batch_size: {max_batch_size}\n"
        + _encoder_io()
        + _batching(max_batch_size, preferred_batch_sizes, max_queue_delay_us)
        + f"instance_group [ {{ kind: KIND_GPU count: {instances} }} ]\n"
        + IN_PROCESS_PARAMETER
    )
    _check_encoder(text, max_batch_size, platform="tensorrt_plan", precision=None)
    return text


def ranker_config(num_features: int, instances: int = 1, name: str = "ranker") -> str:
    """``config.pbtxt`` of the ranker (onnxruntime backend) on the GPU; the CPU config's names,
    types and dims: FEATURES fp32 [-1, num_features] in, SCORES fp32 [-1] out, no batching."""
    if num_features < 1:
        raise GpuConfigError(f"num_features must be positive, not {num_features}")
    text = (
        "# The search ranker the build selected; one logit per candidate.\n"
        f'name: "{name}"\n'
        'backend: "onnxruntime"\n'
        'default_model_filename: "model.onnx"\n'
        "max_batch_size: 0\n"
        f'input [ {{ name: "FEATURES" data_type: TYPE_FP32 dims: [ -1, {num_features} ] }} ]\n'
        'output [ { name: "SCORES" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        f"instance_group [ {{ kind: KIND_GPU count: {instances} }} ]\n"
    )
    config = parse_config(text)
    _require(config.max_batch_size == 0, "ranker: max_batch_size must be 0")
    _require(
        list(config.input[0].dims) == [-1, num_features] and list(config.output[0].dims) == [-1],
        "ranker: FEATURES must be [-1, N] and SCORES [-1]",
    )
    _require_gpu(config)
    return text


def trtexec_command(
    onnx_path: str = "model_qdq.onnx",
    engine_path: str = "model.plan",
    max_batch_size: int = DEFAULT_MAX_BATCH,
    opt_batch: int = 8,
    opt_tokens: int = 16,
    max_tokens: int = MAX_TOKENS,
    workspace_mib: int = 2048,
    strongly_typed: bool = False,
) -> str:
    """The ``trtexec`` line that builds ``model.plan`` from the Q/DQ INT8 graph (TensorRT 10).

    TensorRT 10 builds explicit-batch networks only (no ``--explicitBatch``; ``--workspace`` is
    now ``--memPoolSize=workspace:<MiB>``). Default: weakly typed, ``--int8 --fp16`` (the Q/DQ
    MatMuls in INT8, the rest free to run in FP16). ``strongly_typed``: ``--stronglyTyped`` and no
    precision flags, for TensorRT >= 10.12 (weak typing deprecated) and 11 (removed); the layers
    outside Q/DQ then keep the graph's FP32.
    """
    args = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        *(["--stronglyTyped"] if strongly_typed else ["--int8", "--fp16"]),
        f"--minShapes={_shape_spec(1, 1)}",
        f"--optShapes={_shape_spec(opt_batch, opt_tokens)}",
        f"--maxShapes={_shape_spec(max_batch_size, max_tokens)}",
        f"--memPoolSize=workspace:{workspace_mib}",
        "--skipInference",
    ]
    return shlex.join(args)


def write_gpu_configs(
    repository: Path,
    precision: str,
    num_features: int,
    engine: str = "onnxruntime",
    max_batch_size: int = DEFAULT_MAX_BATCH,
    encoder_name: str = "encoder",
    ranker_name: str = "ranker",
) -> dict[str, Path]:
    """Write the GPU ``config.pbtxt`` of the encoder and the ranker into ``repository``.

    ``engine`` "onnxruntime": the encoder on the onnxruntime backend with TensorRT ``precision``
    ("INT8" for the Q/DQ graph, "FP16" for the FP32 graph); "tensorrt_plan": a prebuilt
    ``model.plan`` (build it with :func:`trtexec_command`). Model files are not touched. Returns
    the written paths by model name. A config's version policy (a rollout's pin) is kept.
    """
    if engine == "onnxruntime":
        encoder = encoder_config(precision, max_batch_size, name=encoder_name)
    elif engine == "tensorrt_plan":
        encoder = encoder_plan_config(max_batch_size, name=encoder_name)
    else:
        raise GpuConfigError(f"engine {engine!r} is not 'onnxruntime' or 'tensorrt_plan'")
    written = {}
    for name, text in (
        (encoder_name, encoder),
        (ranker_name, ranker_config(num_features, name=ranker_name)),
    ):
        path = repository / name / "config.pbtxt"
        path.parent.mkdir(parents=True, exist_ok=True)
        pinned = store.version_policy(path.read_text()) if path.exists() else None
        if pinned:  # a rollout's pin: the GPU config serves the versions the others serve
            text = text.rstrip("\n") + "\n" + pinned + "\n"
            parse_config(text)
        path.write_text(text)
        written[name] = path
    return written


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise GpuConfigError(message)


def _require_gpu(config) -> None:
    from tritonclient.grpc import model_config_pb2

    gpu = model_config_pb2.ModelInstanceGroup.KIND_GPU
    _require(
        len(config.instance_group) > 0 and all(g.kind == gpu for g in config.instance_group),
        f"{config.name}: instance_group must be KIND_GPU",
    )


def _check_encoder(text: str, max_batch_size: int, platform: str | None, precision: str | None):
    config = parse_config(text)
    _require(max_batch_size > 0 and config.max_batch_size == max_batch_size, "encoder: batching")
    _require(config.HasField("dynamic_batching"), "encoder: dynamic_batching missing")
    inputs = {i.name: list(i.dims) for i in config.input}
    _require(inputs == {key: [-1] for key in ENCODER_INPUTS}, f"encoder: input dims {inputs}")
    outputs = {o.name: list(o.dims) for o in config.output}
    _require(outputs == {"EMBEDDING": [EMBEDDING_DIM]}, f"encoder: output dims {outputs}")
    _require_gpu(config)
    if platform is not None:
        _require(config.platform == platform, f"encoder: platform {config.platform!r}")
    if precision is not None:
        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        _require(
            len(accelerators) == 1
            and accelerators[0].name == "tensorrt"
            and accelerators[0].parameters["precision_mode"] == precision,
            f"encoder: TensorRT accelerator with precision_mode {precision} missing",
        )
    return config
