"""CI smoke of the performance harness (benchmarks/): seconds of every part, so it cannot rot.

perf_analyzer at concurrency 1 against the session's server, the FastAPI + PyTorch baseline (on the
shipped index's vectors, so no FP32 cache is needed) under the closed-loop load generator, the ceiling,
agreement, and the report with its plot. The full sweep (`make bench`) is not a test.
"""

from __future__ import annotations

import sys

import pytest
from conftest import PROJECT
from shopserve.ensemble import store

pytestmark = [pytest.mark.slow, pytest.mark.server]

if str(PROJECT) not in sys.path:  # benchmarks/ is a directory of the project, not installed
    sys.path.insert(0, str(PROJECT))


def test_benchmark_smoke(server, built_repository, tmp_path) -> None:
    from benchmarks.run import smoke

    results = smoke(tmp_path, built_repository, server.grpc_url, server.http_url)

    rows = {(m["system"], m["driver"]): m for m in results["runs"][0]["measurements"]}
    assert set(rows) == {
        ("ensemble", "perf_analyzer"),
        ("fastapi_torch", "loadgen"),
    }
    for row in rows.values():
        assert row["concurrency"] == 1
        assert row["throughput"] > 0
        assert 0 < row["p50_us"] <= row["p99_us"]
    served = rows[("ensemble", "perf_analyzer")]
    assert set(served["steps"]) == {store.SEARCH}  # one model serves a request, no step models
    assert served["steps"][store.SEARCH]["requests"] > 0
    assert 0 < served["steps"][store.SEARCH]["total_us"] < served["avg_us"]
    assert results["runs"][0]["ceiling"][0]["throughput"] > 0
    (pair,) = results["agreement"]["pairs"]
    assert pair["overlap"] > 0.5  # same lexical side, FP32 vs INT8 dense side
    assert (tmp_path / "raw" / "run1" / "ensemble_c1.csv").exists()
    summary = (tmp_path / "summary.md").read_text()
    assert "## Throughput and latency" in summary
    assert (tmp_path / "throughput_p99.png").stat().st_size > 10_000
