"""Tuning by measurement: each change A/B-tested against the best configuration so far.

The changes are replayed from :data:`UNTUNED` (the shipped repository with the configs it had before
tuning) through the five-model ensemble ``search_steps``, in order, each on top of the changes kept
before it; the kept ones are the configs ``model_repository/`` ships. The one-hop change is
measured through the ``search`` endpoint (the whole graph in one Python model), which the project
ships since it passed. (Tokenizing without bucket padding, also measured and shipped, is now in the
code and cannot be replayed; its row stays in results/tuning.json.) A change is kept when, over paired runs (medians), throughput at concurrency 8 rises by
≥ 3 % without p99 at concurrency 1 rising by > 10 % (or p99 at 1 falls by ≥ 5 % without throughput
falling by > 3 %), and its answers stay deterministic with dev nDCG@10 not lower by > 0.5 %.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from shopserve.ensemble import store

from . import agreement, perf_analyzer
from .common import BUILT_REPOSITORY, RESULTS_DIR, WORK_DIR, BenchmarkError, cpu_lock, write_results
from .loadgen import answers as collect_answers
from .measure import measure_level
from .queries import Traffic, load_traffic, write_perf_analyzer_data
from .systems import PERF_ANALYZER, TRITON, System, started
from .variants import (
    DYNAMIC_INT8_ENCODER_FILE,
    FP32_ENCODER_FILE,
    Edit,
    Variant,
    dynamic_batching,
    materialize,
    set_default_model_filename,
    set_instances,
    set_parameter,
    set_queue_size,
    set_response_cache,
)

log = logging.getLogger("benchmarks.tuning")

TUNING_CONCURRENCY = (1, 8)
UNTUNED_EF_SEARCH = 256
MIN_GAIN = 0.03
MAX_P99_RISE = 0.10
MIN_P99_GAIN = 0.05
MAX_NDCG_DROP = 0.005
MIN_ANN_RECALL = 0.98  # the build's gate (shopserve.export.index.MIN_ANN_RECALL)
MIN_FP32_AGREEMENT = 0.99  # (b) vs (a) top-10 agreement target

# Closed-loop clients without deadlines (the sweep, up to concurrency 16) are never refused: the
# shipped bound of 4 waiting requests is for overload with deadlines (benchmarks/overload.py).
SWEEP_QUEUE = 16
_CACHE_OFF = {
    store.SEARCH: (set_response_cache(False), set_queue_size(SWEEP_QUEUE)),
    store.ENSEMBLE: (set_response_cache(False),),
}

# What the sweep measures: model_repository as shipped (tuned), response cache off, search's queue
# bound raised for closed-loop clients.
HEADLINE = Variant(
    "ensemble",
    f"model_repository as shipped, response cache off, search queue {SWEEP_QUEUE}",
    _CACHE_OFF,
)

# The configuration shipped before the encoder became FP32 and batch-invariant: the dynamic INT8
# encoder (made from the store's FP32 graph by benchmarks.fp32) at one query per call, efSearch 512.
BEFORE = HEADLINE.plus(
    "ensemble_before",
    "as shipped before: dynamic INT8 encoder one query per call, efSearch 512, cache off",
    **{
        store.ENCODER: (set_default_model_filename(DYNAMIC_INT8_ENCODER_FILE),),
        store.RETRIEVE: (set_parameter("ef_search", "512"),),
    },
)

# The configs before tuning, where the replay of the tuning starts.
UNTUNED = HEADLINE.plus(
    "untuned",
    "the configs before tuning, response cache off",
    **{
        store.RETRIEVE: (set_parameter("ef_search", str(UNTUNED_EF_SEARCH)),),
        store.ENCODER: (set_parameter("intra_op_threads", "2"),),
        store.TOKENIZE: (set_instances(1),),
        store.RANKER: (set_instances(1),),
        store.POSTPROCESS: (set_instances(1),),
    },
)


@dataclass(frozen=True)
class Change:
    """One tuning step: config edits on top of the current best variant, or another endpoint."""

    name: str
    edits: Mapping[str, tuple[Edit, ...]] = field(default_factory=dict)
    model: str = ""  # the endpoint measured after the change ("": the one measured before it)
    code: bool = False  # a change of code (shipped when kept), not of configs
    deterministic: bool = True  # False: an answer depends on which requests share a batch
    ef_search: int | None = None  # checked against the ANN recall and agreement targets first
    required: bool = False  # kept when it makes a failing quality target pass, whatever the speed
    fp32: bool = False  # measured on the FP32 variant (b) of the current best
    informational: bool = False  # measured for the record, never kept (e.g. the response cache)
    note: str = ""


# One 2-thread encoder instance behind Triton's dynamic batcher (preferred 4/8, 500 µs delay).
ENCODER_BATCHING: Mapping[str, tuple[Edit, ...]] = {
    store.ENCODER: (
        set_parameter("intra_op_threads", "2"),
        set_instances(1),
        dynamic_batching(8, (4, 8), 500),
    )
}

CONFIG_CHANGES = (
    Change(
        "retrieve: ef_search 256 -> 512",
        {store.RETRIEVE: (set_parameter("ef_search", "512"),)},
        ef_search=512,
        required=True,
        note="the answer target: at 256 HNSW misses enough of exact search that (b) and (a) "
        "agree on < 0.99 of top-10 ids",
    ),
    Change(
        "retrieve: ef_search -> 128",
        {store.RETRIEVE: (set_parameter("ef_search", "128"),)},
        ef_search=128,
    ),
    Change(
        "encoder: intra_op_threads 2 -> 1",
        {store.ENCODER: (set_parameter("intra_op_threads", "1"),)},
        note="one query per call: a second thread costs more in sync than it computes",
    ),
    Change(
        "encoder: 2 instances (1 thread each)",
        {store.ENCODER: (set_instances(2),)},
    ),
    Change("retrieve: 2 instances", {store.RETRIEVE: (set_instances(2),)}),
    Change(
        "tokenize, ranker, postprocess: 2 instances",
        {
            store.TOKENIZE: (set_instances(2),),
            store.RANKER: (set_instances(2),),
            store.POSTPROCESS: (set_instances(2),),
        },
    ),
    Change(
        "encoder: dynamic batching (INT8), preferred 4/8, delay 500 µs",
        ENCODER_BATCHING,
        deterministic=False,
        note="dynamic INT8 quantizes each batch with one scale: answers depend on the batch",
    ),
)

CODE_CHANGES = (
    Change(
        "one Python hop: whole graph in one Python model, 2 instances (code)",
        model=store.SEARCH,
        code=True,
        note="5 Python-backend hops (IPC, stub scheduling) become 1",
    ),
    Change(
        "FP32 (b): dynamic batching, preferred 4/8, delay 500 µs",
        ENCODER_BATCHING,
        fp32=True,
        note="FP32 is batch-invariant (~1e-7): batching is safe there",
    ),
    Change(
        "response cache on (2,000 distinct queries, cycled)",
        {store.ENSEMBLE: (set_response_cache(True),)},
        informational=True,
        note="the sweep runs with the cache off; repeated queries are answered from it",
    ),
)


def _variant(base: Variant, change: Change, name: str) -> Variant:
    merged = {m: tuple(e) for m, e in base.edits.items()}
    for model, more in change.edits.items():
        merged[model] = merged.get(model, ()) + tuple(more)
    return Variant(name, change.name, merged, base.fp32 or change.fp32)


@dataclass(frozen=True)
class AnnCheck:
    """An efSearch value against the targets: INT8 recall@100 and (b)-vs-(a) style agreement."""

    ef_search: int
    recall: float  # INT8 index vs exact search, recall@100 on the dev queries (build's gate)
    fp32_agreement: float  # top-10 overlap, FP32 HNSW vs FP32 exact search, same ranker

    def passes(self) -> bool:
        return self.recall >= MIN_ANN_RECALL and self.fp32_agreement >= MIN_FP32_AGREEMENT


def ann_checks(
    repository: Path, ef_values: tuple[int, ...], traffic: Traffic, queries: int = 1000
) -> dict[int, AnnCheck]:
    """Each efSearch's recall@100 (INT8 index, dev queries) and the top-10 agreement of the FP32
    pipeline with HNSW against the same pipeline with exact search (benchmark queries): the ANN
    index is the only difference between (b) and (a)'s retrieval math."""
    from shopserve.ensemble.dense import DenseIndex
    from shopserve.ensemble.lexical import LexicalIndex
    from shopserve.ensemble.models import OnnxEncoder, OnnxRanker
    from shopserve.ensemble.pipeline import load_tokenizer
    from shopserve.ensemble.postprocess import PostProcessor
    from shopserve.ensemble.retrieve import Retriever
    from shopserve.export.index import RECALL_DEPTH, exact_top

    from . import fp32
    from .baseline import exact_dense_index

    latest = store.latest_version_dir
    tokenizer = load_tokenizer(repository)
    served = store.model_file(repository, store.ENCODER)
    encoders = {
        name: OnnxEncoder(served.with_name(name), 1) for name in (served.name, FP32_ENCODER_FILE)
    }
    int8_index = DenseIndex.load(latest(repository, store.RETRIEVE) / store.DENSE_INDEX_FILE)
    dev = encoders[served.name].embed_texts(tokenizer, traffic.dev_queries)
    exact = exact_top(int8_index.index.reconstruct_n(0, int8_index.size), dev, RECALL_DEPTH)

    artefacts = fp32.ensure(repository)
    lexical = LexicalIndex.load(latest(repository, store.RETRIEVE) / store.LEXICAL_INDEX_DIR)
    ranker = OnnxRanker(latest(repository, store.RANKER) / store.ONNX_FILE, 1)
    post = PostProcessor(
        store.Catalogue.load(latest(repository, store.POSTPROCESS) / store.CATALOGUE_FILE)
    )
    texts = traffic.queries[:queries]
    embedded = [encoders[FP32_ENCODER_FILE](*tokenizer.batch([q]))[0] for q in texts]

    def top10(retriever: Retriever) -> list[list[int]]:
        out = []
        for query, embedding in zip(texts, embedded, strict=True):
            candidates = retriever(query, embedding)
            out.append(post(candidates.rows, ranker(candidates.features), 10).product_ids.tolist())
        return out

    reference = top10(Retriever(exact_dense_index(np.load(artefacts.embeddings)), lexical))
    fp32_index = DenseIndex.load(artefacts.index)
    checks = {}
    for ef in ef_values:
        int8_index.index.hnsw.efSearch = ef
        approx, _ = int8_index.search(dev, RECALL_DEPTH)
        hits = sum(len(np.intersect1d(a, e)) for a, e in zip(approx, exact, strict=True))
        fp32_index.index.hnsw.efSearch = ef
        same = agreement.agreement(reference, top10(Retriever(fp32_index, lexical)))
        checks[ef] = AnnCheck(ef, hits / exact.size, same.overlap)
        log.info("efSearch %d: %s", ef, checks[ef])
    return checks


