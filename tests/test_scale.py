"""The scale scenario's arithmetic and report (benchmarks/scale.py); the scenario itself runs for
hours and is not part of make test."""

from __future__ import annotations

from benchmarks.scale import TARGETS, markdown, plot, ratios

MACHINE = {"git_commit": "abc1234", "date_utc": "2026-12-01T00:00:00Z"}


def run_of(products: int, build_s: float, p99_ms: float, throughput: float) -> dict:
    return {
        "products": products,
        "build_s": {"embed catalogue": build_s / 2, "dense index": build_s / 2, "total": build_s},
        "disk_bytes": {"dense_index": 2**20, "lexical_index": 2**20, "catalogue": 2**20},
        "serving": {
            "pss_mib": 700.0,
            "rss_mib": 1200.0,
            "p50_c1_ms": p99_ms / 2,
            "p99_c1_ms": p99_ms,
            "throughput_c8": throughput,
        },
        "quality": {"ndcg10_real": 0.5, "ndcg10_all": 0.4},
    }


def test_ratios_are_against_the_55k_store_and_the_report_shows_them(tmp_path) -> None:
    baseline = run_of(54_667, 100.0, 8.0, 200.0)
    million = run_of(1_000_000, 2000.0, 12.0, 150.0)
    against = ratios(baseline, million)
    assert against == {
        "p99_c1": 1.5,
        "throughput_c8": 0.75,
        "build_s": 20.0,
        "products": 1_000_000 / 54_667,
    }
    for entry in (baseline, million):
        entry["against_55k"] = ratios(baseline, entry)
    result = {"machine": MACHINE, "targets": TARGETS, "runs": [baseline, million]}
    text = markdown(result)
    assert "Commit abc1234" in text and "| 54,667 | 1,000,000 |" in text
    assert "| embed catalogue | 50.0 | 1000.0" in text
    assert "| p99 at concurrency 1 | ≤ 2.0× | 1.00× | 1.50× |" in text
    assert "| throughput at concurrency 8 | ≥ 0.5× | 1.00× | 0.75× |" in text
    assert "| build time | ≤ 25.0× | 1.00× | 20.00× |" in text
    assert plot(result, tmp_path / "scale.png").stat().st_size > 10_000
