"""Personalisation and live events, measured on a store built with ``--events``, one server, one run
(so that ratios are taken within it). perf_analyzer with real shoppers:

* ``search_anonymous``: ``search`` with real queries (the aisle names of products the log's shoppers
  bought);
* ``search_personal``: the same queries, each with the id of a shopper who bought in that aisle;
* ``recommend``: ``recommend`` for the log's shoppers, TOP_K 10.

Targets: ``recommend`` p99 at concurrency 1 below anonymous search's, and personalised search p50
within 20 % of anonymous search's. Then the live-event measurements of :mod:`benchmarks.realtime`: the
real-time gain, the visibility of events under load, and ingestion throughput.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
from shopserve.ensemble import store
from shopserve.export.selfcheck import category_leaf

from shopserve.server import ServerConfig, TritonServer, default_live_profiles, free_ports

from . import perf_analyzer, realtime, variants
from .common import WORK_DIR, BenchmarkError, cpu_lock, write_results
from .local_redis import running_redis
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
ROUNDS = 3  # the scenarios are measured in turn, this many times; tables show medians


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


def steps(scenario: str, pairs: list[tuple[str, str]]) -> list[dict]:
    """One scenario's requests, as perf_analyzer input data steps."""
    if scenario == "recommend":
        return [{"USER_ID": [user], "TOP_K": [TOP_K]} for user, _ in pairs]
    if scenario == "search_personal":
        return [{"QUERY": [q], "TOP_K": [TOP_K], "USER_ID": [user]} for user, q in pairs]
    return [{"QUERY": [q], "TOP_K": [TOP_K]} for _, q in pairs]


