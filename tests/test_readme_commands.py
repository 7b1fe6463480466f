"""The README's new-catalogue commands, run as written on a small cut of real data, then served.

Also the judgment-free gate end to end: a transferred ranker that does worse than the z-score fusion
on the catalogue checks is replaced by the fusion.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import CUT_PRODUCTS, CUT_QUERIES, PROJECT, documented_commands, export, write_cut
from shopserve.ensemble import store
from shopserve.ensemble.features import RANKER_FEATURES
from shopserve.export import qdq

pytestmark = pytest.mark.slow

MARKER = "<!-- new-catalogue commands"


def readme_commands() -> list[list[str]]:
    text = (PROJECT / "README.md").read_text()
    block = re.search(re.escape(MARKER) + r".*?```bash\n(.*?)```", text, re.S)
    assert block, "the README lost its new-catalogue commands"
    return [shlex.split(line) for line in block.group(1).splitlines() if line and line[0] != "#"]


@pytest.fixture(scope="module")
def workdir(module_folder, data_dir, built_repository) -> Path:
    """Run every README command in a folder holding the cut and a built Home Depot store."""
    directory = module_folder("readme")
    write_cut(data_dir, directory)
    (directory / "stores").mkdir()
    (directory / "stores" / "homedepot").symlink_to(built_repository)
    for command in readme_commands():
        if command[:2] == ["shopserve", "serve"]:
            continue  # served below on free ports, through the same launcher
        assert command[:3] == ["python", "-m", "shopserve.export"], command
        run = export(*command[3:], cwd=directory)
        assert run.returncode == 0, f"{shlex.join(command)}\n{run.stderr[-3000:]}"
        (directory / f"{command[3]}-{command[-1]}.out").write_text(run.stdout)
    return directory


def test_a_store_built_from_judgments(workdir) -> None:
    manifest = json.loads((workdir / "my_store" / "manifest.json").read_text())
    assert manifest["data"]["products"] == CUT_PRODUCTS
    assert manifest["data"]["queries"] == CUT_QUERIES
    assert manifest["ranker"]["selected_by"].startswith("dev judgments")
    assert manifest["ranker"]["training"]["lists"] > 0
    ranges = manifest["ranker"]["training"]["features"]
    assert [f["name"] for f in ranges] == list(RANKER_FEATURES)
    assert all(f["low"] <= f["high"] for f in ranges)
    evaluation = json.loads((workdir / "evaluate-judged.csv.out").read_text())
    assert evaluation["scope"].startswith("dev split")
    assert evaluation["served"]["queries"] == manifest["split"]["dev_queries"]


def test_a_catalogue_without_judgments_uses_none(workdir) -> None:
    manifest = json.loads((workdir / "my_shop" / "manifest.json").read_text())
    assert manifest["data"]["queries"] == 0 and list(manifest["data"]["files"]) == ["items.csv"]
    ranker = manifest["ranker"]
    assert ranker["source"].startswith("transferred from stores/homedepot/ranker/1/model.onnx")
    assert ranker["selected_by"].startswith("catalogue checks")
    checks = ranker["catalogue_checks"]["families"]["known_item"]
    assert checks["queries"] >= 300 and set(checks["ndcg10"]) == {"learned", "zscore_fusion"}
    for model in store.MODELS:  # the new folder got the shipped configs
        assert (workdir / "my_shop" / model / "config.pbtxt").exists()


def test_the_new_store_is_served(workdir, tmp_path) -> None:
    from shopserve.client import SearchClient

    from shopserve.server import ServerConfig, TritonServer, free_ports

    grpc_port, http_port, metrics_port = free_ports(3)
    config = ServerConfig(
        workdir / "my_shop", grpc_port, http_port, metrics_port, work_dir=tmp_path / "triton"
    )
    with (workdir / "items.csv").open() as handle:
        products = {int(r["product_id"]): r["title"] for r in csv.DictReader(handle)}
    with (
        TritonServer(config, log_file=tmp_path / "server.log") as server,
        SearchClient(server.grpc_url) as client,
    ):
        hits = client.search("cordless drill", top_k=5)
    assert len(hits) == 5
    assert all(products[hit.product_id] == hit.title for hit in hits)
    assert any("drill" in hit.title.lower() for hit in hits)


def test_a_worse_transferred_ranker_is_replaced_by_the_fusion(workdir) -> None:
    from shopserve.export.ranker import write_linear_ranker

    inverted = write_linear_ranker(
        workdir / "inverted.onnx", {"cosine": -1.0, "bm25_ratio": -1.0}, "inverted"
    )
    run = export(
        "build",
        "--catalogue",
        "items.csv",
        "--ranker",
        inverted,
        "--repository",
        "inverted_shop",
        cwd=workdir,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # The same encoder and catalogue as my_shop: its INT8 graph comes from the build cache.
    assert "INT8 Q/DQ graph from the cache" in run.stderr
    graphs = [
        workdir / shop / "encoder" / "1" / "model_int8.onnx"
        for shop in ("my_shop", "inverted_shop")
    ]
    assert graphs[0].read_bytes() == graphs[1].read_bytes()
    inverted = json.loads((workdir / "inverted_shop" / "manifest.json").read_text())
    # ... and so do its catalogue embeddings.
    embedded = inverted["catalogue_embeddings"]
    assert (embedded["embedded"], embedded["from_cache"]) == (0, embedded["distinct_titles"])
    ranker = inverted["ranker"]
    scores = ranker["selection_ndcg10"]
    assert scores["learned"] < scores["zscore_fusion"] and ranker["selected"] == "zscore_fusion"
    served = workdir / "inverted_shop" / "ranker" / "1" / "model.onnx"
    from shopserve.export.monotone import read_contract

    assert read_contract(served)["form"] == "zscore_fusion"


def test_a_failed_build_leaves_no_folder(workdir) -> None:
    run = export(
        "build",
        "--catalogue",
        "items.csv",
        "--ranker",
        "no_such_ranker.onnx",
        "--repository",
        "never_built",
        cwd=workdir,
    )
    assert run.returncode == 1 and "no_such_ranker.onnx does not exist" in run.stderr
    assert not (workdir / "never_built").exists()
    assert not list(workdir.glob(".never_built*"))


def served_catalogue_updates(workdir: Path, rows: list[dict], fresh: str) -> tuple[str, float]:
    """A catalogue log as a server writes it (an added product, a changed title, a delete),
    exported by ``shopserve catalogue export``: the file and its records' latest time."""
    import numpy as np
    from shopserve.ensemble.catalogue import parse_update
    from shopserve.ensemble.catalogue_log import SqliteCatalogueLog

    from shopserve.cli import main as shopserve

    update = parse_update(
        np.array([b"fold-1"], dtype=np.object_),
        np.array([b"upsert", b"upsert", b"delete"], dtype=np.object_),
        np.array([990_000_100, int(rows[5]["product_id"]), int(rows[7]["product_id"])]),
        np.array(
            [f"Folded new product {fresh}".encode(), f"Folded new title {fresh}".encode(), b""],
            dtype=np.object_,
        ),
    )
    log = SqliteCatalogueLog(workdir / "served" / "catalogue.sqlite")
    try:
        log.append(update, np.full((2, 4), 0.5, dtype=np.float32), "served-encoder")
        through = max(record.logged_at for record in log.records())
    finally:
        log.close()
    served = str(workdir / "served" / "catalogue.sqlite")
    exported = workdir / "served" / "updates.csv"
    assert shopserve(["catalogue", "export", str(exported), "--catalogue-log", served]) == 0
    return str(exported), through