@dataclass
class Measured:
    points: dict[int, list[dict]] = field(default_factory=dict)  # concurrency -> one per run
    answers: list[list[int]] | None = None
    cache_hits: int = 0
    requests: int = 0

    def median(self, level: int) -> dict:
        rows = self.points.get(level, [])
        return {
            "throughput": float(np.median([r["throughput"] for r in rows])),
            "p50_us": float(np.median([r["p50_us"] for r in rows])),
            "p99_us": float(np.median([r["p99_us"] for r in rows])),
            "runs": len(rows),
        }


def _measure_once(
    system: System,
    measured: Measured,
    data: Path,
    traffic: Traffic,
    wrapper: Path,
    settings: perf_analyzer.Settings,
    want_answers: bool,
    raw_dir: Path,
) -> None:
    with cpu_lock(f"tuning: {system.name}"), started(system) as running:
        for level in TUNING_CONCURRENCY:
            number = len(measured.points.get(level, []))
            row = measure_level(
                running,
                PERF_ANALYZER,
                level,
                settings,
                traffic,
                data,
                raw_dir / f"{system.name}_c{level}_{number}.csv",
                wrapper,
            )
            ensemble = row.get("steps", {}).get(system.model, {})
            measured.cache_hits += ensemble.get("cache_hits", 0)
            measured.requests += ensemble.get("requests", 0)
            measured.points.setdefault(level, []).append(row)
        if want_answers:
            measured.answers = collect_answers(running.sessions(), traffic.dev_queries, 8)


