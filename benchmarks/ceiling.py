"""Ceiling (c): the served encoder alone, in ONNX Runtime in-process, at its best batch size.

The benchmark queries are tokenized up front (in log order, consecutive queries per batch, padded to
the batch's longest) and only the encoder runs in the timed loop: the compute bound of this machine
for the model every request needs. No serving, no retrieval, no IPC. Two layouts of the two cores
are measured, one session with 2 intra-op threads and two sessions with 1 thread each (two Python
threads; ONNX Runtime releases the GIL), and the ceiling is the best point of either.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from shopserve.ensemble import store
from shopserve.ensemble.models import OnnxEncoder
from shopserve.ensemble.pipeline import load_tokenizer

log = logging.getLogger("benchmarks.ceiling")

BATCH_SIZES = (1, 4, 8, 16, 32, 64)
LAYOUTS = ((1, 2), (2, 1))  # (sessions, intra-op threads each): both use the 2 cores


@dataclass(frozen=True)
class CeilingPoint:
    sessions: int
    threads: int
    batch_size: int
    throughput: float  # queries per second
    batch_ms: float  # mean time of one encoder call

    def as_dict(self) -> dict:
        return asdict(self)


def _run(encoder: OnnxEncoder, batches: list, stop_at: float, counts: list[int]) -> None:
    """Encode ``batches`` round and round until ``stop_at``; count queries and calls."""
    while True:
        for input_ids, attention_mask in batches:
            encoder(input_ids, attention_mask)
            counts[0] += len(input_ids)
            counts[1] += 1
        if time.perf_counter() >= stop_at:
            return


def measure(
    repository: Path,
    queries: Sequence[str],
    batch_sizes: Sequence[int] = BATCH_SIZES,
    min_seconds: float = 4.0,
    layouts: Sequence[tuple[int, int]] = LAYOUTS,
) -> list[CeilingPoint]:
    """Encoder throughput for each layout and batch size (each at least ``min_seconds``)."""
    tokenizer = load_tokenizer(repository)
    path = store.model_file(repository, store.ENCODER)
    points = []
    for sessions, threads in layouts:
        encoders = [OnnxEncoder(path, threads) for _ in range(sessions)]
        for size in batch_sizes:
            batches = [
                tokenizer.batch(list(queries[i : i + size])) for i in range(0, len(queries), size)
            ]
            for encoder in encoders:
                encoder(*batches[0])  # warm-up
            counts = [[0, 0] for _ in encoders]
            started = time.perf_counter()
            workers = [
                threading.Thread(
                    target=_run, args=(e, batches[i::sessions], started + min_seconds, counts[i])
                )
                for i, e in enumerate(encoders)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            elapsed = time.perf_counter() - started
            done = sum(c[0] for c in counts)
            calls = sum(c[1] for c in counts)
            point = CeilingPoint(
                sessions, threads, size, done / elapsed, elapsed * sessions / calls * 1e3
            )
            points.append(point)
            log.info(
                "encoder %d session(s) x %d thread(s), batch %3d: %7.1f queries/s (%.2f ms a call)",
                sessions,
                threads,
                size,
                point.throughput,
                point.batch_ms,
            )
    return points


def best(points: Sequence[CeilingPoint]) -> CeilingPoint:
    return max(points, key=lambda p: p.throughput)
