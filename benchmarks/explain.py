"""``python -m benchmarks explain``: what EXPLAIN costs, with perf_analyzer on real servers.

Each endpoint is measured with and without EXPLAIN on the same server, in turn, ROUNDS times:

* ``search``: the Home Depot store, the log's real queries (first server);
* ``search_personal`` and ``recommend``: the personalised Instacart store, the log's shoppers and
  the aisles they bought in (second server; the traffic of ``benchmarks.personal``).

Targets (issue 20): with EXPLAIN on, p99 at concurrency 1 within 30 % of off. Off is the same code
path as before EXPLAIN existed but for one flag check; its throughput at concurrency 8 is reported
beside on's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
from shopserve.ensemble import store

from shopserve.server import ServerConfig, TritonServer, free_ports

from . import machine, perf_analyzer, personal, variants
from .common import WORK_DIR, cpu_lock, write_results
from .queries import load_traffic
from .tuning import HEADLINE

log = logging.getLogger("benchmarks.explain")

CONCURRENCY = (1, 8)
ROUNDS = 3
QUERIES = 2000
P99_TARGET = 1.30  # on ÷ off at concurrency 1


def _input_files(
    scenario: str, home_depot: list[str], shoppers: list[tuple[str, str]], folder: Path
) -> dict[bool, Path]:
    """perf_analyzer input data for the scenario, off and on."""
    if scenario == "search":
        steps = [{"QUERY": [q], "TOP_K": [personal.TOP_K]} for q in home_depot]
    else:
        steps = personal.steps(scenario, shoppers)
    files = {}
    for explain in (False, True):
        data = [{**step, "EXPLAIN": [True]} if explain else step for step in steps]
        path = folder / f"{scenario}-{'on' if explain else 'off'}.json"
        path.write_text(json.dumps({"data": data}, ensure_ascii=False))
        files[explain] = path
    return files


SERVERS = {"search": ("search",), "personal": ("search_personal", "recommend")}
MODELS = {"search": store.SEARCH, "search_personal": store.SEARCH, "recommend": store.RECOMMEND}


def run(
    repository: Path,
    personal_repository: Path,
    data: Path,
    out: Path,
    settings: perf_analyzer.Settings = perf_analyzer.DEFAULT_SETTINGS,
    rounds_count: int = ROUNDS,
    queries: int = QUERIES,
) -> dict:
    """Measure each scenario off and on, alternating, on one server per store; write
    ``explain.json`` and ``explain.md`` and return the result."""
    wrapper = perf_analyzer.install()
    manifest = json.loads((repository / store.MANIFEST_FILE).read_text())
    home_depot = load_traffic(manifest, queries).queries
    shoppers = personal.traffic(data)
    raw = out / "raw" / "explain"
    raw.mkdir(parents=True, exist_ok=True)
    measured: dict[str, dict[str, list[dict]]] = {}
    for server_name, source in (("search", repository), ("personal", personal_repository)):
        variant = variants.materialize(
            HEADLINE.plus(f"explain-{server_name}", "as shipped, response cache off"), source
        )
        config = ServerConfig(variant, *free_ports(3), work_dir=WORK_DIR / "triton" / "explain")
        with TritonServer(
            config, log_file=WORK_DIR / "logs" / f"explain-{server_name}.log"
        ) as server:
            for scenario in SERVERS[server_name]:
                files = _input_files(scenario, home_depot, shoppers, raw)
                for number in range(rounds_count):
                    for explain, path in files.items():
                        for level in CONCURRENCY:
                            key = f"{scenario} {'on' if explain else 'off'} c{level}"
                            with cpu_lock(f"explain {key}"):
                                row = perf_analyzer.measure(
                                    wrapper,
                                    server.grpc_url,
                                    MODELS[scenario],
                                    path,
                                    level,
                                    raw / f"{key.replace(' ', '-')}-r{number}.csv",
                                    settings,
                                )
                            measured.setdefault(scenario, {}).setdefault(key, []).append(
                                asdict(row)
                            )
    result = summarise(measured, rounds_count)
    write_results(out, "explain", result, markdown(result))
    log.info("explain: %s", result["ratios"])
    return result


def summarise(measured: dict[str, dict[str, list[dict]]], rounds_count: int) -> dict:
    """Medians per scenario, and per round ratios of on to off (their median)."""

    def ratio(scenario: str, level: int, metric: str) -> float:
        runs = measured[scenario]
        on, off = runs[f"{scenario} on c{level}"], runs[f"{scenario} off c{level}"]
        return float(np.median([a[metric] / b[metric] for a, b in zip(on, off, strict=True)]))

    return {
        "commit": machine.describe()["git_commit"],
        "date_utc": machine.describe()["date_utc"],
        "rounds": rounds_count,
        "medians": {
            key: {
                metric: float(np.median([r[metric] for r in runs]))
                for metric in ("throughput", "p50_us", "p99_us")
            }
            for scenario in measured.values()
            for key, runs in scenario.items()
        },
        "ratios": {
            scenario: {
                "p99_on_over_off_c1": ratio(scenario, 1, "p99_us"),
                "p50_on_over_off_c1": ratio(scenario, 1, "p50_us"),
                "throughput_on_over_off_c8": ratio(scenario, 8, "throughput"),
            }
            for scenario in measured
        },
    }


def markdown(result: dict) -> str:
    lines = [
        "# What EXPLAIN costs",
        "",
        f"Commit {result['commit']}, {result['date_utc']}. perf_analyzer on real servers, each "
        f"scenario off and on in turn, {result['rounds']} rounds (medians; ratios: the median of "
        "the ratios within each round). Written by `python -m benchmarks explain`.",
        "",
        "| scenario | EXPLAIN | c1 p50 ms | c1 p99 ms | c8 req/s |",
        "|---|---|---:|---:|---:|",
    ]
    medians = result["medians"]
    for scenario in result["ratios"]:
        for state in ("off", "on"):
            one, eight = medians[f"{scenario} {state} c1"], medians[f"{scenario} {state} c8"]
            lines.append(
                f"| `{scenario}` | {state} | {one['p50_us'] / 1e3:.2f} | "
                f"{one['p99_us'] / 1e3:.2f} | {eight['throughput']:.0f} |"
            )
    lines += [
        "",
        f"| scenario | p99 on ÷ off, c1 (target ≤ {P99_TARGET:.2f}) | throughput on ÷ off, c8 |",
    ]
    lines.append("|---|---:|---:|")
    for scenario, ratios in result["ratios"].items():
        lines.append(
            f"| `{scenario}` | {ratios['p99_on_over_off_c1']:.2f} | "
            f"{ratios['throughput_on_over_off_c8']:.2f} |"
        )
    return "\n".join(lines) + "\n"
