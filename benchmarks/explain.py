"""``python -m benchmarks explain``: what EXPLAIN costs, with perf_analyzer on real servers.

Each endpoint is measured with and without EXPLAIN on the same server, in turn, ROUNDS times, on
servers started afresh for each round:

* ``search``: the Home Depot store, the log's real queries (first server);
* ``search_personal`` and ``recommend``: the personalised Instacart store, the log's shoppers and
  the aisles they bought in (second server; the traffic of ``benchmarks.personal``).

Targets (issue 20): with EXPLAIN on, p99 at concurrency 1 within 30 % of off; off within 2 % of
the throughput before EXPLAIN existed. "Before" is a second server of the same store whose
``search`` and ``recommend`` adapters never read the EXPLAIN input (the store's own adapters with
that one read replaced by None), measured in the same rounds; off differs from it by reading the
optional input and checking the flag.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from shopserve.ensemble import store

from shopserve.server import ServerConfig, TritonServer, free_ports

from . import machine, perf_analyzer, personal, variants
from .common import WORK_DIR, BenchmarkError, cpu_lock, write_results
from .queries import load_traffic
from .tuning import HEADLINE

log = logging.getLogger("benchmarks.explain")

CONCURRENCY = (1, 8)
ROUNDS = 3
QUERIES = 2000
P99_TARGET = 1.30  # on ÷ off at concurrency 1
OFF_TARGET = 0.98  # off ÷ before EXPLAIN, throughput at concurrency 8
STATES = ("off", "on", "before")
EXPLAIN_READ = 'optional_input(request, "EXPLAIN")'


def _adapters_without_explain(source: Path, folder: Path) -> dict[str, Path]:
    """The store's ``search`` and ``recommend`` adapters as they were before EXPLAIN: they never
    read the input (``variants.materialize`` files, by path in the repository)."""
    files = {}
    for model in (store.SEARCH, store.RECOMMEND):
        if not store.version_dirs(source, model):
            continue
        adapter = store.latest_version_dir(source, model) / "model.py"
        text = adapter.read_text()
        if EXPLAIN_READ not in text:
            raise BenchmarkError(f"{adapter} does not read EXPLAIN with {EXPLAIN_READ}")
        path = folder / f"{source.name}-{model}-without-explain.py"
        path.write_text(text.replace(EXPLAIN_READ, "None"))
        files[f"{model}/{{version}}/model.py"] = path
    return files


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


def _fresh_server(repository: Path, name: str, server_name: str) -> TritonServer:
    """A server of ``repository`` whose live state (profiles, catalogue log) starts as built: both
    servers of a round start alike, and each round starts afresh."""
    work = WORK_DIR / "triton" / name
    shutil.rmtree(work, ignore_errors=True)
    return TritonServer(
        ServerConfig(repository, *free_ports(3), work_dir=work),
        log_file=WORK_DIR / "logs" / f"{name}-{server_name}.log",
    )


def _measure(
    wrapper: Path,
    server: TritonServer,
    scenario: str,
    data: Path,
    level: int,
    settings: perf_analyzer.Settings,
    raw: Path,
    key: str,
    number: int,
) -> dict:
    """One perf_analyzer measurement of ``key`` in round ``number``, as a dict."""
    with cpu_lock(f"explain {key}"):
        row = perf_analyzer.measure(
            wrapper,
            server.grpc_url,
            MODELS[scenario],
            data,
            level,
            raw / f"{key.replace(' ', '-')}-r{number}.csv",
            settings,
        )
    return asdict(row)


def run(
    repository: Path,
    personal_repository: Path,
    data: Path,
    out: Path,
    settings: perf_analyzer.Settings = perf_analyzer.DEFAULT_SETTINGS,
    rounds_count: int = ROUNDS,
    queries: int = QUERIES,
) -> dict:
    """Measure each scenario off, on and before EXPLAIN, in turn, on two servers per store (as
    shipped, and never reading EXPLAIN) started afresh for each round; write ``explain.json`` and
    ``explain.md`` and return the result."""
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
        before = variants.materialize(
            HEADLINE.plus(f"explain-{server_name}-before", "never reading EXPLAIN, cache off"),
            source,
            files=_adapters_without_explain(source, raw),
        )
        inputs = {s: _input_files(s, home_depot, shoppers, raw) for s in SERVERS[server_name]}
        for number in range(rounds_count):
            with (
                _fresh_server(variant, "explain", server_name) as server,
                _fresh_server(before, "explain-before", server_name) as earlier,
            ):
                for scenario, files in inputs.items():
                    targets = {
                        "off": (server, files[False]),
                        "on": (server, files[True]),
                        "before": (earlier, files[False]),
                    }
                    turn = number % len(STATES)  # each state first in turn: no order bias
                    for state in STATES[turn:] + STATES[:turn]:
                        target, path = targets[state]
                        for level in CONCURRENCY:
                            key = f"{scenario} {state} c{level}"
                            row = _measure(
                                wrapper, target, scenario, path, level, settings, raw, key, number
                            )
                            measured.setdefault(scenario, {}).setdefault(key, []).append(row)
    result = summarise(measured, rounds_count)
    write_results(out, "explain", result, markdown(result))
    log.info("explain: %s", result["ratios"])
    return result


def summarise(measured: dict[str, dict[str, list[dict]]], rounds_count: int) -> dict:
    """Medians per scenario, and per round ratios of on to off (their median)."""

    def ratio(scenario: str, level: int, metric: str, of: str = "on", to: str = "off") -> float:
        runs = measured[scenario]
        top, bottom = runs[f"{scenario} {of} c{level}"], runs[f"{scenario} {to} c{level}"]
        return float(np.median([a[metric] / b[metric] for a, b in zip(top, bottom, strict=True)]))

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
                "throughput_off_over_before_c8": ratio(scenario, 8, "throughput", "off", "before"),
                "p99_off_over_before_c1": ratio(scenario, 1, "p99_us", "off", "before"),
            }
            for scenario in measured
        },
    }


def markdown(result: dict) -> str:
    lines = [
        "# What EXPLAIN costs",
        "",
        f"Commit {result['commit']}, {result['date_utc']}. perf_analyzer on real servers, each "
        f"scenario off, on and before in turn (each first in one round), {result['rounds']} rounds "
        "on servers started afresh for each (medians; ratios: the median of the ratios within "
        "each round). Written by `python -m benchmarks explain`.",
        "",
        "| scenario | EXPLAIN (before: a server that never reads it) | c1 p50 ms | c1 p99 ms | "
        "c8 req/s |",
        "|---|---|---:|---:|---:|",
    ]
    medians = result["medians"]
    for scenario in result["ratios"]:
        for state in STATES:
            one, eight = medians[f"{scenario} {state} c1"], medians[f"{scenario} {state} c8"]
            lines.append(
                f"| `{scenario}` | {state} | {one['p50_us'] / 1e3:.2f} | "
                f"{one['p99_us'] / 1e3:.2f} | {eight['throughput']:.0f} |"
            )
    lines += [
        "",
        f"| scenario | p99 on ÷ off, c1 (target ≤ {P99_TARGET:.2f}) | throughput on ÷ off, c8 | "
        f"throughput off ÷ before EXPLAIN, c8 (target ≥ {OFF_TARGET:.2f}) | "
        "p99 off ÷ before, c1 |",
    ]
    lines.append("|---|---:|---:|---:|---:|")
    for scenario, ratios in result["ratios"].items():
        lines.append(
            f"| `{scenario}` | {ratios['p99_on_over_off_c1']:.2f} | "
            f"{ratios['throughput_on_over_off_c8']:.2f} | "
            f"{ratios['throughput_off_over_before_c8']:.3f} | "
            f"{ratios['p99_off_over_before_c1']:.2f} |"
        )
    return "\n".join(lines) + "\n"
