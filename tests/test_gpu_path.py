"""The GPU path, on CPU: Triton GPU configs, and the static Q/DQ INT8 encoder graph for TensorRT.

Self-contained: a tiny random BERT (one layer, hidden size 32) with mean pooling and L2 norm in the
graph stands in for MiniLM; no shared data, no built store.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import documented_commands
from shopserve.ensemble import store
from shopserve.export import gpu, qdq
from shopserve.export.encoder import pooled, write_onnx

PROJECT = Path(__file__).resolve().parents[1]
VOCAB = 100
if str(PROJECT) not in sys.path:  # benchmarks/ is a directory of the project, not installed
    sys.path.insert(0, str(PROJECT))


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "render",
    [
        lambda: gpu.encoder_config("INT8"),
        lambda: gpu.encoder_config("FP16", engine_cache_path="/tmp/trt"),
        lambda: gpu.encoder_plan_config(),
        lambda: gpu.ranker_config(8),
    ],
    ids=["encoder-int8", "encoder-fp16", "encoder-plan", "ranker"],
)
def test_gpu_configs_parse_with_triton_schema(render) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(render(), model_config_pb2.ModelConfig())
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]


def test_encoder_config_batches_on_tensorrt() -> None:
    config = gpu.parse_config(gpu.encoder_config("INT8", max_batch_size=32))
    assert config.backend == "onnxruntime"
    assert config.default_model_filename == "model_qdq.onnx"
    assert config.max_batch_size == 32
    assert config.HasField("dynamic_batching")
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert {i.name: list(i.dims) for i in config.input} == {
        "INPUT_IDS": [-1],
        "ATTENTION_MASK": [-1],
    }
    assert [list(o.dims) for o in config.output] == [[384]]
    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt"
    assert trt.parameters["precision_mode"] == "INT8"
    assert trt.parameters["trt_engine_cache_enable"] == "true"
    assert int(trt.parameters["max_workspace_size_bytes"]) > 0
    assert trt.parameters["trt_profile_max_shapes"] == "INPUT_IDS:32x256,ATTENTION_MASK:32x256"
    fp16 = gpu.parse_config(gpu.encoder_config("FP16"))
    (trt,) = fp16.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.parameters["precision_mode"] == "FP16"
    assert fp16.default_model_filename == "model_fp32.onnx"
    plan = gpu.parse_config(gpu.encoder_plan_config())
    assert (plan.platform, plan.default_model_filename) == ("tensorrt_plan", "model.plan")


def test_gpu_configs_mirror_the_cpu_configs() -> None:
    """Same names and data types as the CPU configs, and the same per-request dims: the GPU
    encoder batches (a CPU config without batching has the batch axis in its dims)."""
    repository = PROJECT / "model_repository"
    cpu_encoder = gpu.parse_config((repository / "encoder" / "config.pbtxt").read_text())
    cpu_ranker = gpu.parse_config((repository / "ranker" / "config.pbtxt").read_text())
    features = cpu_ranker.input[0].dims[-1]
    gpu_encoder = gpu.parse_config(gpu.encoder_config())
    gpu_ranker = gpu.parse_config(gpu.ranker_config(features))
    assert gpu_encoder.max_batch_size > 0 and gpu_ranker.max_batch_size == 0
    for cpu_config, gpu_config in ((cpu_encoder, gpu_encoder), (cpu_ranker, gpu_ranker)):
        assert gpu_config.name == cpu_config.name
        strip = 1 if cpu_config.max_batch_size == 0 and gpu_config.max_batch_size > 0 else 0
        for cpu_tensors, gpu_tensors in (
            (cpu_config.input, gpu_config.input),
            (cpu_config.output, gpu_config.output),
        ):
            assert [(t.name, t.data_type, list(t.dims)[strip:]) for t in cpu_tensors] == [
                (t.name, t.data_type, list(t.dims)) for t in gpu_tensors
            ]


@pytest.mark.parametrize(
    "text",
    [
        'name: "encoder" max_batch_size: "many"',
        'name: "encoder" instance_group [ { kind: KIND_TPU } ]',
        'name: "encoder" no_such_field: 1',
        'name: "encoder" input [ { name: "INPUT_IDS" dims: [ -1 ] }',
    ],
)
def test_broken_config_is_refused(text: str) -> None:
    with pytest.raises(gpu.GpuConfigError, match="does not parse"):
        gpu.parse_config(text)


def test_invalid_render_arguments_are_refused() -> None:
    with pytest.raises(gpu.GpuConfigError):
        gpu.encoder_config("INT4")
    with pytest.raises(gpu.GpuConfigError):
        gpu.encoder_config(max_batch_size=0)
    with pytest.raises(gpu.GpuConfigError):
        gpu.ranker_config(0)
    with pytest.raises(gpu.GpuConfigError):
        gpu.write_gpu_configs(Path("/nonexistent"), "INT8", 8, engine="tflite")


@pytest.mark.parametrize("engine", ["onnxruntime", "tensorrt_plan"])
def test_write_gpu_configs(tmp_path: Path, engine: str) -> None:
    written = gpu.write_gpu_configs(tmp_path, "INT8", 8, engine=engine)
    assert set(written) == {"encoder", "ranker"}
    encoder = gpu.parse_config(written["encoder"].read_text())
    ranker = gpu.parse_config(written["ranker"].read_text())
    assert written["encoder"] == tmp_path / "encoder" / "config.pbtxt"
    assert (encoder.platform == "tensorrt_plan") == (engine == "tensorrt_plan")
    assert list(ranker.input[0].dims) == [-1, 8]


def test_gpu_configs_keep_a_rollouts_pin(tmp_path: Path) -> None:
    """A GPU build over a store a rollout pinned serves the pinned versions, like its other models
    (else the search_steps ensemble, whose steps are pinned too, would not load at a restart)."""
    for model in ("encoder", "ranker"):
        (tmp_path / model).mkdir()
        (tmp_path / model / "config.pbtxt").write_text(
            store.with_version_policy(f'name: "{model}"\n', 2)
        )
    for path in gpu.write_gpu_configs(tmp_path, "INT8", 8).values():
        config = gpu.parse_config(path.read_text())
        assert list(config.version_policy.specific.versions) == [2]


def test_trtexec_command() -> None:
    command = gpu.trtexec_command("encoder/1/model.onnx", "encoder/1/model.plan", max_batch_size=32)
    assert command.startswith(
        "trtexec --onnx=encoder/1/model.onnx --saveEngine=encoder/1/model.plan"
    )
    for flag in (
        "--int8",
        "--fp16",
        "--minShapes=INPUT_IDS:1x1,ATTENTION_MASK:1x1",
        "--optShapes=INPUT_IDS:8x16,ATTENTION_MASK:8x16",
        "--maxShapes=INPUT_IDS:32x256,ATTENTION_MASK:32x256",
        "--memPoolSize=workspace:2048",
    ):
        assert flag in command.split()
    assert "--explicitBatch" not in command and "--workspace=" not in command
    strong = gpu.trtexec_command(strongly_typed=True).split()
    assert "--stronglyTyped" in strong and "--int8" not in strong and "--fp16" not in strong


# --------------------------------------------------------------------------- Q/DQ graph


@pytest.fixture(scope="module")
def tiny_encoder(module_folder) -> Path:
    """A one-layer random BERT (hidden 32) with mean pooling and L2 norm, exported like MiniLM."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(0)

    path = module_folder("tiny") / "model_fp32.onnx"
    ids, mask = _batch(np.random.default_rng(0), [5, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer notes
        write_onnx(pooled(transformers.BertModel(config, add_pooling_layer=False)), ids, mask, path)
    return path


def _batch(rng: np.random.Generator, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids ([CLS] ... [SEP]-like), padded to the longest, with their mask."""
    width = max(lengths)
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(1, VOCAB, size=length)
        mask[row, :length] = 1
    return ids, mask


def _batches(seed: int, count: int, size: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [_batch(rng, list(rng.integers(3, 20, size=size))) for _ in range(count)]


@pytest.fixture(scope="module")
def calibration() -> list[tuple[np.ndarray, np.ndarray]]:
    return _batches(1, 8)


@pytest.fixture(scope="module")
def qdq_encoder(tiny_encoder: Path, calibration, module_folder) -> Path:
    destination = module_folder("qdq") / "model.onnx"
    return qdq.quantize_qdq(tiny_encoder, destination, calibration)


def _matmul_inputs_from_dq(model: onnx.ModelProto) -> dict[str, list[bool]]:
    producer = {out: n.op_type for n in model.graph.node for out in n.output}
    return {
        n.name: [producer.get(i) == "DequantizeLinear" for i in n.input[:2]]
        for n in model.graph.node
        if n.op_type == "MatMul"
    }


def test_qdq_graph_passes_onnx_checker_and_tensorrt_placement(qdq_encoder: Path) -> None:
    onnx.checker.check_model(str(qdq_encoder), full_check=True)
    model = onnx.load(str(qdq_encoder))
    assert qdq.tensorrt_qdq_problems(model) == []
    assert qdq.qdq_model_problems(qdq_encoder) == []
    # every MatMul (weights and attention) reads INT8 on both inputs; nothing else does
    assert all(all(flags) for flags in _matmul_inputs_from_dq(model).values())
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = qdq.metadata(model)
    assert json.loads(meta[qdq.METADATA_FP32]) == []
    calibration = json.loads(meta[qdq.METADATA_CALIBRATION])
    assert calibration["method"] == "minmax" and calibration["rows"] == 64


def test_weights_are_int8_per_channel(qdq_encoder: Path) -> None:
    model = onnx.load(str(qdq_encoder))
    values = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    weight_dqs = [
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in values
    ]
    assert len(weight_dqs) == 6  # q, k, v, attention output, intermediate, output
    for node in weight_dqs:
        weight, scale, zero = (values[name] for name in node.input)
        assert weight.dtype == np.int8 and zero.dtype == np.int8 and not zero.any()
        assert scale.shape == (weight.shape[1],)
        assert next(a.i for a in node.attribute if a.name == "axis") == 1


def test_the_cpu_graphs_weights_cannot_saturate_x86_sums_without_vnni(
    tiny_encoder: Path, calibration, tmp_path, monkeypatch
) -> None:
    """x86 without VNNI adds each pair of UINT8 x INT8 products in 16 bits (vpmaddubsw), which
    saturates past 32,767: 8-bit weights can (2 x 255 x 127), 7-bit ones cannot (2 x 255 x 64 =
    32,640). The CPU graph has 7-bit weights and says so; TensorRT's keeps 8 (it sums in INT32)."""
    cpu = qdq.quantize_qdq(tiny_encoder, tmp_path / "cpu.onnx", calibration, signed=False)
    trt = qdq.quantize_qdq(tiny_encoder, tmp_path / "trt.onnx", calibration, signed=True)

    def widest(path: Path) -> int:
        model = onnx.load(str(path))
        values = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        dqs = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
        return max(
            int(np.abs(values[n].astype(int)).max())
            for n in dqs
            if n in values and values[n].dtype == np.int8
        )

    assert widest(cpu) == 64 and 2 * 255 * widest(cpu) <= 32_767 < 2 * 255 * widest(trt)
    assert qdq.qdq_model_problems(cpu, tensorrt=False) == []
    assert "7-bit weights" in qdq.metadata(onnx.load(str(cpu)))[qdq.METADATA_FORMAT]
    # the check the build runs fails a CPU graph with 8-bit weights, naming each of the 6 weights
    monkeypatch.setitem(qdq.WEIGHT_BITS, False, 8)
    wide = qdq.quantize_qdq(tiny_encoder, tmp_path / "wide.onnx", calibration, signed=False)
    problems = qdq.qdq_model_problems(wide, tensorrt=False)
    assert len(problems) == 6 and all("more than 7 bits" in p for p in problems), problems


def test_fp32_matmuls_are_left_without_qdq(tiny_encoder: Path, calibration, tmp_path) -> None:
    keep = [
        "/bert/encoder/layer.0/output/dense/MatMul",
        "/bert/encoder/layer.0/attention/self/MatMul",
    ]
    path = qdq.quantize_qdq(tiny_encoder, tmp_path / "model.onnx", calibration, keep_fp32=keep)
    model = onnx.load(str(path))
    assert qdq.qdq_model_problems(path) == []
    flags = _matmul_inputs_from_dq(model)
    for name, inputs in flags.items():
        assert inputs == ([False, False] if name in keep else [True, True]), name
    assert json.loads(qdq.metadata(model)[qdq.METADATA_FP32]) == sorted(keep)
    with pytest.raises(ValueError, match="no MatMul"):
        qdq.quantize_qdq(tiny_encoder, tmp_path / "x.onnx", calibration, keep_fp32=["nope"])


def _nonzero_zero_point(model: onnx.ModelProto) -> None:
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    init = next(i for i in model.graph.initializer if i.name == node.input[2])
    init.CopyFrom(onnx.numpy_helper.from_array(np.array(3, dtype=np.int8), init.name))


def _bypass_dq(model: onnx.ModelProto) -> None:
    producer = {out: n for n in model.graph.node for out in n.output}
    matmul = next(n for n in model.graph.node if n.name.endswith("query/MatMul"))
    dq = producer[matmul.input[0]]
    matmul.input[0] = producer[dq.input[0]].input[0]


def _per_tensor_weight(model: onnx.ModelProto) -> None:
    node = next(
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and "MatMul" in n.input[0]
    )
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    scale = onnx.numpy_helper.to_array(init)
    init.CopyFrom(onnx.numpy_helper.from_array(scale.max(keepdims=False), init.name))
    zero = next(i for i in model.graph.initializer if i.name == node.input[2])
    zero.CopyFrom(onnx.numpy_helper.from_array(np.array(0, dtype=np.int8), zero.name))


def _wrong_axis(model: onnx.ModelProto) -> None:
    node = next(
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and "MatMul" in n.input[0]
    )
    next(a for a in node.attribute if a.name == "axis").i = 0


def _listed_fp32_but_quantized(model: onnx.ModelProto) -> None:
    qdq.set_metadata(
        model, {qdq.METADATA_FP32: json.dumps(["/bert/encoder/layer.0/output/dense/MatMul"])}
    )


def _q_on_int64(model: onnx.ModelProto) -> None:
    scale = onnx.numpy_helper.from_array(np.array(1.0, dtype=np.float32), "s64")
    zero = onnx.numpy_helper.from_array(np.array(0, dtype=np.int8), "z64")
    model.graph.initializer.extend([scale, zero])
    model.graph.node.extend(
        [
            onnx.helper.make_node("QuantizeLinear", ["INPUT_IDS", "s64", "z64"], ["ids_q"], "q64"),
            onnx.helper.make_node("DequantizeLinear", ["ids_q", "s64", "z64"], ["ids_dq"], "dq64"),
        ]
    )


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_nonzero_zero_point, "zero point is not 0"),
        (_bypass_dq, "no DequantizeLinear on input"),
        (_per_tensor_weight, "not per-channel"),
        (_wrong_axis, "not the output-channel axis"),
        (_listed_fp32_but_quantized, "listed FP32 but reads DequantizeLinear"),
        (_q_on_int64, "quantizes int64 tensor"),
    ],
    ids=[
        "nonzero-zero-point",
        "missing-dq",
        "per-tensor-weight",
        "wrong-axis",
        "fp32-listed",
        "int64",
    ],
)
def test_wrong_placement_is_reported(qdq_encoder: Path, mutate, expected: str) -> None:
    model = onnx.load(str(qdq_encoder))
    mutate(model)
    problems = qdq.tensorrt_qdq_problems(model)
    assert any(expected in p for p in problems), problems


