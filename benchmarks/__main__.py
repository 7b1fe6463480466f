"""``python -m benchmarks COMMAND``: run, tune, report, smoke, install, model-analyzer."""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace
from pathlib import Path

from .common import (
    BUILT_REPOSITORY,
    PROJECT,
    RESULTS_DIR,
    WORK_DIR,
    BenchmarkError,
    setup_logging,
)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="the full benchmark (sweep, baselines, ceiling, report)")
    run.add_argument("--repository", type=Path, default=BUILT_REPOSITORY)
    run.add_argument("--runs", type=int, default=3)
    run.add_argument("--queries", type=int, default=2000)
    run.add_argument("--concurrency", type=_ints, default=(1, 2, 4, 8, 16))
    run.add_argument("--systems", type=lambda s: tuple(s.split(",")), default=None)
    run.add_argument("--cross-check", type=_ints, default=(1, 8))
    run.add_argument("--measurement-interval", type=int, default=4000, help="ms")
    run.add_argument("--out", type=Path, default=RESULTS_DIR)
    tune = commands.add_parser("tune", help="A/B the tuning changes; writes tuning.md")
    tune.add_argument("--repository", type=Path, default=BUILT_REPOSITORY)
    tune.add_argument("--runs", type=int, default=3)
    tune.add_argument("--only", action="append", default=[], help="a change's name (repeatable)")
    tune.add_argument(
        "--assume-kept",
        action="append",
        default=[],
        help="a change applied to the base without measuring (repeatable; to resume a tuning)",
    )
    tune.add_argument("--out", type=Path, default=RESULTS_DIR)
    report = commands.add_parser("report", help="rewrite summary.md and the plot")
    report.add_argument("--out", type=Path, default=RESULTS_DIR)
    personal = commands.add_parser(
        "personal", help="perf_analyzer with real shoppers: search, personalised search, recommend"
    )
    personal.add_argument("--repository", type=Path, default=PROJECT / "stores" / "instacart")
    personal.add_argument(
        "--held-out-repository",
        type=Path,
        default=PROJECT / "stores" / "instacart-held-out",
        help="the store built from events-before-last.csv, for the real-time gain",
    )
    personal.add_argument(
        "--data",
        type=Path,
        default=PROJECT / "stores" / "instacart-data",
        help="the folder with the store's items.csv and events.csv",
    )
    personal.add_argument("--out", type=Path, default=RESULTS_DIR)
    held_out = commands.add_parser(
        "held-out-events",
        help="write DATA/events-before-last.csv: the events without each shopper's last basket",
    )
    held_out.add_argument("--data", type=Path, default=PROJECT / "stores" / "instacart-data")
    grow = commands.add_parser(
        "grow-catalogue",
        help="the Home Depot catalogue grown to N products: real titles, then labelled synthetic "
        "variants (benchmarks/grow_catalogue.py)",
    )
    grow.add_argument(
        "--data",
        type=Path,
        default=None,
        help="the folder with homedepot/ and instacart/ (default: $DATA_DIR, ../shared/data)",
    )
    grow.add_argument("--products", type=int, required=True)
    grow.add_argument("--output", type=Path, required=True, help="the catalogue CSV to write")
    grow.add_argument("--seed", type=int, default=19)
    overload = commands.add_parser(
        "overload", help="1-64 clients with a 50 ms deadline: goodput, refusals, recovery"
    )
    overload.add_argument("--repository", type=Path, default=BUILT_REPOSITORY)
    overload.add_argument("--out", type=Path, default=RESULTS_DIR)
    steps = commands.add_parser(
        "steps", help="CPU time per query by step, in-process: a store before and after"
    )
    steps.add_argument("--before", type=Path, required=True)
    steps.add_argument("--repository", type=Path, default=BUILT_REPOSITORY)
    steps.add_argument("--queries", type=int, default=1000)
    steps.add_argument("--out", type=Path, default=RESULTS_DIR)
    filters = commands.add_parser(
        "filters", help="filtered against unfiltered search, in-process, synthetic attributes"
    )
    filters.add_argument("--repository", type=Path, default=BUILT_REPOSITORY)
    filters.add_argument("--queries", type=int, default=1000)
    filters.add_argument("--out", type=Path, default=RESULTS_DIR)
    catalogue = commands.add_parser(
        "catalogue", help="live catalogue updates: throughput, visibility, search p99 meanwhile"
    )
    catalogue.add_argument("--repository", type=Path, default=BUILT_REPOSITORY)
    catalogue.add_argument("--out", type=Path, default=RESULTS_DIR)
    memory = commands.add_parser(
        "memory", help="the server's memory (PSS, RSS) against search instances and catalogue size"
    )
    memory.add_argument(
        "--repository", type=Path, action="append", help="a store (repeat for several)"
    )
    memory.add_argument("--out", type=Path, default=RESULTS_DIR)
    milvus = commands.add_parser(
        "milvus", help="dense retrieval on Milvus against FAISS: recall@100 and latency"
    )
    milvus.add_argument("--repository", type=Path, default=BUILT_REPOSITORY)
    milvus.add_argument("--uri", help="a Milvus server (default: start Milvus Lite)")
    milvus.add_argument("--out", type=Path, default=RESULTS_DIR)
    scale = commands.add_parser(
        "scale",
        help="the catalogue grown to 250,000 and 1,000,000 products against the 55k store: build, "
        "memory, latency, quality (about an hour on 2 cores)",
    )
    scale.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="products (250000 1000000)"
    )
    scale.add_argument(
        "--encoder-from",
        type=Path,
        default=BUILT_REPOSITORY,
        help="the 55k store whose encoder is reused",
    )
    scale.add_argument("--data", type=Path, help="the folder holding homedepot/ and instacart/")
    scale.add_argument("--out", type=Path, default=RESULTS_DIR)
    explain = commands.add_parser(
        "explain", help="what EXPLAIN costs: search, personalised search, recommend, off and on"
    )
    explain.add_argument("--repository", type=Path, default=BUILT_REPOSITORY)
    explain.add_argument(
        "--personal-repository", type=Path, default=PROJECT / "stores" / "instacart"
    )
    explain.add_argument(
        "--data",
        type=Path,
        default=PROJECT / "stores" / "instacart-data",
        help="the folder with the personal store's items.csv and events.csv",
    )
    explain.add_argument("--rounds", type=int, default=3)
    explain.add_argument("--out", type=Path, default=RESULTS_DIR)
    smoke = commands.add_parser("smoke", help="seconds of everything (CI)")
    smoke.add_argument("--repository", type=Path, default=BUILT_REPOSITORY)
    smoke.add_argument("--out", type=Path, default=WORK_DIR / "smoke")
    commands.add_parser("install", help="wire perf_analyzer and print its path")
    analyzer = commands.add_parser("model-analyzer", help="prepare model_analyzer.yaml's paths")
    analyzer.add_argument("--repository", type=Path, default=BUILT_REPOSITORY)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    # Stop cleanly (servers stopped by their context managers) on SIGTERM, and on SIGINT even when
    # started in the background, where SIGINT would otherwise be ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        if args.command == "run":
            from . import perf_analyzer
            from .run import DEFAULT_SYSTEMS, RunOptions
            from .run import run as run_all

            path = run_all(
                RunOptions(
                    repository=args.repository,
                    runs=args.runs,
                    queries=args.queries,
                    concurrency=args.concurrency,
                    systems=args.systems or DEFAULT_SYSTEMS,
                    cross_check=args.cross_check,
                    settings=perf_analyzer.Settings(
                        measurement_interval_ms=args.measurement_interval
                    ),
                    out=args.out,
                )
            )
        elif args.command == "tune":
            from .tuning import tune as tune_all

            path = tune_all(
                args.repository,
                args.runs,
                tuple(args.only),
                out=args.out,
                assume_kept=tuple(args.assume_kept),
            )
        elif args.command == "report":
            from .report import write

            path = write(args.out)
        elif args.command == "grow-catalogue":
            from shopserve.export.data import DEFAULT_DATA_DIR

            from .grow_catalogue import write as write_grown

            data = args.data or DEFAULT_DATA_DIR.parent
            counts = write_grown(data, args.products, args.output, args.seed)
            print(", ".join(f"{count:,} {source}" for source, count in counts.items()))
            path = args.output
        elif args.command == "held-out-events":
            from .realtime import write_events_before_last

            path = write_events_before_last(args.data, args.data / "events-before-last.csv")
        elif args.command == "personal":
            from .personal import run as run_personal

            run_personal(args.repository, args.held_out_repository, args.data, args.out)
            path = args.out / "personal.md"
        elif args.command == "overload":
            from .overload import run as run_overload

            run_overload(args.repository, args.out)
            path = args.out / "overload.md"
        elif args.command == "steps":
            import json

            from shopserve.ensemble import store

            from .profile import compare_steps
            from .queries import load_traffic

            manifest = json.loads((args.repository / store.MANIFEST_FILE).read_text())
            queries = load_traffic(manifest, args.queries).queries
            path = args.out / "steps.md"
            path.write_text(compare_steps(args.before, args.repository, queries))
        elif args.command == "filters":
            from .filters import run as run_filters

            path = run_filters(args.repository, args.queries, args.out)
        elif args.command == "catalogue":
            from .catalogue import run as run_catalogue

            path = run_catalogue(args.repository, args.out)
        elif args.command == "memory":
            from .memory import run as run_memory

            path = run_memory(args.repository or [BUILT_REPOSITORY], args.out)
        elif args.command == "milvus":
            from .milvus import run as run_milvus

            path = run_milvus(args.repository, args.out, args.uri)
        elif args.command == "scale":
            from .scale import SIZES, ScaleOptions
            from .scale import run as run_scale

            options = ScaleOptions(tuple(args.sizes or SIZES), args.encoder_from, out=args.out)
            if args.data:
                options = replace(options, data_dir=args.data)
            path = run_scale(options)
        elif args.command == "explain":
            from .explain import run as run_explain

            run_explain(
                args.repository,
                args.personal_repository,
                args.data,
                args.out,
                rounds_count=args.rounds,
            )
            path = args.out / "explain.md"
        elif args.command == "smoke":
            from .run import smoke as run_smoke

            run_smoke(args.out, args.repository)
            path = args.out / "summary.md"
        elif args.command == "model-analyzer":
            from .model_analyzer import prepare

            print("prepared; run: " + " ".join(prepare(args.repository)))
            return 0
        else:
            from .perf_analyzer import install

            path = install()
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
