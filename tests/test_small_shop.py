"""A shop too small to calibrate and gate the INT8 encoder serves the FP32 one
(``--encoder-precision fp32``): built, served, rolled back and forward like any other store, and
never mixed with INT8 versions in one repository."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import ADMIN_KEY, export, start_server
from shopserve.client import AsyncSearchClient, SearchClient, Security
from shopserve.ensemble import SearchPipeline, store
from shopserve.export.build import FP32_ENCODER_FILE
from shopserve.export.cut import cut_homedepot

from shopserve.rollout import Rollout

pytestmark = [pytest.mark.slow, pytest.mark.server]

QUERIES = ["cordless drill", "deck paint", "shower head", "garden hose", "ceiling fan", "lamp"]


def _build(items, judgments, repository, version: int, *more: object):
    return export(
        "build", "--catalogue", items, "--judgments", judgments, "--repository", repository,
        "--version", version, "--encoder-precision", "fp32", *more,
    )  # fmt: skip


def _answers(repository, version: int) -> dict[str, list[int]]:
    pipeline = SearchPipeline.from_repository(repository, version)
    return {q: pipeline.search(q, 10).product_ids.tolist() for q in QUERIES}


def _served(server) -> dict[str, list[int]]:
    with SearchClient(server.grpc_url, timeout=10) as client:
        return {q: [h.product_id for h in client.search(q, 10)] for q in QUERIES}


async def _served_async(server) -> dict[str, list[int]]:
    # At most 4 in flight (the client's default): `search` sheds a burst beyond its queue of 4
    # and its instances (docs/serving.md, Overload), and 6 at once met a full queue once in CI.
    async with AsyncSearchClient(server.grpc_url, timeout=10) as client:
        hits = await client.search_many(QUERIES, 10)
    return {q: [h.product_id for h in found] for q, found in zip(QUERIES, hits, strict=True)}


def test_a_small_shop_serves_its_fp32_encoder_through_a_rollback(tmp_path, data_dir) -> None:
    items, judgments = cut_homedepot(data_dir, tmp_path / "data", 120, 600)
    repository = tmp_path / "store"
    refused = export("build", "--catalogue", items, "--judgments", judgments,
                     "--repository", repository)  # fmt: skip
    assert refused.returncode == 1 and "build with --encoder-precision fp32" in refused.stderr

    run = _build(items, judgments, repository, 1, "--finetune-minutes", 0.2)
    assert run.returncode == 0, run.stderr[-3000:]
    # Version 2 reuses version 1's encoder and serves another efSearch.
    run = _build(items, judgments, repository, 2, "--encoder-from", repository, "--ef-search", 512)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((repository / store.MANIFEST_FILE).read_text())
    assert (
        manifest["encoder"]["served"].startswith(FP32_ENCODER_FILE)
        and "int8" not in manifest["encoder"]
    )
    assert manifest["encoder"]["reused_from"]["version"] == 1
    for version in (1, 2):
        assert store.model_file(repository, store.ENCODER, version).name == FP32_ENCODER_FILE
        assert store.model_file(repository, store.ENCODER, version).exists()
    # An INT8 version cannot join them: Triton names the served file once for every version.
    mixed = export("build", "--catalogue", items, "--judgments", judgments,
                   "--repository", repository, "--version", 3)  # fmt: skip
    assert mixed.returncode == 1
    assert "its versions [1, 2] serve the encoder as model_fp32.onnx" in mixed.stderr
    assert not (repository / store.ENCODER / "3").exists()

    answers = {version: _answers(repository, version) for version in (1, 2)}
    with (
        start_server(repository, tmp_path / "serve") as server,
        Rollout(server.grpc_url, Security(admin_key=ADMIN_KEY)) as control,
    ):
        assert control.live_versions()[store.SEARCH] == [2]
        assert _served(server) == answers[2]
        live = control.roll_to(repository, 1)
        assert all(versions == [1] for versions in live.values()), live
        assert _served(server) == answers[1]
        assert asyncio.run(_served_async(server)) == answers[1]
        assert control.roll_to(repository, 2)[store.SEARCH] == [2]
        assert _served(server) == answers[2]
