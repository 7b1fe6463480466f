"""The overload scenario: more load than the machine can serve, with deadlines.

Clients (1 to 64) send real queries of the Home Depot log to the shipped ``search`` endpoint as fast
as they can, each with a 50 ms deadline (passed to the server as the request timeout). A client whose
request is refused (OverloadedError: the server's bounded queue was full) backs off as a
well-behaved client does: a pause drawn from 0 to 50 ms x 2^(refusals in a row), at most 1 s
(full jitter), reset by an answer. Reported per level: goodput (answers within their deadline per
second), refusals, timeouts, answers the client saw later than the deadline (gRPC discards an answer
after its deadline, so these are the client's own scheduling lag on the shared cores), and the
latency of a fresh request right after each level. The capacity it is compared with is 8 clients
without a deadline, the same driver, in the same run, against the same models with a queue deep
enough that closed-loop clients are never refused (the sweep's variant): what the machine serves.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import time
from pathlib import Path

from shopserve.client import (
    AsyncSearchClient,
    OverloadedError,
    RequestTimeoutError,
    SearchClient,
    SearchError,
)
from shopserve.ensemble import store

from shopserve.server import ServerConfig, TritonServer, free_ports

from . import variants
from .common import WORK_DIR, cpu_lock, write_results
from .queries import load_traffic
from .tuning import HEADLINE

log = logging.getLogger("benchmarks.overload")

LEVELS = (1, 8, 16, 32, 64)
DEADLINE_S = 0.05
DURATION_S = 6.0
CAPACITY_CLIENTS = 8
TARGET_GOODPUT = 0.8  # of the capacity, with 64 clients
TARGET_FRESH_S = 1.0
BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0


async def drive(
    url: str,
    queries: list[str],
    clients: int,
    deadline: float | None,
    duration: float = DURATION_S,
) -> dict:
    """``clients`` closed-loop clients for ``duration`` seconds; what became of their requests."""
    outcomes = {"answered": 0, "late": 0, "refused": 0, "timed_out": 0, "failed": 0}
    refusal_ms: list[float] = []
    answer_ms: list[float] = []
    next_query = itertools.count()
    stop_at = time.monotonic() + duration

    async def client_loop(seed: int) -> None:
        pause = random.Random(seed)
        timeout = deadline if deadline is not None else 5.0
        refused_in_a_row = 0
        async with AsyncSearchClient(url, timeout=timeout) as client:
            while time.monotonic() < stop_at:
                query = queries[next(next_query) % len(queries)]
                started = time.monotonic()
                try:
                    await client.search(query, top_k=10)
                    took = time.monotonic() - started
                    outcomes[
                        "late" if deadline is not None and took > deadline else "answered"
                    ] += 1
                    answer_ms.append(took * 1e3)
                    refused_in_a_row = 0
                except (OverloadedError, RequestTimeoutError) as shed:
                    # Refused at once, or dropped when its deadline passed in the queue (the
                    # server has the client's deadline): either way the server is past capacity.
                    if isinstance(shed, OverloadedError):
                        outcomes["refused"] += 1
                        refusal_ms.append((time.monotonic() - started) * 1e3)
                    else:
                        outcomes["timed_out"] += 1
                    refused_in_a_row += 1
                    ceiling = min(BACKOFF_S * 2**refused_in_a_row, MAX_BACKOFF_S)
                    await asyncio.sleep(pause.uniform(0, ceiling))
                except SearchError:
                    outcomes["failed"] += 1

    started = time.monotonic()
    await asyncio.gather(*(client_loop(seed) for seed in range(clients)))
    elapsed = time.monotonic() - started
    refusal_ms.sort()
    answer_ms.sort()
    return {
        "clients": clients,
        "deadline_ms": None if deadline is None else deadline * 1e3,
        "seconds": elapsed,
        **outcomes,
        "goodput": outcomes["answered"] / elapsed,
        "refusal_p50_ms": refusal_ms[len(refusal_ms) // 2] if refusal_ms else None,
        "answer_p50_ms": answer_ms[len(answer_ms) // 2] if answer_ms else None,
    }


def _server(variant: variants.Variant, repository: Path) -> TritonServer:
    grpc_port, http_port, metrics_port = free_ports(3)
    config = ServerConfig(
        variants.materialize(variant, repository),
        grpc_port,
        http_port,
        metrics_port,
        work_dir=WORK_DIR / "triton" / variant.name,
    )
    return TritonServer(config, log_file=WORK_DIR / "logs" / f"{variant.name}.log")


def run(repository: Path, out: Path) -> dict:
    queries = load_traffic(
        json.loads((repository / store.MANIFEST_FILE).read_text()), 10_000
    ).queries
    with (
        _server(HEADLINE.plus("capacity", "for the capacity"), repository) as server,
        cpu_lock("overload capacity"),
    ):
        capacity = asyncio.run(drive(server.grpc_url, queries, CAPACITY_CLIENTS, None))
    with _server(variants.Variant("overload", "as shipped"), repository) as server:
        levels = []
        for clients in LEVELS:
            with cpu_lock(f"overload {clients} clients"):
                levels.append(asyncio.run(drive(server.grpc_url, queries, clients, DEADLINE_S)))
                started = time.monotonic()
                with SearchClient(server.grpc_url, timeout=30) as fresh:
                    fresh.search("cordless drill", top_k=10)
                levels[-1]["fresh_request_after_s"] = time.monotonic() - started
            log.info("overload: %s", levels[-1])
    burst = levels[-1]
    result = {
        "capacity": capacity,
        "levels": levels,
        "targets": {
            "goodput_at_64_over_capacity": burst["goodput"] / capacity["goodput"],
            "fresh_request_after_64_s": burst["fresh_request_after_s"],
            "late_answers": sum(level["late"] for level in levels),
        },
    }
    write_results(out, "overload", result, markdown(result))
    return result


def markdown(result: dict) -> str:
    capacity = result["capacity"]
    lines = [
        f"Capacity: {capacity['goodput']:.0f} answers/s with {capacity['clients']} clients and no "
        "deadline. Every other row: each request with a 50 ms deadline, "
        f"{DURATION_S:.0f} s per level.",
        "",
        "| clients | goodput (answers in time /s) | refused | timed out | late | refusal p50 ms "
        "| fresh request after |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in result["levels"]:
        refusal = level["refusal_p50_ms"]
        lines.append(
            f"| {level['clients']} | {level['goodput']:.0f} | {level['refused']} | "
            f"{level['timed_out']} | {level['late']} | "
            f"{'—' if refusal is None else f'{refusal:.1f}'} | "
            f"{level['fresh_request_after_s'] * 1e3:.0f} ms |"
        )
    targets = result["targets"]
    lines += [
        "",
        f"- goodput with 64 clients ÷ capacity: {targets['goodput_at_64_over_capacity']:.2f} "
        f"(target ≥ {TARGET_GOODPUT})",
        f"- a fresh request right after the 64-client burst: "
        f"{targets['fresh_request_after_64_s'] * 1e3:.0f} ms (target < {TARGET_FRESH_S * 1e3:.0f} ms)",
        f"- answers later than their deadline: {targets['late_answers']} (target 0)",
    ]
    return "\n".join(lines) + "\n"