def test_a_catalogue_refresh_reuses_the_encoder_and_embeds_only_what_changed(workdir) -> None:
    with (workdir / "items.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    changed = range(0, len(rows), 100)  # 1 % of the titles
    fresh = uuid.uuid4().hex[:8]  # titles no earlier run put in the (shared) embedding cache
    for i in changed:
        rows[i]["title"] += f" (refreshed {fresh})"
    with (workdir / "items_refreshed.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    updates, through = served_catalogue_updates(workdir, rows, fresh)
    refresh = ["--catalogue", "items_refreshed.csv", "--judgments", "judged.csv"]
    run = export(
        "build", *refresh, "--catalogue-log", updates, "--encoder-from", "my_store",
        "--repository", "refreshed", cwd=workdir,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((workdir / "refreshed" / "manifest.json").read_text())
    source = json.loads((workdir / "my_store" / "manifest.json").read_text())
    embedded = manifest["catalogue_embeddings"]
    # 1 % of the titles changed in the file, and two more by the served updates folded in
    assert embedded["embedded"] == len(changed) + 2 == CUT_PRODUCTS // 100 + 2
    assert embedded["from_cache"] == embedded["distinct_titles"] - len(changed) - 2
    assert manifest["catalogue_log"] == {
        "upserts": 2, "deletes": 1, "through": through, "products": CUT_PRODUCTS,
    }  # fmt: skip
    built = store.load_catalogue(workdir / "refreshed")
    titles = dict(zip(built.product_ids.tolist(), built.titles, strict=True))
    assert titles[990_000_100] == f"Folded new product {fresh}"
    assert titles[int(rows[5]["product_id"])] == f"Folded new title {fresh}"
    assert int(rows[7]["product_id"]) not in titles and built.log_through == through
    encoder = manifest["encoder"]
    assert encoder["reused_from"] == {
        "repository": str((workdir / "my_store").resolve()),
        "version": 1,
    }
    assert encoder["finetune"] == source["encoder"]["finetune"]
    assert encoder["int8"]["gate"]["passed"]
    assert (
        "fine-tune encoder" not in manifest["timings_s"]
        and "reuse encoder" in manifest["timings_s"]
    )
    for name in ("model_fp32.onnx", "model_int8.onnx", "model_int8.onnx.data"):
        assert manifest["files"][f"encoder/1/{name}"] == source["files"][f"encoder/1/{name}"]

    # A store built before INT8 weights had 7 bits (its manifest has no weight_bits) gives its
    # fine-tuned FP32 graph, which the refresh quantizes again with 7-bit weights.
    shutil.copytree(workdir / "my_store", workdir / "old_store")
    for path in (
        workdir / "old_store" / "manifest.json",
        workdir / "old_store" / "manifests" / "v1.json",
    ):
        old = json.loads(path.read_text())
        del old["encoder"]["int8"]["weight_bits"]
        path.write_text(json.dumps(old))
    run = export(
        "build", *refresh, "--encoder-from", "old_store", "--repository", "requantized", cwd=workdir
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        "its INT8 graph has 8-bit weights, this build quantizes its FP32 graph again" in run.stderr
    )
    manifest = json.loads((workdir / "requantized" / "manifest.json").read_text())
    encoder = manifest["encoder"]
    assert encoder["int8"]["weight_bits"] == 7 and encoder["int8"]["gate"]["passed"]
    assert (
        encoder["reused_from"]["version"] == 1
        and encoder["finetune"] == source["encoder"]["finetune"]
    )
    assert "quantize encoder (static INT8, Q/DQ)" in manifest["timings_s"]
    assert (
        manifest["files"]["encoder/1/model_fp32.onnx"]
        == source["files"]["encoder/1/model_fp32.onnx"]
    )
    graph = workdir / "requantized" / "encoder" / "1" / "model_int8.onnx"
    assert qdq.qdq_model_problems(graph, tensorrt=False) == []  # no weight beyond 7 bits

    # A fine-tuned encoder is not reused on another split: its train queries could be dev queries.
    run = export(
        "build",
        *refresh,
        "--seed",
        "14",
        "--encoder-from",
        "my_store",
        "--repository",
        "resplit",
        cwd=workdir,
    )
    assert run.returncode == 1 and "another train/dev split" in run.stderr
    assert not (workdir / "resplit").exists()


def test_the_documented_cpu_kinds_check_runs(workdir, tmp_path) -> None:
    """docs/serving.md's command on the README's store, without the emulator (CI has no QEMU):
    both embeddings native, so every row is identical (the script's own check)."""
    (command,) = documented_commands("serving.md", "cpu-kinds")
    assert command[:2] == ["python", "benchmarks/cpu_kinds.py"], command
    swap = {"STORE": workdir / "my_store", "cpu_kinds.json": tmp_path / "cpu_kinds.json"}
    argv = [sys.executable, *[str(swap.get(word, word)) for word in command[1:]]]
    done = subprocess.run(
        [*argv, "--emulator", "", "--texts", "40"], cwd=PROJECT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "cpu_kinds.json").read_text())
    assert report["weight_bits"] == 7 and report["texts"] == 40
    assert report["identical_rows"] == 40 and report["cosine"]["min"] == pytest.approx(1.0)