def _decide(change: Change, before: Measured, after: Measured, traffic: Traffic) -> dict:
    b1, b8 = before.median(1), before.median(8)
    a1, a8 = after.median(1), after.median(8)
    gain = a8["throughput"] / b8["throughput"] - 1
    p99_change = a1["p99_us"] / b1["p99_us"] - 1
    faster = (gain >= MIN_GAIN and p99_change <= MAX_P99_RISE) or (
        p99_change <= -MIN_P99_GAIN and gain >= -MIN_GAIN
    )
    same = agreement.agreement(before.answers or [[]], after.answers or [[]])
    ndcg_before = agreement.dev_ndcg(traffic.dev_queries, before.answers, traffic.judgments)
    ndcg_after = agreement.dev_ndcg(traffic.dev_queries, after.answers, traffic.judgments)
    ndcg_ok = ndcg_after >= ndcg_before * (1 - MAX_NDCG_DROP)
    kept = (faster or change.required) and ndcg_ok and change.deterministic
    kept = kept and not change.informational
    reasons = [
        f"c=8 throughput {gain:+.1%}, c=1 p99 {p99_change:+.1%}",
        f"same top-10 lists as before {same.same_list:.3f}, dev nDCG@10 {ndcg_before:.4f} -> "
        f"{ndcg_after:.4f}",
    ]
    if not change.deterministic:
        reasons.append("rejected: answers would depend on which queries share a batch")
    if after.cache_hits:
        reasons.append(
            f"{after.cache_hits / max(after.requests, 1):.0%} of {after.requests:,} requests were "
            "cache hits (every query repeats after the first pass over the 2,000)"
        )
    return {
        "change": change.name,
        "kind": "code" if change.code else ("fp32" if change.fp32 else "config"),
        "kept": kept,
        "before": {str(c): before.median(c) for c in TUNING_CONCURRENCY},
        "after": {str(c): after.median(c) for c in TUNING_CONCURRENCY},
        "throughput_gain_c8": gain,
        "p99_change_c1": p99_change,
        "same_list_vs_before": same.same_list,
        "overlap_vs_before": same.overlap,
        "dev_ndcg_before": ndcg_before,
        "dev_ndcg_after": ndcg_after,
        "note": "; ".join([*reasons, change.note] if change.note else reasons),
    }


