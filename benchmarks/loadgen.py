"""A closed-loop load generator with perf_analyzer's load shape and measurement definitions.

``concurrency`` worker threads each keep one request outstanding and send the benchmark queries in
perf_analyzer's order (:func:`benchmarks.queries.worker_order`). Measurement follows perf_analyzer's
concurrency mode: consecutive windows of ``measurement_interval_ms``; a request belongs to the window
in which it completes; the run is stable when the last three windows' throughput and mean latency are
each within ``stability_percentage`` of their means; the result merges those three windows
(throughput = requests / time, percentiles over their latencies, index ``int(n * p / 100)``).
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .common import BenchmarkError
from .perf_analyzer import DEFAULT_SETTINGS, LatencySummary, Settings
from .queries import TOP_K, worker_order

log = logging.getLogger("benchmarks.loadgen")

STABILITY_WINDOWS = 3


class Session(Protocol):
    """One worker's connection: send a query, return the top-k product ids."""

    def __call__(self, query: str) -> list[int]: ...

    def close(self) -> None: ...


SessionFactory = Callable[[], Session]


class HttpSession:
    """A keep-alive HTTP/1.1 connection to the FastAPI baseline's ``POST /search``."""

    def __init__(self, url: str, top_k: int = TOP_K) -> None:
        host, port = url.rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=120)
        self.top_k = top_k

    def __call__(self, query: str) -> list[int]:
        body = json.dumps({"query": query, "top_k": self.top_k})
        self.connection.request("POST", "/search", body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise BenchmarkError(f"baseline answered {response.status}: {data[:300]!r}")
        return json.loads(data)["product_ids"]

    def close(self) -> None:
        self.connection.close()


class TritonSession:
    """shopserve's gRPC client to one endpoint model (one channel per worker)."""

    def __init__(self, url: str, model: str, top_k: int = TOP_K) -> None:
        from shopserve.client import SearchClient

        self.client = SearchClient(url, model_name=model, timeout=120)
        self.top_k = top_k

    def __call__(self, query: str) -> list[int]:
        return [hit.product_id for hit in self.client.search(query, self.top_k)]

    def close(self) -> None:
        self.client.close()


def http_sessions(url: str) -> SessionFactory:
    return lambda: HttpSession(url)


def triton_sessions(url: str, model: str) -> SessionFactory:
    return lambda: TritonSession(url, model)


@dataclass(frozen=True)
class LoadResult(LatencySummary):
    """One concurrency level as the load generator measured it."""

    requests: int  # in the three merged windows
    windows: int
    stable: bool
    all_requests: int  # over the whole measurement, windows not merged included


def percentile_us(latencies: np.ndarray, percentile: float) -> float:
    ordered = np.sort(latencies)
    return float(ordered[min(int(len(ordered) * percentile / 100), len(ordered) - 1)]) * 1e6


class _Worker(threading.Thread):
    def __init__(
        self, factory: SessionFactory, queries: Sequence[str], order, stop: threading.Event
    ) -> None:
        super().__init__(daemon=True)
        self.factory, self.queries, self.order, self.stop = factory, queries, order, stop
        self.completions: list[tuple[float, float]] = []  # (end time, latency) in seconds
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            session = self.factory()
            try:
                for index in self.order:
                    if self.stop.is_set():
                        break
                    started = time.perf_counter()
                    session(self.queries[index])
                    ended = time.perf_counter()
                    self.completions.append((ended, ended - started))
            finally:
                session.close()
        except Exception as exc:  # reported by the measuring thread
            self.error = exc
            self.stop.set()


def _stable(throughputs: list[float], latencies: list[float], percentage: float) -> bool:
    if len(throughputs) < STABILITY_WINDOWS:
        return False
    band = percentage / 100
    for values in (throughputs[-STABILITY_WINDOWS:], latencies[-STABILITY_WINDOWS:]):
        mean = sum(values) / len(values)
        if mean <= 0 or any(not 1 - band <= v / mean <= 1 + band for v in values):
            return False
    return True


def measure(
    factory: SessionFactory,
    queries: Sequence[str],
    concurrency: int,
    settings: Settings = DEFAULT_SETTINGS,
) -> LoadResult:
    """Closed-loop load at ``concurrency`` until stable (or ``max_trials`` windows)."""
    stop = threading.Event()
    workers = [
        _Worker(factory, queries, worker_order(len(queries), concurrency, w), stop)
        for w in range(concurrency)
    ]
    for worker in workers:
        worker.start()
    interval = settings.measurement_interval_ms / 1000
    bounds = [time.perf_counter()]
    throughputs: list[float] = []
    mean_latencies: list[float] = []

    def window(start: float, end: float) -> np.ndarray:
        return np.array(
            [lat for w in workers for (done, lat) in list(w.completions) if start <= done < end]
        )

    try:
        while len(throughputs) < settings.max_trials:
            time.sleep(max(0.0, bounds[-1] + interval - time.perf_counter()))
            bounds.append(time.perf_counter())
            failed = [w.error for w in workers if w.error is not None]
            if failed:
                raise BenchmarkError(f"load generator request failed: {failed[0]}") from failed[0]
            latencies = window(bounds[-2], bounds[-1])
            throughputs.append(len(latencies) / (bounds[-1] - bounds[-2]))
            mean_latencies.append(float(latencies.mean()) if len(latencies) else 0.0)
            log.debug("window %d: %.1f req/s", len(throughputs), throughputs[-1])
            if _stable(throughputs, mean_latencies, settings.stability_percentage):
                break
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=300)
    stable = _stable(throughputs, mean_latencies, settings.stability_percentage)
    start = bounds[-STABILITY_WINDOWS - 1] if len(bounds) > STABILITY_WINDOWS else bounds[0]
    merged = window(start, bounds[-1])
    if len(merged) == 0:
        raise BenchmarkError(f"no request completed at concurrency {concurrency}")
    result = LoadResult(
        concurrency=concurrency,
        throughput=len(merged) / (bounds[-1] - start),
        p50_us=percentile_us(merged, 50),
        p90_us=percentile_us(merged, 90),
        p95_us=percentile_us(merged, 95),
        p99_us=percentile_us(merged, 99),
        avg_us=float(merged.mean()) * 1e6,
        requests=len(merged),
        windows=len(throughputs),
        stable=stable,
        all_requests=sum(len(w.completions) for w in workers),
    )
    log.info(
        "  %.1f req/s, p50 %.2f ms, p99 %.2f ms (%d windows%s)",
        result.throughput,
        result.p50_us / 1e3,
        result.p99_us / 1e3,
        result.windows,
        "" if stable else ", NOT stable",
    )
    return result


def answers(
    factory: SessionFactory, queries: Sequence[str], concurrency: int = 4
) -> list[list[int]]:
    """Each query's top-k ids, every query sent exactly once (closed loop, ``concurrency`` workers)."""
    results: list[list[int] | None] = [None] * len(queries)
    errors: list[Exception] = []

    def work(worker: int) -> None:
        session = factory()
        try:
            for index in range(worker, len(queries), concurrency):
                if errors:
                    return
                results[index] = session(queries[index])
        except Exception as exc:
            errors.append(exc)
        finally:
            session.close()

    threads = [threading.Thread(target=work, args=(w,)) for w in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchmarkError(f"collecting answers failed: {errors[0]}") from errors[0]
    return [r if r is not None else [] for r in results]
