"""The release build's outputs: manifest, accuracy gate, index quality, evaluation numbers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from conftest import copy_source_repository, export
from onnx import numpy_helper
from shopserve.ensemble import store
from shopserve.ensemble.models import OnnxEncoder, int8_sums
from shopserve.ensemble.pipeline import load_tokenizer
from shopserve.export import qdq
from shopserve.export.build import CPU_INT8_ENCODER_FILE, FP32_ENCODER_FILE
from shopserve.export.data import load_catalogue
from shopserve.export.quantize import AccuracyGateError, accuracy_gate

pytestmark = pytest.mark.slow


def test_manifest_records_versions_checksums_data_and_split(built_repository, manifest, data_dir):
    assert manifest["models"] == {m: 1 for m in store.MODELS}
    for relative, digest in manifest["files"].items():
        assert hashlib.sha256((built_repository / relative).read_bytes()).hexdigest() == digest
    assert "encoder/1/model_int8.onnx" in manifest["files"]
    assert "encoder/1/model_int8.onnx.data" in manifest["files"]  # its weights, mapped when served
    assert manifest["data"]["products"] == 54_667
    expected = hashlib.sha256((data_dir / "judgments.csv").read_bytes()).hexdigest()
    assert manifest["data"]["files"]["judgments.csv"] == expected
    split = manifest["split"]
    assert split["seed"] == 13 and split["train_queries"] + split["dev_queries"] == 10_617
    assert manifest["timings_s"]["total"] > 0 and manifest["built_at"]


def test_encoder_finetuning_export_and_int8_gate_hold(built_repository, manifest):
    encoder = manifest["encoder"]
    int8 = encoder["int8"]
    assert int8["file"] == CPU_INT8_ENCODER_FILE and encoder["served"].startswith(int8["file"])
    assert int8["weights_file"] == CPU_INT8_ENCODER_FILE + ".data"
    assert len(int8["fp32_matmuls"]) < 12  # most of the 48 MatMuls, if not all, run in INT8
    assert int8["weight_bits"] == 7  # summed alike with and without VNNI (docs/serving.md)
    graph = store.latest_version_dir(built_repository, store.ENCODER) / int8["file"]
    assert qdq.qdq_model_problems(graph, tensorrt=False) == []
    assert encoder["export"]["max_abs_diff"] <= 1e-4 and encoder["export"]["texts_checked"] >= 500
    finetune = encoder["finetune"]
    assert finetune["steps"] > 0 and finetune["train_queries"] == manifest["split"]["train_queries"]
    assert len(finetune["data_fingerprint"]) == 64 and finetune["options"]["seed"] == 13
    before_after = encoder["dev_rerank_ndcg10"]
    assert before_after["finetuned"] > before_after["base"]
    gate = encoder["int8"]["gate"]
    assert gate["passed"] and gate["texts"] >= 1000 and gate["mean_cosine"] >= 0.99
    assert gate["relative_ndcg_drop"] <= 0.01 and gate["queries"] >= 2000
    # how this CPU adds INT8 products, which a server on another kind warns of
    assert manifest["catalogue_embeddings"]["int8_sums"] == int8_sums()


def test_the_manifest_carries_the_audit_of_the_dev_queries(manifest):
    """Every build with judgments audits its dev queries (docs/fairness.md)."""
    audit = manifest["audit"]
    assert audit["queries"] == manifest["split"]["dev_queries"]
    assert audit["group_kind"].startswith("brand") and audit["groups_shown"] <= audit["groups"]
    for entry in audit["metrics"].values():
        assert entry["ci95"] is None or entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
    ranker = manifest["ranker"]  # the served graph's nDCG@10, as the build measured it
    served = ranker["selection_ndcg10"][ranker["selected"]]
    assert audit["metrics"]["ndcg_at_10"]["value"] == pytest.approx(served, abs=0.002)


def test_ann_index_recall(manifest):
    assert manifest["dense_index"]["recall"] >= 0.98 and manifest["dense_index"]["queries"] >= 500


def test_served_system_beats_every_baseline_on_the_full_catalogue(manifest):
    evaluation = manifest["evaluation"]
    systems = evaluation["systems"]
    served = systems["encoder_ranker"]
    assert evaluation["queries"] >= 2000
    for baseline in ("bm25", "encoder", "zscore_fusion"):
        assert served["ndcg10"] > systems[baseline]["ndcg10"], baseline
    for baseline in ("bm25", "encoder"):
        assert served["recall100"] > systems[baseline]["recall100"], baseline
    # Zero-shot MiniLM was far behind BM25 on these data (0.291 against 0.370); fine-tuned on the
    # train queries it closes most of that gap (0.358), and the fusion beats both.
    assert systems["encoder"]["ndcg10"] > 0.33
    assert systems["zscore_fusion"]["ndcg10"] > systems["bm25"]["ndcg10"]
    assert served["rerank_ndcg10"] > evaluation["random_rerank_ndcg10"]


def _corrupted_copy(source, destination, noise: float) -> None:
    """The FP32 encoder with Gaussian noise on every weight matrix: a deliberately broken model."""
    model = onnx.load(str(source))
    rng = np.random.default_rng(0)
    for initializer in model.graph.initializer:
        weights = numpy_helper.to_array(initializer)
        if weights.ndim == 2 and weights.dtype == np.float32:
            noisy = weights + rng.normal(0, noise * weights.std(), weights.shape).astype(np.float32)
            initializer.CopyFrom(numpy_helper.from_array(noisy, initializer.name))
    onnx.save(model, str(destination))


def test_gate_stops_a_degraded_model(built_repository, data_dir, tmp_path):
    encoder_dir = store.latest_version_dir(built_repository, store.ENCODER)
    broken = tmp_path / "broken.onnx"
    _corrupted_copy(encoder_dir / FP32_ENCODER_FILE, broken, noise=0.5)
    tokenizer = load_tokenizer(built_repository)
    texts = load_catalogue(data_dir / "products.csv").titles[:1000]
    reference = OnnxEncoder(encoder_dir / FP32_ENCODER_FILE, 2).embed_texts(tokenizer, texts)
    degraded = OnnxEncoder(broken, 2).embed_texts(tokenizer, texts)
    ndcg = {"fp32": 0.60, "int8": 0.55}
    with pytest.raises(AccuracyGateError, match=r"mean cosine to FP32 is 0\.\d+ on 1000 texts"):
        accuracy_gate(reference, degraded, ndcg.get, queries=100)
    with pytest.raises(AccuracyGateError, match=r"nDCG@10 fell 8\.33%"):
        accuracy_gate(reference, reference, ndcg.get, queries=100)
    int8 = OnnxEncoder(encoder_dir / CPU_INT8_ENCODER_FILE, 2).embed_texts(tokenizer, texts)
    assert accuracy_gate(reference, int8, {"fp32": 0.6, "int8": 0.6}.get, queries=100).passed


def test_evaluate_command_reproduces_the_build_numbers(
    built_repository, manifest, data_dir, tmp_path
):
    output = tmp_path / "eval.json"
    run = export(
        "evaluate", "--repository", built_repository, "--data", data_dir, "--output", output
    )
    assert run.returncode == 0, run.stderr[-3000:]
    reproduced = json.loads(output.read_text())["served"]
    built = manifest["evaluation"]
    assert reproduced["queries"] == built["queries"]
    for name, metrics in built["systems"].items():
        for metric, value in metrics.items():
            assert reproduced["systems"][name][metric] == pytest.approx(value, abs=2e-3), (
                name,
                metric,
            )


def test_build_stops_at_the_gate_with_every_matmul_in_signed_int8(data_dir, tmp_path):
    """TensorRT's signed symmetric Q/DQ graph with no MatMul left in FP32 reaches about 0.98
    mean cosine on MiniLM (measured: 0.9815 on the base encoder; 0.986 once fine-tuned): below the
    gate, so the build stops and writes nothing. The encoder is not fine-tuned here: the gate, not
    the training, is under test."""
    repository = copy_source_repository(tmp_path / "model_repository")
    run = export(
        "build",
        "--data",
        data_dir,
        "--repository",
        repository,
        "--target",
        "gpu",
        "--int8-fp32-matmuls",
        "0",
        "--no-finetune",
    )
    assert run.returncode == 1
    assert "error: INT8 accuracy gate failed: mean cosine to FP32 is 0.9" in run.stderr
    assert not (repository / "manifest.json").exists()


def test_evaluate_accepts_any_judgments_file_in_the_same_columns(
    built_repository, data_dir, tmp_path
):
    import csv

    from shopserve.export.reproduce import evaluate_repository

    with (data_dir / "judgments.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    queries = list(dict.fromkeys(r["search_term"] for r in rows))[:150]
    subset = tmp_path / "my_judgments.csv"
    with subset.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["query", "product_id", "relevance"])
        writer.writerows(
            (r["search_term"], r["product_uid"], r["relevance"])
            for r in rows
            if r["search_term"] in queries
        )
    result = evaluate_repository(built_repository, subset)
    assert result["scope"].startswith("all queries") and result["served"]["queries"] == 150
    assert 0 < result["served"]["systems"]["encoder_ranker"]["ndcg10"] <= 1
