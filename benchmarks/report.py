"""The report: medians over runs, headline ratios, targets, per-step time split, plot, tuning table."""

from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path

from shopserve.ensemble import store

from .common import BenchmarkError

log = logging.getLogger("benchmarks.report")

HEADLINE_CONCURRENCY = 8
ENSEMBLE = "ensemble"
BASELINE = "fastapi_torch"
BASELINE_1T = "fastapi_torch_1t"
STEPS_SYSTEM = "ensemble_steps"
FP32 = "ensemble_fp32"
BEFORE = "ensemble_before"
TARGETS = {"speedup_c8": 10.0, "ceiling_share": 0.5, "p99_c1_ms": 10.0, "agreement_fp32": 0.99}
PLOT_FILE = "throughput_p99.png"
STEPS = store.STEPS


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _by_system(runs: list[dict]) -> dict[str, dict[int, list[dict]]]:
    """measurements[system][concurrency] -> one measurement per run."""
    table: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for m in run["measurements"]:
            table[m["system"]][m["concurrency"]].append(m)
    return table


def _ceiling_best(run: dict) -> dict:
    return max(run["ceiling"], key=lambda p: p["throughput"])


def headline(results: dict) -> dict:
    """Per-run ratios and their medians (each ratio is taken within one run)."""
    per_run = []
    for run in results["runs"]:
        rows = {(m["system"], m["concurrency"]): m for m in run["measurements"]}
        ens = {c: m for (s, c), m in rows.items() if s == ENSEMBLE}
        entry: dict[str, float] = {"run": run["run"]}
        if ens:
            best_c = max(ens, key=lambda c: ens[c]["throughput"])
            entry["ensemble_best_concurrency"] = best_c
            entry["ensemble_best_throughput"] = ens[best_c]["throughput"]
            entry["ceiling_throughput"] = _ceiling_best(run)["throughput"]
            entry["ceiling_share"] = ens[best_c]["throughput"] / entry["ceiling_throughput"]
        if 1 in ens:
            entry["ensemble_p99_c1_ms"] = ens[1]["p99_us"] / 1e3
        base = rows.get((BASELINE, HEADLINE_CONCURRENCY))
        if HEADLINE_CONCURRENCY in ens and base:
            entry["speedup_c8"] = ens[HEADLINE_CONCURRENCY]["throughput"] / base["throughput"]
            entry["ensemble_p99_c8_ms"] = ens[HEADLINE_CONCURRENCY]["p99_us"] / 1e3
            entry["baseline_p99_c8_ms"] = base["p99_us"] / 1e3
        before = {c: m for (sys_, c), m in rows.items() if sys_ == BEFORE}
        if 1 in ens and 1 in before:
            entry["before_p99_c1_ms"] = before[1]["p99_us"] / 1e3
            entry["p99_c1_vs_before"] = ens[1]["p99_us"] / before[1]["p99_us"]
        if HEADLINE_CONCURRENCY in ens and HEADLINE_CONCURRENCY in before:
            entry["throughput_c8_vs_before"] = (
                ens[HEADLINE_CONCURRENCY]["throughput"] / before[HEADLINE_CONCURRENCY]["throughput"]
            )
        base_1t = rows.get((BASELINE_1T, HEADLINE_CONCURRENCY))
        if HEADLINE_CONCURRENCY in ens and base_1t:
            entry["speedup_c8_vs_1t"] = (
                ens[HEADLINE_CONCURRENCY]["throughput"] / base_1t["throughput"]
            )
        per_run.append(entry)
    keys = sorted({k for e in per_run for k in e} - {"run"})
    return {
        "per_run": per_run,
        "median": {k: median([e[k] for e in per_run if k in e]) for k in keys},
    }


def _fmt(value: float, digits: int = 1) -> str:
    return "–" if value != value else f"{value:,.{digits}f}"  # NaN -> dash