def tune(
    repository: Path = BUILT_REPOSITORY,
    runs: int = 3,
    only: tuple[str, ...] = (),
    settings: perf_analyzer.Settings | None = None,
    out: Path = RESULTS_DIR,
    assume_kept: tuple[str, ...] = (),
) -> Path:
    """A/B every change in order (or those named in ``only``, on top of the changes named in
    ``assume_kept``, applied without measuring); write ``tuning.json`` and ``tuning.md``, merged
    with the rows of changes measured before; return ``tuning.md``."""
    from . import fp32 as fp32_artefacts

    settings = settings or perf_analyzer.Settings()
    wrapper = perf_analyzer.install()
    manifest = json.loads((repository / store.MANIFEST_FILE).read_text())
    traffic = load_traffic(manifest)
    data = write_perf_analyzer_data(traffic.queries, WORK_DIR / "data" / "queries.json")
    raw_dir = out / "raw" / "tuning"
    fp32_index = None
    changes = [c for c in (*CONFIG_CHANGES, *CODE_CHANGES) if not only or c.name in only]
    ef_values = tuple(sorted({c.ef_search for c in changes if c.ef_search} | {UNTUNED_EF_SEARCH}))
    with cpu_lock("tuning: ANN checks"):
        checks = ann_checks(repository, ef_values, traffic)
    all_changes = {c.name: c for c in (*CONFIG_CHANGES, *CODE_CHANGES)}
    unknown = (set(only) | set(assume_kept)) - set(all_changes)
    if unknown:
        raise BenchmarkError(f"unknown changes {sorted(unknown)}")
    current, model = UNTUNED, store.ENSEMBLE
    for name in assume_kept:
        current = _variant(current, all_changes[name], "current")
        model = all_changes[name].model or model
    rows: list[dict] = _previous_rows(out) if only or assume_kept else []
    for number, change in enumerate(changes, start=1):
        check = checks.get(change.ef_search or 0)
        if change.required and checks[UNTUNED_EF_SEARCH].passes():
            change = replace(change, required=False)  # the shipped setting meets the targets
        if check and not check.passes():
            _put(
                rows,
                {
                    "change": change.name,
                    "kind": "config",
                    "kept": False,
                    "before": {},
                    "after": {},
                    "note": f"not measured: recall@100 {check.recall:.4f} (target ≥ "
                    f"{MIN_ANN_RECALL}), FP32 top-10 agreement with exact search "
                    f"{check.fp32_agreement:.4f} (target ≥ {MIN_FP32_AGREEMENT})",
                },
            )
            continue
        base = replace(current, fp32=True, name="fp32_base") if change.fp32 else current
        if change.fp32 and fp32_index is None:
            fp32_index = fp32_artefacts.ensure(repository).index
        before_repo = materialize(replace(base, name=f"t{number}_before"), repository, fp32_index)
        candidate = _variant(base, change, f"t{number}_after")
        after_repo = materialize(candidate, repository, fp32_index)
        log.info("=== tuning %d/%d: %s", number, len(changes), change.name)
        before, after = Measured(), Measured()
        after_model = change.model or model
        for run in range(runs):
            for measured, repo, endpoint in (
                (before, before_repo, model),
                (after, after_repo, after_model),
            ):
                system = System(repo.name, repo.name, TRITON, PERF_ANALYZER, repo, model=endpoint)
                _measure_once(system, measured, data, traffic, wrapper, settings, run == 0, raw_dir)
        row = _decide(change, before, after, traffic)
        if check:
            shipped = checks[UNTUNED_EF_SEARCH]
            row["note"] += (
                f"; recall@100 {shipped.recall:.4f} -> {check.recall:.4f}, FP32 top-10 agreement "
                f"with exact search {shipped.fp32_agreement:.4f} -> {check.fp32_agreement:.4f}"
            )
        _put(rows, row)
        log.info("%s: %s (%s)", change.name, "kept" if row["kept"] else "not kept", row["note"])
        if row["kept"] and not change.fp32:
            current, model = replace(candidate, name="current"), after_model
        _write(out, checks, runs, rows)  # after every change: a long run keeps its results
    return _write(out, checks, runs, rows)


