"""Triton's per-model statistics (``/v2/models/stats``), differenced around a measurement."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import asdict, dataclass

from shopserve.ensemble import store

STEP_ORDER = store.MODELS


def snapshot(http_url: str) -> dict[str, dict]:
    """Every model's cumulative ``inference_stats`` and ``execution_count``, by model name."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"]
    return {
        model["name"]: {**model["inference_stats"], "execution_count": model["execution_count"]}
        for model in stats
    }


@dataclass(frozen=True)
class StepTime:
    """One model's mean server time per request (µs) over a measurement."""

    requests: int
    executions: int
    queue_us: float
    compute_us: float  # compute input + infer + output
    total_us: float  # success time: queue + compute (+ the ensemble's own overhead)
    cache_hits: int

    def as_dict(self) -> dict:
        return asdict(self)


def _ns(stats: dict, key: str) -> int:
    return int(stats.get(key, {}).get("ns", 0))


def _count(stats: dict, key: str) -> int:
    return int(stats.get(key, {}).get("count", 0))


def difference(before: dict[str, dict], after: dict[str, dict]) -> dict[str, StepTime]:
    """Per-model mean times between two snapshots (models that served no request are left out)."""
    out = {}
    for name in sorted(after, key=lambda n: STEP_ORDER.index(n) if n in STEP_ORDER else 99):
        a, b = after[name], before.get(name, {})
        requests = _count(a, "success") - _count(b, "success")
        if requests <= 0:
            continue
        compute = sum(
            _ns(a, k) - _ns(b, k) for k in ("compute_input", "compute_infer", "compute_output")
        )
        out[name] = StepTime(
            requests=requests,
            executions=int(a["execution_count"]) - int(b.get("execution_count", 0)),
            queue_us=(_ns(a, "queue") - _ns(b, "queue")) / requests / 1e3,
            compute_us=compute / requests / 1e3,
            total_us=(_ns(a, "success") - _ns(b, "success")) / requests / 1e3,
            cache_hits=_count(a, "cache_hit") - _count(b, "cache_hit"),
        )
    return out