def _targets(head: dict, agreement: dict | None) -> list[tuple[str, str, str, bool | None]]:
    med = head["median"]
    rows: list[tuple[str, str, str, bool | None]] = []
    if "speedup_c8" in med:
        ok = med["speedup_c8"] >= TARGETS["speedup_c8"] and (
            med["ensemble_p99_c8_ms"] < med["baseline_p99_c8_ms"]
        )
        rows.append(
            (
                "ensemble ÷ (a) throughput at concurrency 8, with a lower p99",
                f"≥ {TARGETS['speedup_c8']:.0f}×, p99 lower",
                f"{med['speedup_c8']:.2f}×; p99 {med['ensemble_p99_c8_ms']:.1f} ms vs "
                f"{med['baseline_p99_c8_ms']:.1f} ms",
                ok,
            )
        )
    if "ceiling_share" in med:
        rows.append(
            (
                "ensemble at its best concurrency ÷ ceiling (c)",
                f"≥ {TARGETS['ceiling_share']:.0%}",
                f"{med['ceiling_share']:.1%} ({med['ensemble_best_throughput']:.0f} ÷ "
                f"{med['ceiling_throughput']:.0f} queries/s)",
                med["ceiling_share"] >= TARGETS["ceiling_share"],
            )
        )
    if "ensemble_p99_c1_ms" in med:
        rows.append(
            (
                "ensemble p99 at concurrency 1",
                f"≤ {TARGETS['p99_c1_ms']:.0f} ms",
                f"{med['ensemble_p99_c1_ms']:.2f} ms",
                med["ensemble_p99_c1_ms"] <= TARGETS["p99_c1_ms"],
            )
        )
    if "p99_c1_vs_before" in med:
        rows.append(
            (
                "ensemble p99 at concurrency 1 against the configuration shipped before",
                "lower",
                f"{med['ensemble_p99_c1_ms']:.2f} ms vs {med['before_p99_c1_ms']:.2f} ms "
                f"({med['p99_c1_vs_before']:.2f}×)",
                med["p99_c1_vs_before"] < 1,
            )
        )
    if "throughput_c8_vs_before" in med:
        rows.append(
            (
                "for reference: ensemble ÷ the configuration shipped before, concurrency 8",
                "–",
                f"{med['throughput_c8_vs_before']:.2f}×",
                None,
            )
        )
    if "speedup_c8_vs_1t" in med:
        rows.append(
            (
                "for reference: ensemble ÷ (a') (baseline with torch.set_num_threads(1))",
                "–",
                f"{med['speedup_c8_vs_1t']:.2f}×",
                None,
            )
        )
    for pair in (agreement or {}).get("pairs", []):
        if (pair["reference"], pair["other"]) == (BASELINE, FP32):
            rows.append(
                (
                    "(b) FP32 ensemble vs (a): top-10 id agreement",
                    f"≥ {TARGETS['agreement_fp32']}",
                    f"{pair['overlap']:.4f}",
                    pair["overlap"] >= TARGETS["agreement_fp32"],
                )
            )
    ndcg = (agreement or {}).get("dev_ndcg10", {})
    if ENSEMBLE in ndcg and FP32 in ndcg:
        drop = (ndcg[FP32] - ndcg[ENSEMBLE]) / ndcg[FP32]
        rows.append(
            (
                "INT8 ensemble dev nDCG@10 within 1 % of FP32 (b)",
                "drop ≤ 1 %",
                f"{ndcg[ENSEMBLE]:.4f} vs {ndcg[FP32]:.4f} ({drop:+.2%} drop)",
                drop <= 0.01,
            )
        )
    return rows


def _labels(results: dict) -> dict[str, str]:
    return {
        **results["systems"],
        "ensemble_loadgen": f"`{store.SEARCH}` via the Python load generator",
    }


