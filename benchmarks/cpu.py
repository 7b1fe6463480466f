"""CPU time per request, by process: the server, each Python-backend stub (by model), the client.

On a 2-core machine throughput is CPU time: a system that spends X ms of CPU per request serves at
most 2000 / X requests per second. Read from ``/proc/<pid>/stat`` (utime + stime, all threads) for
the server and its children, and from ``getrusage`` for the load-generating client.
"""

from __future__ import annotations

import os
import resource
from collections import defaultdict
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # the process is gone
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _label(pid: int, server_label: str) -> str:
    """A Triton Python-backend stub's model name (its first argument is the model file)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    if len(args) > 1 and b"triton_python_backend_stub" in args[0]:
        parts = Path(args[1].decode()).parts
        return parts[-3] if len(parts) >= 3 else "stub"
    return f"{server_label} child"


def server_snapshot(pid: int, label: str) -> dict[str, float]:
    """CPU seconds so far of ``pid`` (as ``label``) and of its children, summed by model."""
    out: dict[str, float] = defaultdict(float)
    out[label] += _cpu_seconds(pid)
    for child in _children(pid):
        out[_label(child, label)] += _cpu_seconds(child)
    return dict(out)


def children_seconds() -> float:
    """CPU seconds of this process's waited-for children (a finished perf_analyzer run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_seconds() -> float:
    """CPU seconds of this process, all threads (the Python load generator)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_request_ms(
    before: dict[str, float], after: dict[str, float], requests: int
) -> dict[str, float]:
    """Milliseconds of CPU per request for every label between two snapshots."""
    if requests <= 0:
        return {}
    return {k: (after[k] - before.get(k, 0.0)) / requests * 1e3 for k in after}


def machine_busy_seconds() -> tuple[float, float]:
    """CPU seconds all cores spent busy so far (user, nice, system, irq, softirq), and stolen by
    the hypervisor (steal: the host ran someone else while this VM wanted the core)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / TICKS, steal / TICKS
