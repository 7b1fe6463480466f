"""The full benchmark: every system, the concurrency sweep, the ceiling, agreement, ≥ 3 runs.

Each run measures the ceiling, then each system in turn (server started, swept over the concurrency
levels, stopped), holding the machine's CPU lock for each block. Run 1 also collects every system's
answers for the agreement and nDCG checks. Raw results go to ``results/raw/run<N>/``; the report
(medians over runs) is written by :mod:`benchmarks.report`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from shopserve.ensemble import store

from . import (
    agreement,
    ceiling,
    fp32,
    machine,
    perf_analyzer,
    profile,
    report,
    variants,
)
from .common import BUILT_REPOSITORY, RESULTS_DIR, WORK_DIR, BenchmarkError, cpu_lock
from .loadgen import answers as collect_answers
from .measure import ATTEMPTS, measure_level
from .queries import Traffic, load_traffic, write_perf_analyzer_data
from .systems import FASTAPI, LOADGEN, PERF_ANALYZER, TRITON, Running, System, started
from .tuning import BEFORE, HEADLINE

log = logging.getLogger("benchmarks.run")

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16)
DEFAULT_SYSTEMS = (
    "ensemble",
    "ensemble_before",
    "ensemble_steps",
    "ensemble_fp32",
    "fastapi_torch",
    "fastapi_torch_1t",
)
CROSS_CHECK = "ensemble_loadgen"  # the ensemble driven by the Python load generator
ANSWER_CONCURRENCY = 2


@dataclass
class RunOptions:
    repository: Path = BUILT_REPOSITORY
    runs: int = 3
    queries: int = 2000
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    cross_check: tuple[int, ...] = (1, 8)  # loadgen against the ensemble too, at these levels
    settings: perf_analyzer.Settings = field(default_factory=perf_analyzer.Settings)
    out: Path = RESULTS_DIR
    answers: bool = True
    ceiling_seconds: float = 4.0


def build_systems(repository: Path, names: tuple[str, ...]) -> dict[str, System]:
    """Materialize the repository variants the chosen systems need."""
    unknown = set(names) - set(DEFAULT_SYSTEMS)
    if unknown:
        raise BenchmarkError(f"unknown systems {sorted(unknown)}; choose from {DEFAULT_SYSTEMS}")
    needs_fp32 = {"ensemble_fp32", "fastapi_torch", "fastapi_torch_1t"} & set(names)
    artefacts = fp32.ensure(repository) if needs_fp32 else None
    index = artefacts.index if artefacts else None
    made = {
        "ensemble": lambda: System(
            "ensemble",
            f"Triton `{store.SEARCH}` as shipped (static INT8 encoder)",
            TRITON,
            PERF_ANALYZER,
            variants.materialize(HEADLINE, repository),
        ),
        "ensemble_before": lambda: System(
            "ensemble_before",
            f"Triton `{store.SEARCH}` as shipped before: dynamic INT8 encoder, efSearch 512",
            TRITON,
            PERF_ANALYZER,
            variants.materialize(
                BEFORE,
                repository,
                files={
                    f"{store.ENCODER}/{{version}}/{variants.DYNAMIC_INT8_ENCODER_FILE}": (
                        fp32.dynamic_int8_encoder(repository)
                    )
                },
            ),
        ),
        "ensemble_steps": lambda: System(
            "ensemble_steps",
            f"Triton `{store.ENSEMBLE}` (five-model ensemble), static INT8 encoder batching requests",
            TRITON,
            PERF_ANALYZER,
            variants.materialize(replace(HEADLINE, name="ensemble_steps"), repository),
            model=store.ENSEMBLE,
        ),
        "ensemble_fp32": lambda: System(
            "ensemble_fp32",
            f"(b) Triton `{store.SEARCH}`, FP32 encoder + FP32 HNSW",
            TRITON,
            PERF_ANALYZER,
            variants.materialize(
                replace(HEADLINE, name="ensemble_fp32", fp32=True), repository, index
            ),
        ),
        "fastapi_torch": lambda: System(
            "fastapi_torch",
            "(a) FastAPI + PyTorch FP32 eager, exact search",
            FASTAPI,
            LOADGEN,
            repository,
            str(artefacts.embeddings) if artefacts else "",
        ),
    }
    made["fastapi_torch_1t"] = lambda: replace(
        made["fastapi_torch"](),
        name="fastapi_torch_1t",
        label="(a') as (a), torch.set_num_threads(1)",
        torch_threads=1,
    )
    return {name: made[name]() for name in names}


def sweep(
    running: Running,
    concurrency: tuple[int, ...],
    settings: perf_analyzer.Settings,
    traffic: Traffic,
    data: Path,
    raw_dir: Path,
    wrapper: Path,
    cross_check: tuple[int, ...] = (),
    attempts: int = ATTEMPTS,
) -> list[dict]:
    """Every concurrency level against a started system (its own driver), then the cross-check
    levels with the load generator; Triton's step times and CPU per request around each."""
    system = running.system
    plan = [(system.name, system.driver, level) for level in concurrency]
    if system.server == TRITON:
        plan += [(CROSS_CHECK, LOADGEN, level) for level in cross_check]
    out = []
    for name, driver, level in plan:
        log.info("%s: %s concurrency %d", name, driver, level)
        row = measure_level(
            running,
            driver,
            level,
            settings,
            traffic,
            data,
            raw_dir / f"{name}_c{level}.csv",
            wrapper,
            attempts,
        )
        out.append({"system": name, "driver": driver, **row})
    _write_csv(raw_dir / f"{system.name}.csv", out)
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = [k for k in rows[0] if not isinstance(rows[0][k], dict)] if rows else []
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _answer_queries(traffic: Traffic) -> list[str]:
    return list(dict.fromkeys(traffic.queries + traffic.dev_queries))