def _previous_rows(out: Path) -> list[dict]:
    path = out / "tuning.json"
    return json.loads(path.read_text())["changes"] if path.exists() else []


def _put(rows: list[dict], row: dict) -> None:
    """Add or replace ``row`` (by change name), keeping the changes' declared order."""
    order = [c.name for c in (*CONFIG_CHANGES, *CODE_CHANGES)]
    rows[:] = [r for r in rows if r["change"] != row["change"]] + [row]
    rows.sort(key=lambda r: order.index(r["change"]) if r["change"] in order else len(order))


def _write(out: Path, checks: dict[int, AnnCheck], runs: int, rows: list[dict]) -> Path:
    """Write tuning.json (ANN checks merged with earlier ones) and tuning.md."""
    from .report import tuning_lines

    previous = out / "tuning.json"
    ann = json.loads(previous.read_text()).get("ann_checks", {}) if previous.exists() else {}
    ann.update({str(ef): asdict(c) for ef, c in checks.items()})
    result = {
        "ann_checks": dict(sorted(ann.items(), key=lambda item: int(item[0]))),
        "runs": runs,
        "concurrency": list(TUNING_CONCURRENCY),
        "changes": rows,
        "kept_config_changes": [r["change"] for r in rows if r["kept"] and r["kind"] == "config"],
    }
    return write_results(
        out, "tuning", result, "# Tuning\n\n" + "\n".join(tuning_lines(result)) + "\n"
    )