def input_data(scenario: str, pairs: list[tuple[str, str]], path: Path) -> Path:
    """perf_analyzer ``--input-data`` JSON for one scenario."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": steps(scenario, pairs)}, ensure_ascii=False))
    return path


def _as_built(work: Path) -> Path:
    """``work`` without the live profiles an earlier run left there: each run's servers start
    from their build. (A rerun that kept them measured the real-time gain as zero: its "without
    the live events" already held the previous run's events.)"""
    shutil.rmtree(default_live_profiles(work).parent, ignore_errors=True)
    return work


@contextmanager
def _throwaway_redis() -> Iterator[str]:
    """A Redis of its own for this run (its data in the work folder, emptied first)."""
    folder = WORK_DIR / "redis"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with running_redis(folder) as url:
        yield url


def run(
    repository: Path,
    held_out_repository: Path,
    data: Path,
    out: Path,
    settings: perf_analyzer.Settings = perf_analyzer.DEFAULT_SETTINGS,
    concurrency: tuple[int, ...] = CONCURRENCY,
    steps: int = STEPS,
    rounds_count: int = ROUNDS,
    redis: bool = False,
) -> dict:
    """Measure every scenario at every level on one server, and the real-time gain on a server of
    ``held_out_repository`` (the store built without each shopper's last basket); write
    ``personal.json`` and return it. With ``redis`` the first server keeps its live profiles in
    a throwaway Redis (fsyncing every write) instead of its SQLite file, and the results go to
    ``personal-redis.json``; the real-time gain is measured on SQLite either way."""
    wrapper = perf_analyzer.install()
    pairs = traffic(data, steps)
    variant = variants.materialize(
        HEADLINE.plus("personal", "the personalised store, response cache off"), repository
    )
    rounds: list[dict[str, dict[int, dict]]] = []
    grpc_port, http_port, metrics_port = free_ports(3)
    work = WORK_DIR / "triton" / "personal"
    sources = {s: input_data(s, pairs, out / "raw" / f"{s}.json") for s in SCENARIOS}
    with ExitStack() as stack:
        location = stack.enter_context(_throwaway_redis()) if redis else None
        config = ServerConfig(
            variant,
            grpc_port,
            http_port,
            metrics_port,
            work_dir=_as_built(work),
            profile_store=location,
        )
        server = stack.enter_context(
            TritonServer(config, log_file=WORK_DIR / "logs" / "personal.log")
        )
        for number in range(rounds_count):
            rows: dict[str, dict[int, dict]] = {}
            for scenario, model in SCENARIOS.items():
                rows[scenario] = {}
                for level in concurrency:
                    with cpu_lock(f"personal {scenario} c={level}"):
                        row = perf_analyzer.measure(
                            wrapper,
                            server.grpc_url,
                            model,
                            sources[scenario],
                            level,
                            out / "raw" / f"{scenario}-c{level}-r{number}.csv",
                            settings,
                        )
                    rows[scenario][level] = asdict(row)
            rounds.append(rows)
        ingest = realtime.ingestion(
            server,
            wrapper,
            out,
            out / "raw" / "search_anonymous.json",
            out / "raw" / "recommend.json",
            settings,
            rounds_count,
        )
    held_out = ServerConfig(
        held_out_repository, *free_ports(3), work_dir=_as_built(work / "held-out")
    )
    with TritonServer(held_out, log_file=WORK_DIR / "logs" / "personal-held-out.log") as server:
        live = realtime.gain(server, data, sorted({q for _, q in pairs}))
    first = min(concurrency)

    def ratio(scenario: str, metric: str) -> float:
        """The median over rounds of the ratio within each round (against anonymous search)."""
        return float(
            np.median(
                [r[scenario][first][metric] / r["search_anonymous"][first][metric] for r in rounds]
            )
        )

    result = {
        "repository": str(repository),
        "held_out_repository": str(held_out_repository),
        "steps": steps,
        "rounds": rounds_count,
        "concurrency": list(concurrency),
        "scenarios": {
            scenario: {
                level: {
                    metric: float(np.median([r[scenario][level][metric] for r in rounds]))
                    for metric in ("throughput", "p50_us", "p99_us")
                }
                for level in concurrency
            }
            for scenario in SCENARIOS
        },
        "rounds_measured": rounds,
        "live_events": live,
        "ingestion": ingest,
        "targets": {
            "recommend_p99_over_search_p99_at_1": ratio("recommend", "p99_us"),
            "personal_p50_over_search_p50_at_1": ratio("search_personal", "p50_us"),
            "events_b1_over_search_requests_at_8": ingest["events_b1_over_search_requests"],
            "events_b32_over_search_requests_at_8": ingest["events_b32_over_search_requests"],
            "recommend_p99_with_events_over_quiet": ingest["recommend_p99_with_events_over_quiet"],
        },
    }
    result["profile_store"] = "redis" if redis else "sqlite"
    write_results(out, "personal-redis" if redis else "personal", result, markdown(result))
    log.info("personalisation scenarios: %s", result["targets"])
    return result


def markdown(result: dict) -> str:
    lines = [
        f"Medians of {result['rounds']} rounds (ratios: the median of the ratios within each round).",
        "",
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
    live = result["live_events"]
    ingest = result["ingestion"]["rows"]
    lines += [
        "",
        f"- `recommend` p99 ÷ anonymous `search` p99 at concurrency 1: "
        f"{targets['recommend_p99_over_search_p99_at_1']:.2f} (target < 1)",
        f"- personalised ÷ anonymous `search` p50 at concurrency 1: "
        f"{targets['personal_p50_over_search_p50_at_1']:.2f} (target ≤ 1.20)",
        "",
        "Live events (the first half of each held-out basket sent as add_to_cart, then recommend "
        f"for the rest; {live['users']} shoppers, {live['background_search_clients']} clients "
        "searching meanwhile):",
        "",
        "| | Recall@20 of the rest of the basket |",
        "|---|---|",
        f"| without the live events | {_ci(live['recall20_without_live_events'])} |",
        f"| with them | {_ci(live['recall20_with_live_events'])} |",
        "",
        f"- the next request after the acknowledgement saw the events for "
        f"{live['next_request_saw_the_events']:.1%} of shoppers; acknowledgement p50 "
        f"{live['acknowledgement_ms']['p50']:.1f} ms, p99 {live['acknowledgement_ms']['p99']:.1f} ms",
        "",
        "| ingestion scenario | req/s | events/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, batch in (("search_c8", 0), ("events_b1_c8", 1), ("events_b32_c8", 32)):
        row = ingest[name]
        events = f"{row['throughput'] * batch:.0f}" if batch else "—"
        lines.append(
            f"| `{name}` | {row['throughput']:.0f} | {events} | {row['p50_us'] / 1e3:.1f} | "
            f"{row['p99_us'] / 1e3:.1f} |"
        )
    lines += [
        "",
        f"- durable ingestion ÷ `search` requests at concurrency 8: batches of 1 "
        f"{targets['events_b1_over_search_requests_at_8']:.1f}× (target ≥ 4), batches of 32 "
        f"{targets['events_b32_over_search_requests_at_8']:.1f}× in events (target ≥ 40)",
        f"- `recommend` p99 at concurrency 1 while {result['ingestion']['stream_rate']} events/s "
        f"stream in ÷ quiet: {targets['recommend_p99_with_events_over_quiet']:.2f} (target ≤ 1.20; "
        f"{ingest['recommend_c1']['p99_us'] / 1e3:.1f} → "
        f"{ingest['recommend_c1_with_events']['p99_us'] / 1e3:.1f} ms)",
    ]
    return "\n".join(lines) + "\n"


def _ci(value: dict) -> str:
    low, high = value["ci95"]
    return f"{value['mean']:.3f} [{low:.3f}, {high:.3f}]"
