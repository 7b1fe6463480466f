"""Personalisation scenarios: perf_analyzer with real shoppers on a store built with ``--events``.

Three scenarios are measured in one run, against one server, response cache off, so that their ratios
are taken within the run:

* ``search_anonymous``: ``search`` with real queries (the aisle names of products the log's shoppers
  bought);
* ``search_personal``: the same queries, each with the id of a shopper who bought in that aisle;
* ``recommend``: ``recommend`` for the log's shoppers, TOP_K 10.

Targets (issue: personalisation): ``recommend`` p99 at concurrency 1 below anonymous search's, and
personalised search p50 within 20 % of anonymous search's.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
from shopserve.ensemble import store
from shopserve.export.selfcheck import category_leaf

from shopserve.server import ServerConfig, TritonServer, free_ports

from . import perf_analyzer, variants
from .common import WORK_DIR, BenchmarkError, cpu_lock
from .tuning import HEADLINE

log = logging.getLogger("benchmarks.personal")

SCENARIOS = {
    "search_anonymous": store.SEARCH,
    "search_personal": store.SEARCH,
    "recommend": store.RECOMMEND,
}
TOP_K = 10
STEPS = 2000
CONCURRENCY = (1, 8)


def traffic(data: Path, steps: int = STEPS, seed: int = 0) -> list[tuple[str, str]]:
    """(shopper id, query) pairs: a shopper of the log and an aisle they bought in, at random."""
    items, events = data / "items.csv", data / "events.csv"
    if not items.exists() or not events.exists():
        raise BenchmarkError(f"{data} lacks items.csv and events.csv (make instacart-store)")
    with items.open(newline="") as handle:
        leaf = {
            row["product_id"]: category_leaf(row.get("category")) for row in csv.DictReader(handle)
        }
    aisles: dict[str, list[str]] = {}
    with events.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if leaf.get(row["product_id"]):
                aisles.setdefault(row["user_id"], []).append(leaf[row["product_id"]])
    if not aisles:
        raise BenchmarkError(f"{data}: no shopper bought a product with a category")
    rng = np.random.default_rng(seed)
    shoppers = sorted(aisles)
    pairs = []
    for _ in range(steps):
        shopper = shoppers[rng.integers(len(shoppers))]
        pairs.append((shopper, aisles[shopper][rng.integers(len(aisles[shopper]))]))
    return pairs


def input_data(scenario: str, pairs: list[tuple[str, str]], path: Path) -> Path:
    """perf_analyzer ``--input-data`` JSON for one scenario."""
    if scenario == "recommend":
        steps = [{"USER_ID": [user], "TOP_K": [TOP_K]} for user, _ in pairs]
    elif scenario == "search_personal":
        steps = [{"QUERY": [q], "TOP_K": [TOP_K], "USER_ID": [user]} for user, q in pairs]
    else:
        steps = [{"QUERY": [q], "TOP_K": [TOP_K]} for _, q in pairs]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": steps}, ensure_ascii=False))
    return path


def run(
    repository: Path,
    data: Path,
    out: Path,
    settings: perf_analyzer.Settings = perf_analyzer.DEFAULT_SETTINGS,
    concurrency: tuple[int, ...] = CONCURRENCY,
    steps: int = STEPS,
) -> dict:
    """Measure every scenario at every level on one server; write ``personal.json`` and return it."""
    wrapper = perf_analyzer.install()
    pairs = traffic(data, steps)
    variant = variants.materialize(
        HEADLINE.plus("personal", "the personalised store, response cache off"), repository
    )
    rows: dict[str, dict[int, dict]] = {}
    grpc_port, http_port, metrics_port = free_ports(3)
    config = ServerConfig(
        variant, grpc_port, http_port, metrics_port, work_dir=WORK_DIR / "triton" / "personal"
    )
    with TritonServer(config, log_file=WORK_DIR / "logs" / "personal.log") as server:
        for scenario, model in SCENARIOS.items():
            source = input_data(scenario, pairs, out / "raw" / f"{scenario}.json")
            rows[scenario] = {}
            for level in concurrency:
                with cpu_lock(f"personal {scenario} c={level}"):
                    row = perf_analyzer.measure(
                        wrapper,
                        server.grpc_url,
                        model,
                        source,
                        level,
                        out / "raw" / f"{scenario}-c{level}.csv",
                        settings,
                    )
                rows[scenario][level] = asdict(row)
    first = min(concurrency)
    anonymous = rows["search_anonymous"][first]
    result = {
        "repository": str(repository),
        "steps": steps,
        "concurrency": list(concurrency),
        "scenarios": rows,
        "targets": {
            "recommend_p99_over_search_p99_at_1": rows["recommend"][first]["p99_us"]
            / anonymous["p99_us"],
            "personal_p50_over_search_p50_at_1": rows["search_personal"][first]["p50_us"]
            / anonymous["p50_us"],
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "personal.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "personal.md").write_text(markdown(result))
    log.info("personalisation scenarios: %s", result["targets"])
    return result


def markdown(result: dict) -> str:
    lines = [
        "| scenario | concurrency | req/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for scenario, levels in result["scenarios"].items():
        for level, row in sorted(levels.items(), key=lambda item: int(item[0])):
            lines.append(
                f"| `{scenario}` | {level} | {row['throughput']:.0f} | {row['p50_us'] / 1e3:.1f} | "
                f"{row['p99_us'] / 1e3:.1f} |"
            )
    targets = result["targets"]
    lines += [
        "",
        f"- `recommend` p99 ÷ anonymous `search` p99 at concurrency 1: "
        f"{targets['recommend_p99_over_search_p99_at_1']:.2f} (target < 1)",
        f"- personalised ÷ anonymous `search` p50 at concurrency 1: "
        f"{targets['personal_p50_over_search_p50_at_1']:.2f} (target ≤ 1.20)",
    ]
    return "\n".join(lines) + "\n"
