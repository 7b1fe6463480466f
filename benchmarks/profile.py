"""In-process step times (the same step code, no server): what each served step costs beyond it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from shopserve.ensemble import SearchPipeline, store

STEPS = store.STEPS


def step_times(repository: Path, queries: Sequence[str]) -> dict[str, float]:
    """Mean µs per query of each step of ``SearchPipeline`` (one query at a time, as served, with
    each step's thread settings from its config)."""
    pipeline = SearchPipeline.from_repository(repository)
    for query in queries[:20]:
        pipeline.search(query, 10)
    totals = np.zeros(len(STEPS))
    for query in queries:
        t0 = time.perf_counter()
        input_ids, attention_mask = pipeline.tokenizer(query)
        t1 = time.perf_counter()
        embedding = pipeline.encoder(input_ids, attention_mask)[0]
        t2 = time.perf_counter()
        candidates = pipeline.retriever(query, embedding)
        t3 = time.perf_counter()
        logits = pipeline.ranker(candidates.features)
        t4 = time.perf_counter()
        pipeline.postprocessor(candidates.rows, logits, 10)
        t5 = time.perf_counter()
        totals += np.diff([t0, t1, t2, t3, t4, t5])
    return {step: float(t) / len(queries) * 1e6 for step, t in zip(STEPS, totals, strict=True)}