def test_asymmetric_uint8_and_default_ort_placement_are_reported(
    tiny_encoder: Path, calibration, tmp_path
) -> None:
    """What ``quantize_static`` gives by default (QUInt8 asymmetric activations, Q/DQ also on
    MatMul outputs and on the residual path) is not TensorRT's placement."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    path = tmp_path / "uint8.onnx"
    with qdq._quiet():
        quantize_static(
            str(tiny_encoder),
            str(path),
            qdq._reader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    problems = qdq.tensorrt_qdq_problems(onnx.load(str(path)))
    assert any("uint8, not int8" in p for p in problems), problems
    assert any("not 0 (asymmetric)" in p for p in problems), problems
    assert any(re.search(r"read by (Add|Shape)", p) for p in problems), problems


def test_qdq_numerics_batch_invariant_and_close_to_fp32(tiny_encoder: Path, qdq_encoder) -> None:
    rng = np.random.default_rng(7)
    lengths = [3, 17, 5, 9, 12, 4, 20, 8]
    ids, mask = _batch(rng, lengths)
    batched = qdq.embed(qdq_encoder, [(ids, mask)])
    alone = np.concatenate(
        [
            qdq.embed(qdq_encoder, [(ids[i : i + 1, :n], mask[i : i + 1, :n])])
            for i, n in enumerate(lengths)
        ]
    )
    assert np.abs(batched - alone).max() < 1e-5
    reference = qdq.embed(tiny_encoder, [(ids, mask)])
    cosine = qdq.cosines(reference, batched)
    assert cosine.min() > 0.99, cosine
    assert np.abs(batched - reference).max() > 0  # it is quantized


def test_the_gpu_check_runs_both_graphs_as_onnx_runtime_does(
    tiny_encoder: Path, qdq_encoder
) -> None:
    """benchmarks/gpu_encoder.py's PyTorch run of the graphs (here on CPU): the FP32 graph as ONNX
    Runtime runs it; the Q/DQ graph with real INT8 GEMMs, as close to FP32 as ONNX Runtime's Q/DQ
    run and equal to the graph's own arithmetic; FP16 close to FP32."""
    torch = pytest.importorskip("torch")
    from benchmarks.gpu_encoder import GraphRunner

    ids, mask = _batch(np.random.default_rng(11), [3, 17, 5, 9, 12, 4, 20, 8])
    fp32_graph, qdq_graph = onnx.load(str(tiny_encoder)), onnx.load(str(qdq_encoder))
    reference = qdq.embed(tiny_encoder, [(ids, mask)])
    fp32 = GraphRunner(fp32_graph, "cpu", torch.float32, int8_gemm=False)(ids, mask)
    np.testing.assert_allclose(fp32, reference, atol=1e-5)
    fp16 = GraphRunner(fp32_graph, "cpu", torch.float16, int8_gemm=False)(ids, mask)
    assert qdq.cosines(reference, fp16).min() > 0.999
    runner = GraphRunner(qdq_graph, "cpu", torch.float32, int8_gemm=True)
    int8 = runner(ids, mask)
    # one layer: query, key, value, attention output, intermediate, output; two attention products
    assert (runner.int8_matmuls, runner.exact_matmuls) == (6, 2)
    as_written = GraphRunner(qdq_graph, "cpu", torch.float32, int8_gemm=False)(ids, mask)
    assert qdq.cosines(as_written, int8).min() > 0.9999
    onnx_runtime = qdq.cosines(reference, qdq.embed(qdq_encoder, [(ids, mask)]))
    assert qdq.cosines(reference, int8).mean() == pytest.approx(onnx_runtime.mean(), abs=2e-3)