def agreement_report(traffic: Traffic, answers: dict[str, list[list[int]]]) -> dict:
    """Top-10 agreement on the benchmark queries, and dev nDCG@10, from each system's answers."""
    queries = _answer_queries(traffic)
    position = {q: i for i, q in enumerate(queries)}

    def on(name: str, subset: list[str]) -> list[list[int]]:
        return [answers[name][position[q]] for q in subset]

    pairs = [
        ("fastapi_torch", "ensemble_fp32"),
        ("fastapi_torch", "ensemble"),
        ("ensemble_fp32", "ensemble"),
        ("ensemble", "ensemble_steps"),
        ("ensemble_before", "ensemble"),
        ("fastapi_torch", "fastapi_torch_1t"),
    ]
    return {
        "queries": len(traffic.queries),
        "dev_queries": len(traffic.dev_queries),
        "pairs": [
            {
                "reference": a,
                "other": b,
                **agreement.agreement(on(a, traffic.queries), on(b, traffic.queries)).as_dict(),
            }
            for a, b in pairs
            if a in answers and b in answers
        ],
        "dev_ndcg10": {
            name: agreement.dev_ndcg(
                traffic.dev_queries, on(name, traffic.dev_queries), traffic.judgments
            )
            for name in answers
        },
    }


def run(options: RunOptions) -> Path:
    """Run everything and write the report; return the summary's path."""
    started_at = time.monotonic()
    raw = options.out / "raw"
    wrapper = perf_analyzer.install()
    info = machine.describe(perf_analyzer.version(wrapper))
    manifest = json.loads((options.repository / store.MANIFEST_FILE).read_text())
    traffic = load_traffic(manifest, options.queries)
    data = write_perf_analyzer_data(traffic.queries, WORK_DIR / "data" / "queries.json")
    log.info(
        "%d benchmark queries (log order), %d dev queries; systems %s; concurrency %s; %d runs",
        len(traffic.queries),
        len(traffic.dev_queries),
        ", ".join(options.systems),
        options.concurrency,
        options.runs,
    )
    systems = build_systems(options.repository, options.systems)
    answers: dict[str, list[list[int]]] = {}
    runs = []
    for number in range(1, options.runs + 1):
        log.info("=== run %d of %d", number, options.runs)
        run_dir = raw / f"run{number}"
        with cpu_lock(f"run {number}: ceiling"):
            points = ceiling.measure(
                options.repository, traffic.queries, min_seconds=options.ceiling_seconds
            )
        with cpu_lock(f"run {number}: in-process step profile"):
            steps_in_process = profile.step_times(systems_repo(systems), traffic.queries[:500])
        measurements = []
        for system in systems.values():
            with cpu_lock(f"run {number}: {system.name}"), started(system) as running:
                measurements += sweep(
                    running,
                    options.concurrency,
                    options.settings,
                    traffic,
                    data,
                    run_dir,
                    wrapper,
                    options.cross_check if system.name == "ensemble" else (),
                )
                if number == 1 and options.answers:
                    log.info("collecting %s's answers for the agreement check", system.name)
                    answers[system.name] = collect_answers(
                        running.sessions(), _answer_queries(traffic), ANSWER_CONCURRENCY
                    )
        result = {
            "run": number,
            "ceiling": [p.as_dict() for p in points],
            "in_process_steps_us": steps_in_process,
            "measurements": measurements,
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        runs.append(result)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    info["duration_s"] = round(time.monotonic() - started_at)
    machine.write(info, options.out)
    results = {
        "settings": {
            **asdict(options.settings),
            "queries": len(traffic.queries),
            "top_k": 10,
            "retrieval_depth": 100,
            "concurrency": list(options.concurrency),
            "runs": options.runs,
            "response_cache": "off (every system; see the tuning table for the cache)",
        },
        "systems": {s.name: s.label for s in systems.values()},
        "runs": runs,
        "agreement": agreement_report(traffic, answers) if answers else None,
    }
    (options.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return report.write(options.out)


def systems_repo(systems: dict[str, System]) -> Path:
    """The repository whose steps the in-process profile times (the headline ensemble's)."""
    system = systems.get("ensemble") or next(iter(systems.values()))
    return system.repository


SMOKE_QUERIES = 50  # load generator and agreement
SMOKE_DATA = 1000  # perf_analyzer steps


def smoke(
    out: Path,
    repository: Path = BUILT_REPOSITORY,
    grpc_url: str = "",
    http_url: str = "",
) -> dict:
    """A few seconds of everything: perf_analyzer at concurrency 1 against the ensemble (a given
    server, or one started here with the shipped configs), the FastAPI baseline on the shipped
    index's vectors (no FP32 cache needed) under the load generator, the ceiling, the in-process
    profile, agreement on a few queries, and the report. Returns the results dict."""
    settings = perf_analyzer.SMOKE_SETTINGS
    wrapper = perf_analyzer.install()
    info = machine.describe(perf_analyzer.version(wrapper))
    manifest = json.loads((repository / store.MANIFEST_FILE).read_text())
    traffic = load_traffic(manifest)
    # The log's last queries: a server under test may have cached answers to the first ones.
    data = write_perf_analyzer_data(traffic.queries[-SMOKE_DATA:], out / "queries.json")
    traffic = Traffic(
        traffic.queries[-SMOKE_QUERIES:], traffic.judgments, traffic.dev_queries[-10:]
    )
    raw = out / "raw" / "run1"
    measurements: list[dict] = []
    answers: dict[str, list[list[int]]] = {}
    points = ceiling.measure(repository, traffic.queries, (1, 8), 0.5, layouts=((1, 2),))
    steps_in_process = profile.step_times(repository, traffic.queries[:20])
    ensemble = System("ensemble", "Triton search (smoke)", TRITON, PERF_ANALYZER, repository)
    baseline = System(
        "fastapi_torch",
        "(a) FastAPI + PyTorch FP32 eager (smoke: INT8 index vectors)",
        FASTAPI,
        LOADGEN,
        repository,
        "int8-index",
    )

    def measure(running: Running) -> None:
        # One attempt: a smoke test does not wait for a quiet machine.
        measurements.extend(sweep(running, (1,), settings, traffic, data, raw, wrapper, (), 1))
        answers[running.system.name] = collect_answers(running.sessions(), _answer_queries(traffic))

    if grpc_url:
        measure(Running(ensemble, grpc_url=grpc_url, http_url=http_url))
    else:
        ensemble = replace(ensemble, repository=variants.materialize(HEADLINE, repository))
        with started(ensemble, out / "logs") as running:
            measure(running)
    with started(baseline, out / "logs") as running:
        measure(running)
    results = {
        "settings": {
            **asdict(settings),
            "queries": len(traffic.queries),
            "top_k": 10,
            "retrieval_depth": 100,
            "concurrency": [1],
            "runs": 1,
            "response_cache": "as configured (smoke)",
        },
        "systems": {ensemble.name: ensemble.label, baseline.name: baseline.label},
        "runs": [
            {
                "run": 1,
                "ceiling": [p.as_dict() for p in points],
                "in_process_steps_us": steps_in_process,
                "measurements": measurements,
            }
        ],
        "agreement": agreement_report(traffic, answers),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    machine.write(info, out)
    report.write(out)
    return results