def _sweep_table(results: dict, table: dict) -> list[str]:
    lines = [
        "| system | concurrency | throughput (req/s) | p50 (ms) | p99 (ms) | throughput range over runs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    labels = _labels(results)
    for system, levels in table.items():
        for level in sorted(levels):
            ms = levels[level]
            tp = [m["throughput"] for m in ms]
            lines.append(
                f"| {labels.get(system, system)} | {level} | {_fmt(median(tp))} | "
                f"{_fmt(median([m['p50_us'] / 1e3 for m in ms]), 2)} | "
                f"{_fmt(median([m['p99_us'] / 1e3 for m in ms]), 2)} | "
                f"{_fmt(min(tp))}–{_fmt(max(tp))} ({len(ms)} runs) |"
            )
    return lines


def _section(intro: str, table_lines: list[str]) -> list[str]:
    return [intro, "", *table_lines, ""] if table_lines else []


def _step_table(
    table: dict,
    system: str,
    endpoint: str,
    steps: tuple[str, ...],
    in_process: dict[str, float] | None,
) -> list[str]:
    """Per concurrency: each step model's time, the endpoint's server time, the client's rest."""
    levels = table.get(system, {})
    if not levels:
        return []
    step_cells = "".join(f" {s} (queue) |" for s in steps)
    sum_cell = " Σ steps |" if steps else ""
    lines = [
        f"| concurrency |{step_cells}{sum_cell} {endpoint} (server, queue) | client + gRPC |",
        "|---:|" + "---:|" * (len(steps) + (1 if steps else 0) + 2),
    ]
    for level in sorted(levels):
        ms = [m for m in levels[level] if endpoint in m.get("steps", {})]
        if not ms:
            continue
        cells = ""
        total_steps = []
        for step in steps:
            totals = [m["steps"][step]["total_us"] for m in ms if step in m["steps"]]
            queues = [m["steps"][step]["queue_us"] for m in ms if step in m["steps"]]
            cells += f" {median(totals) / 1e3:.2f} ({median(queues) / 1e3:.2f}) |"
            total_steps.append(median(totals))
        if steps:
            cells += f" {sum(total_steps) / 1e3:.2f} |"
        server = median([m["steps"][endpoint]["total_us"] for m in ms])
        queue = median([m["steps"][endpoint]["queue_us"] for m in ms])
        client = median([m["avg_us"] for m in ms]) - server
        lines.append(
            f"| {level} |{cells} {server / 1e3:.2f} ({queue / 1e3:.2f}) | {client / 1e3:.2f} |"
        )
    if in_process:
        total = sum(in_process.values()) / 1e3
        cells = "".join(f" {in_process[s] / 1e3:.2f} |" for s in steps)
        sum_cell = f" {total:.2f} |" if steps else ""
        lines.append(f"| in-process, no server |{cells}{sum_cell} {total:.2f} | – |")
    return lines


CORES = 2


def _cpu_order(key: str) -> tuple[int, str]:
    if key in ("tritonserver", "uvicorn"):
        return (0, key)
    if key in STEPS:
        return (1 + STEPS.index(key), key)
    if key.startswith("client"):
        return (99, key)
    return (50, key)


def _cpu_table(results: dict, table: dict, levels: tuple[int, ...] = (1, 8)) -> list[str]:
    labels = _labels(results)
    lines = [
        f"| system | concurrency | CPU ms per request, by process | total | bound: {CORES} cores "
        "÷ total (req/s) | measured (req/s) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for system, by_level in table.items():
        for level in levels:
            ms = [m for m in by_level.get(level, []) if m.get("cpu_ms")]
            if not ms:
                continue
            keys = sorted({k for m in ms for k in m["cpu_ms"]}, key=_cpu_order)
            values = {k: median([m["cpu_ms"][k] for m in ms if k in m["cpu_ms"]]) for k in keys}
            total = sum(values.values())
            parts = ", ".join(f"{k} {v:.2f}" for k, v in values.items())
            lines.append(
                f"| {labels.get(system, system)} | {level} | {parts} | {total:.2f} | "
                f"{CORES * 1000 / total:,.0f} | {median([m['throughput'] for m in ms]):,.0f} |"
            )
    return lines


def _ceiling_table(runs: list[dict]) -> list[str]:
    by_layout: dict[tuple[int, int], dict[int, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in runs:
        for point in run["ceiling"]:
            layout = (point.get("sessions", 1), point.get("threads", 2))
            by_layout[layout][point["batch_size"]].append(point["throughput"])
    sizes = sorted({b for layout in by_layout.values() for b in layout})
    lines = [
        "| INT8 encoder alone, queries/s (median) | "
        + " | ".join(f"batch {b}" for b in sizes)
        + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for (sessions, threads), points in sorted(by_layout.items()):
        lines.append(
            f"| {sessions} session(s) × {threads} intra-op thread(s) | "
            + " | ".join(_fmt(median(points.get(b, [])), 0) for b in sizes)
            + " |"
        )
    best = [_ceiling_best(run) for run in runs]
    lines += [
        "",
        f"Ceiling (c) = the best point of each run, median {_fmt(median([b['throughput'] for b in best]), 0)}"
        " queries/s; tokenization is not timed (done up front).",
    ]
    return lines


def _agreement_lines(agreement: dict | None, labels: dict[str, str]) -> list[str]:
    if not agreement:
        return ["Agreement was not measured in this run."]
    lines = [
        f"Top-10 product ids on the {agreement['queries']} benchmark queries (overlap: mean share "
        "of the reference's top-10 also returned; same list: identical ids in identical order).",
        "",
        "| reference | other | top-10 overlap | same list |",
        "|---|---|---:|---:|",
    ]
    for pair in agreement["pairs"]:
        lines.append(
            f"| {labels.get(pair['reference'], pair['reference'])} | "
            f"{labels.get(pair['other'], pair['other'])} | {pair['overlap']:.4f} | "
            f"{pair['same_list']:.3f} |"
        )
    lines += [
        "",
        f"Dev nDCG@10 of the served top-10 ({agreement['dev_queries']} held-out judged queries, full "
        "catalogue, unjudged products gain 0):",
        "",
        "| system | dev nDCG@10 |",
        "|---|---:|",
    ]
    for name, value in agreement["dev_ndcg10"].items():
        lines.append(f"| {labels.get(name, name)} | {value:.4f} |")
    return lines


def plot(results: dict, table: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels = _labels(results)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for system, levels in table.items():
        xs = [median([m["p99_us"] / 1e3 for m in levels[c]]) for c in sorted(levels)]
        ys = [median([m["throughput"] for m in levels[c]]) for c in sorted(levels)]
        ax.plot(xs, ys, marker="o", label=labels.get(system, system))
        for c, x, y in zip(sorted(levels), xs, ys, strict=True):
            ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ceilings = [_ceiling_best(run)["throughput"] for run in results["runs"]]
    if ceilings:
        ax.axhline(median(ceilings), color="grey", linestyle="--", linewidth=1)
        ax.annotate(
            f"ceiling (c): INT8 encoder alone, best batch, {median(ceilings):.0f}/s",
            (0.01, median(ceilings)),
            xycoords=("axes fraction", "data"),
            textcoords="offset points",
            xytext=(0, -12),
            fontsize=8,
            color="grey",
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("p99 latency (ms, log scale)")
    ax.set_ylabel("throughput (requests/s)")
    ax.set_title("Throughput vs p99, concurrency 1-16, median of runs (2-core CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def tuning_lines(tuning: dict | None) -> list[str]:
    if not tuning:
        return ["No tuning results yet: `python -m benchmarks tune`."]
    lines = [
        f"Each change on top of the previous kept one, measured with perf_analyzer "
        f"({tuning['runs']} runs, median) at concurrency "
        + " and ".join(str(c) for c in tuning["concurrency"])
        + ". Throughput in req/s, p99 in ms.",
        "",
        "| change | kept | "
        + " | ".join(f"before c={c} | after c={c}" for c in tuning["concurrency"])
        + " | note |",
        "|---|---|" + "---|---|" * len(tuning["concurrency"]) + "---|",
    ]
    for row in tuning["changes"]:
        cells: list[str] = []
        for c in tuning["concurrency"]:
            b, a = row["before"].get(str(c)), row["after"].get(str(c))
            cells.append(_cell(b))
            cells.append(_cell(a))
        kept = _kept_label(row)
        lines.append(f"| {row['change']} | {kept} | {' | '.join(cells)} | {row.get('note', '')} |")
    checks = tuning.get("ann_checks")
    if checks:
        lines += [
            "",
            "ANN efSearch against the targets (recall@100 of the INT8 index vs exact search on the "
            "dev queries, target ≥ 0.98; top-10 agreement of the FP32 pipeline with HNSW vs with "
            "exact search on 1,000 benchmark queries, target ≥ 0.99):",
            "",
            "| efSearch | recall@100 | FP32 top-10 agreement with exact search |",
            "|---:|---:|---:|",
            *(
                f"| {ef} | {c['recall']:.4f} | {c['fp32_agreement']:.4f} |"
                for ef, c in sorted(checks.items(), key=lambda item: int(item[0]))
            ),
        ]
    return lines


def _kept_label(row: dict) -> str:
    """Config changes: kept or not. Code changes that pass the same rule are applied in the
    shipped code; FP32 rows concern (b) only; informational rows are never kept."""
    kind = row.get("kind", "config")
    if kind == "code":
        return "yes (code)" if row["kept"] else "no"
    if kind == "fp32":
        return "safe for (b) only" if row["kept"] else "no"
    if row["change"].startswith("response cache"):
        return "– (sweep: off)"
    return "yes" if row["kept"] else "no"


def _cell(point: dict | None) -> str:
    if not point:
        return "–"
    return f"{point['throughput']:.0f}/s, p99 {point['p99_us'] / 1e3:.1f}"


def _notes(out: Path) -> list[str]:
    """The hand-written reading of a committed run (``notes.md``), if there is one."""
    notes = out / "notes.md"
    return [notes.read_text().rstrip(), ""] if notes.exists() else []


def write(out: Path) -> Path:
    """Write ``summary.md`` and the plot from ``results.json`` (and ``tuning.json``)."""
    source = out / "results.json"
    if not source.exists():
        raise BenchmarkError(f"{source} is missing: run python -m benchmarks run first")
    results = json.loads(source.read_text())
    tuning_path = out / "tuning.json"
    tuning = json.loads(tuning_path.read_text()) if tuning_path.exists() else None
    if tuning:
        (out / "tuning.md").write_text("# Tuning\n\n" + "\n".join(tuning_lines(tuning)) + "\n")
    machine_info = json.loads((out / "machine.json").read_text())
    table = _by_system(results["runs"])
    head = headline(results)
    labels = {**results["systems"]}
    plot(results, table, out / PLOT_FILE)
    settings = results["settings"]
    in_process = {
        s: median([run["in_process_steps_us"][s] for run in results["runs"]]) for s in STEPS
    }
    lines = [
        "# shopserve benchmark results",
        "",
        f"{machine_info['cpu']}, {machine_info['cpus_usable']} cores, "
        f"{machine_info['memory_gib']} GiB, {machine_info['os']}; commit "
        f"{machine_info['git_commit']}, {machine_info['date_utc']} (details: [machine.md](machine.md)). "
        f"{settings['queries']} distinct queries of the Home Depot log in log order, TOP_K="
        f"{settings['top_k']}, retrieval depth {settings['retrieval_depth']}, gRPC for Triton, "
        f"closed loop; perf_analyzer --measurement-interval {settings['measurement_interval_ms']} "
        f"--stability-percentage {settings['stability_percentage']} --max-trials "
        f"{settings['max_trials']}; response cache {settings['response_cache']}. "
        f"Medians of {settings['runs']} runs; ratios are taken within each run, then the median.",
        "",
        "## Headline",
        "",
        "| target | goal | measured (median) | met |",
        "|---|---|---|---|",
    ]
    for name, goal, measured, ok in _targets(head, results.get("agreement")):
        met = "–" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {name} | {goal} | {measured} | {met} |")
    lines += [
        "",
        "Per run: "
        + "; ".join(
            f"run {e['run']}: "
            + ", ".join(
                f"{k} {v:.3g}"
                for k, v in e.items()
                if k in ("speedup_c8", "ceiling_share", "ensemble_p99_c1_ms")
            )
            for e in head["per_run"]
        ),
        "",
        f"![throughput vs p99]({PLOT_FILE})",
        "",
        "## Throughput and latency",
        "",
        *_sweep_table(results, table),
        "",
        "## Where the time goes (server side, ms per request, median over runs)",
        "",
        "Times in Triton's statistics (queue + compute; the compute of a Python-backend model "
        "includes its stub round trip), and what the client saw beyond the server time "
        "(perf_analyzer mean latency − server time: gRPC, serialisation, client).",
        "",
        *_section(
            f"`{store.SEARCH}`, the shipped endpoint (the whole graph in one Python model; the "
            "in-process row is the sum of the steps below run in-process):",
            _step_table(table, ENSEMBLE, store.SEARCH, (), in_process),
        ),
        *_section(
            f"`{store.ENSEMBLE}`, the same graph as a five-model ensemble, step by step. The last "
            "row is the same step code in-process, one query at a time: the difference to the "
            "served step at concurrency 1 is the per-hop cost of the Python backend.",
            _step_table(table, STEPS_SYSTEM, store.ENSEMBLE, STEPS, in_process),
        ),
        *_section("FP32 (b):", _step_table(table, FP32, store.SEARCH, (), None)),
        "CPU time per request, by process (utime + stime over the whole measurement ÷ requests "
        "served; Triton's Python-backend stubs by model). On 2 cores, throughput cannot exceed "
        "2 × 1000 ÷ total:",
        "",
        *_cpu_table(results, table),
        "",
        "## Ceiling (c)",
        "",
        *_ceiling_table(results["runs"]),
        "",
        "## Same answers",
        "",
        *_agreement_lines(results.get("agreement"), labels),
        "",
        "## Tuning",
        "",
        *tuning_lines(tuning),
        "",
        *_notes(out),
        "## Rerun",
        "",
        "`make bench` (full: 3 runs, about 30 minutes on 2 cores), `make bench-smoke` (seconds), "
        "`python -m benchmarks report` (this file and the plot from results.json), "
        "`python -m benchmarks tune` (the tuning table). See benchmarks/README.md.",
        "",
    ]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    (out / "headline.json").write_text(json.dumps(head, indent=2) + "\n")
    log.info("wrote %s and %s", summary, out / PLOT_FILE)
    return summary
