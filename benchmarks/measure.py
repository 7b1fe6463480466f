"""One measurement of one concurrency level, with CPU accounting and a guard against neighbours.

The machine's two cores are shared. Around every measurement the busy CPU time of the whole machine
is compared with that of the processes under test (the server and its stubs, perf_analyzer or this
process's load generator): when other processes used more than ``FOREIGN_LIMIT`` cores on average,
the measurement is repeated once the machine is quiet again, and the share is recorded either way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from . import cpu, perf_analyzer, stats
from .loadgen import measure as loadgen_measure
from .queries import Traffic
from .systems import PERF_ANALYZER, TRITON, Running

log = logging.getLogger("benchmarks.measure")

FOREIGN_LIMIT = 0.25  # cores used by other processes during a measurement
ATTEMPTS = 3
QUIET_WAIT_S = 600


class _Accounting:
    """CPU seconds of the machine, the server tree and the clients, at one instant."""

    def __init__(self, running: Running) -> None:
        self.running = running
        self.wall = time.monotonic()
        self.machine, self.steal = cpu.machine_busy_seconds()
        self.server = cpu.server_snapshot(running.pid, running.server_label) if running.pid else {}
        self.children = cpu.children_seconds()
        self.own = cpu.self_seconds()

    def per_request_ms(self, later: _Accounting, requests: int, driver: str) -> dict[str, float]:
        out = cpu.per_request_ms(self.server, later.server, requests)
        spent = later.children - self.children if driver == PERF_ANALYZER else later.own - self.own
        if requests > 0:
            out[f"client ({driver})"] = spent / requests * 1e3
        return out

    def foreign_cores(self, later: _Accounting) -> float:
        """Cores used on average by processes other than the ones under test."""
        ours = sum(later.server.values()) - sum(self.server.values())
        ours += (later.children - self.children) + (later.own - self.own)
        wall = max(later.wall - self.wall, 1e-9)
        return max(0.0, (later.machine - self.machine) - ours) / wall

    def steal_cores(self, later: _Accounting) -> float:
        """Cores the hypervisor gave to other guests while this VM wanted them."""
        return (later.steal - self.steal) / max(later.wall - self.wall, 1e-9)


def wait_until_quiet(running: Running, limit: float = FOREIGN_LIMIT, window_s: float = 3.0) -> None:
    """Wait (up to QUIET_WAIT_S) until processes other than ours use less than ``limit`` cores."""
    deadline = time.monotonic() + QUIET_WAIT_S
    while time.monotonic() < deadline:
        start = _Accounting(running)
        time.sleep(window_s)
        busy = start.foreign_cores(_Accounting(running))
        if busy < limit:
            return
        log.info("other processes use %.2f cores; waiting for a quiet machine", busy)


def measure_level(
    running: Running,
    driver: str,
    level: int,
    settings: perf_analyzer.Settings,
    traffic: Traffic,
    data: Path,
    csv_path: Path,
    wrapper: Path,
    attempts: int = ATTEMPTS,
) -> dict:
    """Measure ``level`` with ``driver`` (perf_analyzer or the load generator); return the row
    with Triton's per-step times (``steps``), CPU ms per request by process (``cpu_ms``), and the
    cores other processes used meanwhile (``foreign_cores``; repeated up to ``attempts`` times
    while that is over the limit)."""
    triton = running.system.server == TRITON
    for attempt in range(1, attempts + 1):
        before_stats = stats.snapshot(running.http_url) if triton else None
        before = _Accounting(running)
        if driver == PERF_ANALYZER:
            row = perf_analyzer.measure(
                wrapper, running.grpc_url, running.system.model, data, level, csv_path, settings
            )
        else:
            row = loadgen_measure(running.sessions(), traffic.queries, level, settings)
        after = _Accounting(running)
        steps = stats.difference(before_stats, stats.snapshot(running.http_url)) if triton else None
        foreign = before.foreign_cores(after)
        if foreign < FOREIGN_LIMIT or attempt == attempts:
            break
        log.warning(
            "other processes used %.2f cores during this measurement (limit %.2f): repeating",
            foreign,
            FOREIGN_LIMIT,
        )
        wait_until_quiet(running)
    if steps is not None and running.system.model in steps:
        requests = steps[running.system.model].requests
    else:
        requests = getattr(row, "all_requests", 0)
    out = {
        **asdict(row),
        "cpu_ms": before.per_request_ms(after, requests, driver),
        "foreign_cores": round(foreign, 3),
        "steal_cores": round(before.steal_cores(after), 3),
        "attempts": attempt,
    }
    if steps is not None:
        out["steps"] = {name: step.as_dict() for name, step in steps.items()}
    return out