def _quantized_matmuls(rng: np.random.Generator) -> onnx.ModelProto:
    """X x W (X quantized per tensor, W an INT8 weight with a scale per column) and A x B (both
    activations quantized per tensor, batched as attention is): the two MatMuls of a Q/DQ graph."""
    from onnx import TensorProto, helper, numpy_helper

    def tensor(name: str, value) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value), name)

    weight = rng.integers(-127, 128, size=(32, 24)).astype(np.int8)
    initializers = [
        tensor("x_scale", np.float32(0.02)),
        tensor("a_scale", np.float32(0.05)),
        tensor("b_scale", np.float32(0.03)),
        tensor("zero", np.int8(0)),
        tensor("w", weight),
        tensor("w_scale", rng.uniform(0.001, 0.01, size=24).astype(np.float32)),
        tensor("w_zero", np.zeros(24, dtype=np.int8)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["X", "x_scale", "zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["Y"]),
    ]
    for name in ("A", "B"):
        scale = f"{name.lower()}_scale"
        nodes += [
            helper.make_node("QuantizeLinear", [name, scale, "zero"], [f"{name}q"]),
            helper.make_node("DequantizeLinear", [f"{name}q", scale, "zero"], [f"{name}d"]),
        ]
    nodes.append(helper.make_node("MatMul", ["Ad", "Bd"], ["AB"]))
    graph = helper.make_graph(
        nodes,
        "quantized_matmuls",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [20, 32]),
            helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, 3, 20, 8]),
            helper.make_tensor_value_info("B", TensorProto.FLOAT, [2, 3, 8, 20]),
        ],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, [20, 24]),
            helper.make_tensor_value_info("AB", TensorProto.FLOAT, [2, 3, 20, 20]),
        ],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _quantized_feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "X": rng.normal(size=(20, 32)).astype(np.float32),
        "A": rng.normal(size=(2, 3, 20, 8)).astype(np.float32),
        "B": rng.normal(size=(2, 3, 8, 20)).astype(np.float32),
    }


