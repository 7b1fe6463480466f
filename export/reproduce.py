"""Evaluate a built repository on a judgments file (the build's dev split when it is the same file)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shopserve.ensemble import store
from shopserve.ensemble.models import OnnxEncoder, OnnxRanker
from shopserve.ensemble.pipeline import load_retriever, load_tokenizer
from shopserve.ensemble.retrieve import Retriever

from .build import EMBED_THREADS, FP32_ENCODER_FILE
from .data import CatalogueData, Judgments, fingerprint, load_judgments, split_queries
from .evaluate import evaluate
from .index import build_dense_index

log = logging.getLogger("shopserve.export.evaluate")


def held_out_judgments(repository: Path, judgments_path: Path) -> tuple[Judgments, str]:
    """The judgments a built store can be judged on: the build's dev split when ``judgments_path``
    is the file it was built from, else all of them; and which of the two it is."""
    manifest = json.loads((repository / store.MANIFEST_FILE).read_text())
    catalogue = store.load_catalogue(repository)
    judgments = load_judgments(
        judgments_path, CatalogueData(catalogue.product_ids, catalogue.titles)
    )
    built_from = manifest["data"]["files"].get(judgments_path.name)
    if built_from == fingerprint([judgments_path])[judgments_path.name]:
        split = manifest["split"]
        _, dev = split_queries(judgments.queries, split["dev_fraction"], split["seed"])
        return judgments.subset(dev), f"dev split (seed {split['seed']})"
    return judgments, "all queries of a file the build did not see"


def evaluate_repository(repository: Path, judgments_path: Path, fp32: bool = False) -> dict:
    """The build's evaluation of the served encoder (and, with ``fp32``, of the FP32 graph it was
    quantized from, over a catalogue it re-embeds) on ``judgments_path``."""
    catalogue = store.load_catalogue(repository)
    judgments, scope = held_out_judgments(repository, judgments_path)
    log.info("evaluating %d queries: %s", len(judgments), scope)
    tokenizer = load_tokenizer(repository)
    retriever = load_retriever(repository)
    ranker = OnnxRanker(store.latest_version_dir(repository, store.RANKER) / store.ONNX_FILE)
    encoder_dir = store.latest_version_dir(repository, store.ENCODER)
    result = {"scope": scope, "judgments": str(judgments_path)}
    served = store.model_file(repository, store.ENCODER)
    encoders = {"served": served, **({"fp32": encoder_dir / FP32_ENCODER_FILE} if fp32 else {})}
    for name, path in encoders.items():
        encoder = OnnxEncoder(path, EMBED_THREADS)
        if path == served:
            embeddings = retriever.dense.index.reconstruct_n(0, retriever.dense.size)
            encoder_retriever = retriever
        else:
            embeddings = encoder.embed_texts(tokenizer, catalogue.titles, progress=f"embed {name}")
            encoder_retriever = Retriever(
                build_dense_index(embeddings, retriever.dense.ef_search),
                retriever.lexical,
                retriever.dense_depth,
                retriever.lexical_depth,
            )
        result[name] = evaluate(
            retriever.lexical,
            embeddings,
            encoder_retriever,
            ranker,
            catalogue.product_ids,
            judgments,
            encoder.embed_texts(tokenizer, judgments.queries),
        )
    return result
