"""A shop too small, or with too little history, to build stops before any work is spent on it,
with a message that says what it has and what it needs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import export
from shopserve.ensemble import store
from shopserve.export.build import (
    CPU,
    FP32,
    FP32_ENCODER_FILE,
    FP32_SERVED,
    INT8,
    BuildError,
    BuildOptions,
    _reuse_encoder,
)
from shopserve.export.data import CatalogueData, load_events
from shopserve.export.history import split_users, timelines
from shopserve.export.personalize import ThinHistoryError, _check_history


def write_catalogue(path, products: int) -> None:
    rows = "".join(f"{i},Product number {i}\n" for i in range(1, products + 1))
    path.write_text("product_id,title\n" + rows)


def test_a_catalogue_too_small_to_gate_the_int8_encoder_is_refused(tmp_path) -> None:
    write_catalogue(tmp_path / "items.csv", 1300)
    run = export("build", "--catalogue", tmp_path / "items.csv", "--repository", tmp_path / "shop")
    assert run.returncode == 1, run.stderr[-2000:]
    assert (
        "error: too few texts for the INT8 encoder: its accuracy gate needs 1000 real texts (titles "
        "and judged queries) and its calibration 768 others, but 1300 titles and 0 judged queries "
        "give 1000 and 300. A catalogue of at least 1768 products builds"
    ) in run.stderr
    assert not (tmp_path / "shop").exists()


def test_a_catalogue_too_small_to_measure_the_index_recall_on_is_refused(tmp_path) -> None:
    write_catalogue(tmp_path / "items.csv", 400)
    run = export(
        "build", "--catalogue", tmp_path / "items.csv", "--repository", tmp_path / "shop",
        "--encoder-precision", "fp32",
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]
    assert (
        "error: too few texts to measure the HNSW index's recall: it needs 500 (dev queries and "
        "titles), but 400 titles and 0 dev queries give 400"
    ) in run.stderr
    assert not (tmp_path / "shop").exists()


def test_judgments_that_leave_no_dev_query_are_refused(tmp_path) -> None:
    write_catalogue(tmp_path / "items.csv", 2000)
    (tmp_path / "judged.csv").write_text("query,product_id,relevance\ndrill,1,3\ndrill,2,1\n")
    run = export(
        "build",
        "--catalogue",
        tmp_path / "items.csv",
        "--judgments",
        tmp_path / "judged.csv",
        "--repository",
        tmp_path / "shop",
    )
    assert run.returncode == 1, run.stderr[-2000:]
    assert (
        "error: 1 judged queries split into 1 for training and 0 for evaluation (--dev-fraction "
        "0.2); each part needs at least one"
    ) in run.stderr


@pytest.mark.parametrize(
    ("baskets", "shoppers", "refused"),
    [(1, 20, True), (3, 1, True), (3, 20, False)],
    ids=["one basket each", "a single shopper", "repeat shoppers"],
)
def test_recommendations_need_repeat_shoppers_in_both_parts(
    tmp_path, baskets: int, shoppers: int, refused: bool
) -> None:
    path = tmp_path / "events.csv"
    rows = [
        f"u{user},{1 + (user + basket) % 4},{100 * basket + user},purchase,b{basket}"
        for user in range(shoppers)
        for basket in range(baskets)
    ]
    path.write_text("user_id,product_id,timestamp,event,basket_id\n" + "\n".join(rows) + "\n")
    catalogue = CatalogueData(np.arange(1, 5, dtype=np.int64), ["a", "b", "c", "d"])
    events = load_events(path, catalogue)
    lines = timelines(events)
    train, validation = split_users(events, lines, 0.2, seed=13)
    if not refused:
        _check_history(lines, train, validation)
        return
    with pytest.raises(ThinHistoryError, match="too little purchase history for recommendations"):
        _check_history(lines, train, validation)


def _fine_tuned_source(root, judgments, weight_bits: int | None = 7) -> None:
    """A built repository whose version 1 has an encoder fine-tuned on ``judgments`` (INT8 weights
    of ``weight_bits``; None: a build from before the manifest said, which had 8)."""
    files = {}
    for name in (FP32_ENCODER_FILE, "model_int8.onnx"):
        path = root / store.ENCODER / "1" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
        files[f"{store.ENCODER}/1/{name}"] = store.file_digest(path)
    manifest = {
        "version": 1,
        "encoder": {
            "target": CPU,
            "finetune": {"epochs": 1},
            "int8": {"file": "model_int8.onnx"}
            | ({} if weight_bits is None else {"weight_bits": weight_bits}),
        },
        "split": {"seed": 13, "dev_fraction": 0.2},
        "data": {"files": {"judged.csv": store.file_digest(judgments)}},
        "files": files,
    }
    (root / "manifests").mkdir()
    (root / "manifests" / "v1.json").write_text(json.dumps(manifest))
    (root / store.MANIFEST_FILE).write_text(json.dumps(manifest))


def test_a_fine_tuned_encoder_is_reused_only_where_no_dev_query_could_be_its_train_query(
    tmp_path,
) -> None:
    tuned_on, other = tmp_path / "judged.csv", tmp_path / "other.csv"
    tuned_on.write_text("query,product_id,relevance\ndrill,1,3\n")
    other.write_text("query,product_id,relevance\nhammer,1,3\n")
    _fine_tuned_source(tmp_path / "source", tuned_on)

    def reuse(judgments, seed: int = 13) -> dict:
        options = BuildOptions(
            tmp_path / "items.csv", judgments, tmp_path / "shop", seed=seed,
            encoder_from=tmp_path / "source",
        )  # fmt: skip
        destination = tmp_path / "encoder"
        destination.mkdir(exist_ok=True)
        return _reuse_encoder(options, destination)

    for judgments, seed in ((other, 13), (tuned_on, 14)):
        with pytest.raises(BuildError, match="fine-tuned on other judgments or another"):
            reuse(judgments, seed)
    assert reuse(tuned_on)["reused_from"]["version"] == 1
    assert reuse(None)["reused_from"]["version"] == 1  # another shop, no judgments: no dev queries
    assert (tmp_path / "encoder" / FP32_ENCODER_FILE).read_bytes() == FP32_ENCODER_FILE.encode()


def test_an_fp32_build_reuses_only_the_fp32_graph_and_an_int8_build_needs_an_int8_source(
    tmp_path,
) -> None:
    judgments = tmp_path / "judged.csv"
    judgments.write_text("query,product_id,relevance\ndrill,1,3\n")
    _fine_tuned_source(tmp_path / "source", judgments)

    def reuse(precision: str, source: str = "source") -> dict:
        options = BuildOptions(
            tmp_path / "items.csv", None, tmp_path / "shop", encoder_precision=precision,
            encoder_from=tmp_path / source,
        )  # fmt: skip
        destination = tmp_path / f"encoder-{precision}-{source}"
        destination.mkdir()
        record = _reuse_encoder(options, destination)
        assert {p.name for p in destination.iterdir()} == {FP32_ENCODER_FILE} | (
            {"model_int8.onnx"} if precision == INT8 else set()
        )
        return record

    fp32 = reuse(FP32)
    assert "int8" not in fp32 and fp32["served"] == FP32_SERVED
    assert reuse(INT8)["int8"]["file"] == "model_int8.onnx"
    # An INT8 graph with 8-bit weights (built before 7-bit ones) is not copied: the build quantizes
    # the FP32 graph again (docs/serving.md#int8-and-the-cpu).
    _fine_tuned_source(tmp_path / "old-source", judgments, weight_bits=None)
    options = BuildOptions(
        tmp_path / "items.csv", None, tmp_path / "shop", encoder_from=tmp_path / "old-source"
    )
    (tmp_path / "from-old").mkdir()
    record = _reuse_encoder(options, tmp_path / "from-old")
    assert "int8" not in record and record["reused_from"]["version"] == 1
    assert [p.name for p in (tmp_path / "from-old").iterdir()] == [FP32_ENCODER_FILE]
    # A store that serves its FP32 graph has no INT8 graph to give.
    (tmp_path / "fp32-source" / "manifests").mkdir(parents=True)
    for path in (tmp_path / "fp32-source" / "manifests" / "v1.json",
                 tmp_path / "fp32-source" / store.MANIFEST_FILE):  # fmt: skip
        path.write_text(json.dumps({"version": 1, "encoder": fp32, "files": {}}))
    with pytest.raises(BuildError, match="has no INT8 graph to reuse: build with --encoder-prec"):
        reuse(INT8, "fp32-source")