def _as_defined(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime with every graph optimisation off: each operator as ONNX defines it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(["Y", "AB"], feeds)


def test_the_gpu_checks_int8_matmuls_are_the_graphs_arithmetic() -> None:
    """An INT8 GEMM with per-column weight scales, and attention's product of two quantized
    activations, as the graph's operators define them."""
    torch = pytest.importorskip("torch")
    from benchmarks.gpu_encoder import GraphRunner

    rng = np.random.default_rng(5)
    model = _quantized_matmuls(rng)
    onnx.checker.check_model(model, full_check=True)
    feeds = _quantized_feeds(rng)
    runner = GraphRunner(model, "cpu", torch.float32, int8_gemm=True)
    answered = runner.run(feeds, ["Y", "AB"])
    assert (runner.int8_matmuls, runner.exact_matmuls) == (1, 1)
    for got, expected in zip(answered, _as_defined(model, feeds), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_tensorrts_int8_form_runs_as_written_on_cpu() -> None:
    """A graph marked as TensorRT's INT8 form is run on CPU as its operators define it, never
    through ONNX Runtime's fused INT8 kernels (which saturate on x86 without VNNI)."""
    from shopserve.ensemble.models import cpu_session

    rng = np.random.default_rng(5)
    model = _quantized_matmuls(rng)
    feeds = _quantized_feeds(rng)
    qdq.set_metadata(model, {qdq.METADATA_FORMAT: qdq.QDQ_FORMATS[True]})
    answered = cpu_session(model.SerializeToString()).run(["Y", "AB"], feeds)
    for got, expected in zip(answered, _as_defined(model, feeds), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_revert_to_fp32_equals_quantizing_without_those_matmuls(
    tiny_encoder: Path, qdq_encoder: Path, calibration, tmp_path
) -> None:
    keep = ["/bert/encoder/layer.0/intermediate/dense/MatMul"]
    reverted = qdq.revert_to_fp32(onnx.load(str(qdq_encoder)), onnx.load(str(tiny_encoder)), keep)
    excluded = qdq.quantize_qdq(tiny_encoder, tmp_path / "m.onnx", calibration, keep_fp32=keep)
    assert qdq.tensorrt_qdq_problems(reverted, keep_fp32=keep) == []
    batches = _batches(3, 2)
    np.testing.assert_allclose(
        qdq.embed(reverted, batches), qdq.embed(excluded, batches), atol=1e-6
    )


def test_choose_and_build(tiny_encoder: Path, calibration, tmp_path) -> None:
    held_out = _batches(2, 4)
    easy = qdq.choose_fp32_matmuls(tiny_encoder, calibration, held_out, target_cosine=0.0)
    assert easy.keep_fp32 == () and easy.reached
    assert easy.sensitivity == {}  # nothing to choose: no MatMul measured
    impossible = qdq.choose_fp32_matmuls(tiny_encoder, calibration, held_out, target_cosine=1.01)
    assert not impossible.reached and len(impossible.sensitivity) == 8
    assert [step[0] for step in impossible.steps] == [0, 1, 2, 4, 8]
    assert impossible.mean_cosine == max(step[1] for step in impossible.steps)
    none_allowed = qdq.choose_fp32_matmuls(
        tiny_encoder, calibration, held_out, target_cosine=1.01, max_fp32=0
    )  # no MatMul may stay FP32: nothing is measured beyond the fully quantized graph
    assert none_allowed.keep_fp32 == () and not none_allowed.reached
    assert none_allowed.sensitivity == {} and [s[0] for s in none_allowed.steps] == [0]
    path = tmp_path / "model.onnx"
    choice = qdq.build_qdq_encoder(tiny_encoder, path, calibration, held_out, target_cosine=0.9999)
    model = onnx.load(str(path))
    assert qdq.qdq_model_problems(path) == []
    assert json.loads(qdq.metadata(model)[qdq.METADATA_FP32]) == sorted(choice.keep_fp32)
    selection = json.loads(qdq.metadata(model)[qdq.METADATA_SELECTION])
    assert selection["target_cosine"] == 0.9999 and selection["held_out_rows"] == 32
    assert selection["reached"] == choice.reached


@pytest.mark.slow
def test_a_gpu_target_build_writes_the_qdq_graph_and_gpu_configs(data_dir, tmp_path) -> None:
    """``export build --target gpu`` on a 3,000-product cut: the gated Q/DQ graph in TensorRT's
    form, the encoder and ranker configs of a GPU Triton, and an in-process pipeline that still
    runs the FP32 graph on CPU."""
    from conftest import copy_source_repository, export, write_cut
    from shopserve.ensemble import SearchPipeline, store

    items, _ = write_cut(data_dir, tmp_path)
    repository = copy_source_repository(tmp_path / "store")
    run = export("build", "--catalogue", items, "--repository", repository, "--target", "gpu")
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((repository / store.MANIFEST_FILE).read_text())
    int8 = manifest["encoder"]["int8"]
    assert manifest["encoder"]["target"] == "gpu" and int8["gate"]["passed"]
    assert int8["gate"]["mean_cosine"] >= 0.99 and "TensorRT" in manifest["encoder"]["served"]
    encoder = gpu.parse_config((repository / store.ENCODER / "config.pbtxt").read_text())
    assert encoder.default_model_filename == "model_qdq.onnx"
    assert encoder.optimization.execution_accelerators.gpu_execution_accelerator[0].name == (
        "tensorrt"
    )
    ranker = gpu.parse_config((repository / store.RANKER / "config.pbtxt").read_text())
    assert list(ranker.input[0].dims) == [-1, 8]
    graph = store.model_file(repository, store.ENCODER)
    assert graph.name == "model_qdq.onnx" and qdq.qdq_model_problems(graph) == []
    kept = json.loads(qdq.metadata(onnx.load(str(graph)))[qdq.METADATA_FP32])
    assert kept == sorted(int8["fp32_matmuls"])
    in_process = store.in_process_model_file(repository, store.ENCODER)
    assert in_process.name == "model_fp32.onnx"
    hits = SearchPipeline.from_repository(repository).search("cordless drill", 5)
    assert len(hits.product_ids) == 5
    _run_the_documented_gpu_check(repository, tmp_path)


def _run_the_documented_gpu_check(repository: Path, tmp_path: Path) -> None:
    """docs/building.md's two commands on the GPU-target store, the second on CPU."""
    import subprocess

    commands = documented_commands("building.md", "gpu-check")
    texts = tmp_path / "texts.txt"
    texts.write_text(
        "cordless drill\nwhite vanity 36 inch\n"
        + "\n".join(store.load_catalogue(repository).titles[:30])
        + "\n"
    )
    swap = {
        "STORE": repository,
        "texts.txt": texts,
        "ref.npz": tmp_path / "ref.npz",
        "gpu.json": tmp_path / "gpu.json",
    }
    extra = [[], ["--device", "cpu", "--modes", "fp32,int8"]]
    for command, more in zip(commands, extra, strict=True):
        assert command[:2] == ["python", "benchmarks/gpu_encoder.py"], command
        argv = [sys.executable, *[str(swap.get(word, word)) for word in command[1:]], *more]
        done = subprocess.run(argv, cwd=PROJECT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["texts"] == 32
    fp32, int8 = report["modes"]["fp32"], report["modes"]["int8"]
    assert fp32["vs_fp32_cpu"]["min"] > 0.99999
    assert int8["int8_gemm_matmuls"] > 0 and int8["vs_fp32_cpu"]["mean"] > 0.98
    assert int8["vs_fp32_cpu"]["mean"] == pytest.approx(
        report["onnxruntime_cpu"]["qdq_vs_fp32_cosine"]["mean"], abs=2e-3
    )
