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


FINE_STEPS = ("tokenize", "encoder", "dense search", "BM25", "features", "ranker", "top-k")


def cpu_by_step(
    pipeline: SearchPipeline, queries: Sequence[str], encoder_batch: int = 1
) -> dict[str, float]:
    """CPU µs per query of each fine step (process CPU time, one thread), the encoder called on
    ``encoder_batch`` queries at a time as the server's batches would."""
    from shopserve.ensemble.features import CatalogueStats, ranking_features

    retriever = pipeline.retriever
    for query in queries[:20]:
        pipeline.search(query, 10)
    totals = dict.fromkeys(FINE_STEPS, 0.0)
    for start in range(0, len(queries), encoder_batch):
        group = list(queries[start : start + encoder_batch])
        t0 = time.process_time()
        tokens = pipeline.tokenizer.batch(group)
        t1 = time.process_time()
        embeddings = pipeline.encoder(*tokens)
        t2 = time.process_time()
        totals["tokenize"] += t1 - t0
        totals["encoder"] += t2 - t1
        for query, embedding in zip(group, embeddings, strict=True):
            t0 = time.process_time()
            dense_rows, _ = retriever.dense.search(embedding.reshape(1, -1), retriever.dense_depth)
            t1 = time.process_time()
            terms = retriever.lexical.analyze(query)
            bm25 = retriever.lexical.sparse_scores(terms)
            lexical_rows = bm25.top(retriever.lexical_depth)
            t2 = time.process_time()
            rows = np.union1d(dense_rows[0][dense_rows[0] >= 0], lexical_rows)
            cosine = retriever.dense.vectors(rows) @ embedding
            stats = CatalogueStats.of(bm25, *retriever.dense.cosine_moments(embedding))
            features = ranking_features(
                retriever.lexical, terms, rows, cosine, bm25.at(rows), stats
            )
            t3 = time.process_time()
            logits = pipeline.ranker(features)
            t4 = time.process_time()
            pipeline.postprocessor(rows, logits, 10)
            t5 = time.process_time()
            for step, seconds in zip(
                FINE_STEPS[2:], (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True
            ):
                totals[step] += seconds
    return {step: seconds / len(queries) * 1e6 for step, seconds in totals.items()}


def compare_steps(
    before: Path, after: Path, queries: Sequence[str], batches: Sequence[int] = (1, 4)
) -> str:
    """A Markdown table of CPU µs per query by step: the ``before`` store one query at a time,
    the ``after`` store at each encoder batch in ``batches``."""
    columns = {"before (batch 1)": cpu_by_step(SearchPipeline.from_repository(before), queries)}
    after_pipeline = SearchPipeline.from_repository(after)
    for batch in batches:
        columns[f"after (batch {batch})"] = cpu_by_step(after_pipeline, queries, batch)
    lines = [
        "| step | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for step in (*FINE_STEPS, "total"):
        cells = [sum(c.values()) if step == "total" else c[step] for c in columns.values()]
        lines.append(f"| {step} | " + " | ".join(f"{v:,.0f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"
