"""ONNX Runtime sessions over pre-packed copies (shopserve.ensemble.models.prepacked_model)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from shopserve.ensemble import models
from shopserve.ensemble.models import PREPACKED_DIR_ENV, ort_session, prepacked_model

WIDTH = 64


@pytest.fixture(scope="module")
def matmul_model(module_folder) -> Path:
    """Y = X @ W with W a constant: ONNX Runtime pre-packs W for its GEMM kernel."""
    weights = np.random.default_rng(0).standard_normal((WIDTH, WIDTH)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "matmul",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", WIDTH])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["rows", WIDTH])],
        [numpy_helper.from_array(weights, "W")],
    )
    path = module_folder("model") / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _answer(session) -> np.ndarray:
    x = np.linspace(-1, 1, 3 * WIDTH, dtype=np.float32).reshape(3, WIDTH)
    return session.run(None, {"X": x})[0]


def test_a_prepacked_copy_is_made_once_and_answers_exactly(matmul_model, tmp_path) -> None:
    copy = prepacked_model(matmul_model, tmp_path)
    assert copy.exists() and copy.with_name(copy.name + ".data").exists()
    assert copy.parent.parent == tmp_path
    modified = copy.stat().st_mtime_ns
    assert prepacked_model(matmul_model, tmp_path) == copy  # found, not made again
    assert copy.stat().st_mtime_ns == modified
    assert np.array_equal(_answer(ort_session(copy)), _answer(ort_session(matmul_model)))


def test_server_processes_open_the_copy(matmul_model, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(PREPACKED_DIR_ENV, str(tmp_path))
    session = ort_session(matmul_model)
    made = list(tmp_path.glob(f"*/{models.PREPACKED_FILE}"))
    assert len(made) == 1 and np.array_equal(_answer(session), _answer(ort_session(made[0])))


def test_processes_that_start_together_make_one_copy(matmul_model, tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from shopserve.ensemble.models import prepacked_model
        print(prepacked_model(Path({str(matmul_model)!r}), Path({str(tmp_path)!r})))
        """
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    answers = {p.communicate(timeout=120)[0].strip() for p in processes}
    assert all(p.returncode == 0 for p in processes)
    assert len(answers) == 1
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [Path(answers.pop()).parent.name]


def test_another_model_gets_another_copy(matmul_model, tmp_path) -> None:
    model = onnx.load(matmul_model)
    model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.eye(WIDTH, dtype=np.float32), "W")
    )
    other = tmp_path / "other" / matmul_model.name
    other.parent.mkdir()
    onnx.save(model, other)
    assert prepacked_model(other, tmp_path / "copies") != prepacked_model(
        matmul_model, tmp_path / "copies"
    )


CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma {}\n\n"


@pytest.mark.parametrize(
    ("flag", "machine", "sums"),
    [
        ("", "x86_64", models.INT16_PAIR_SUMS),  # AVX2 alone: vpmaddubsw's saturating pairs
        ("avx512f avx512bw", "x86_64", models.INT16_PAIR_SUMS),  # AVX-512 without VNNI
        ("avx512_vnni", "x86_64", models.INT32_SUMS),
        ("avx_vnni", "x86_64", models.INT32_SUMS),
        ("amx_int8", "x86_64", models.INT32_SUMS),
        ("", "aarch64", models.INT32_SUMS),
    ],
)
def test_how_a_cpu_adds_int8_products_is_read_from_its_flags(flag, machine, sums) -> None:
    assert models.int8_sums(CPUINFO.format(flag), machine) == sums
    assert models.int8_sums("processor\t: 0\n", "x86_64") == models.UNKNOWN_SUMS


def _int8_store(
    root: Path, built: str, target: str = "cpu", int8: bool = True, weight_bits: int = 8
) -> Path:
    """The files a server start reads to judge its INT8 kernels: the search config, one
    version and its manifest."""
    import json

    (root / "search" / "1").mkdir(parents=True)
    (root / "search" / "config.pbtxt").write_text('name: "search"\n')
    graph = {"file": "model_int8.onnx", **({"weight_bits": 7} if weight_bits == 7 else {})}
    encoder = {"target": target, **({"int8": graph} if int8 else {})}
    manifest = {"version": 1, "encoder": encoder, "catalogue_embeddings": {"int8_sums": built}}
    (root / "manifests").mkdir()
    (root / "manifests" / "v1.json").write_text(json.dumps(manifest))
    return root


def test_a_server_warns_where_its_cpu_adds_int8_products_otherwise_than_the_builds(
    tmp_path, caplog
) -> None:
    from shopserve.server import warn_of_other_int8_sums

    store = _int8_store(tmp_path / "store", models.INT32_SUMS)
    with caplog.at_level("WARNING", logger="shopserve.server"):
        message = warn_of_other_int8_sums(store, models.INT16_PAIR_SUMS)
    assert message and "int32" in message and "int16 pairs" in message
    assert "Rebuild the store on this kind of machine" in caplog.text
    assert warn_of_other_int8_sums(store, models.INT32_SUMS) is None
    assert warn_of_other_int8_sums(store, models.UNKNOWN_SUMS) is None
    # TensorRT sums in INT32; FP32 has no INT8 products; 7-bit weights never saturate (builds
    # since 2026-12-05; earlier ones record no weight_bits and had 8)
    for kind in ({"target": "gpu"}, {"int8": False}, {"weight_bits": 7}):
        other = _int8_store(tmp_path / str(kind), models.INT32_SUMS, **kind)
        assert warn_of_other_int8_sums(other, models.INT16_PAIR_SUMS) is None
