"""How a built store's search ranker does on catalogues it was not trained on.

Two measurements, both reproducible from the data folder (``python -m shopserve.export transfer``):

* **another shop**: the store's ranker on another shop's whole catalogue (Instacart's 49,688 grocery
  products), with that shop's category names as queries and the products of the category as the
  relevant ones (the catalogue checks' category family, every category);
* **a smaller catalogue cut**: the store's dev queries over a catalogue of CUT_PRODUCTS products that
  holds none of the products judged for any training query (so the ranker has seen neither the
  queries nor the products, and every catalogue-level statistic shifts).

Each is compared with BM25 alone, the encoder alone and the z-score fusion over the same candidates.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from shopserve.ensemble import store
from shopserve.ensemble.dense import DenseIndex
from shopserve.ensemble.features import FUSION_WEIGHTS
from shopserve.ensemble.models import OnnxEncoder, OnnxRanker
from shopserve.ensemble.pipeline import load_retriever, load_tokenizer
from shopserve.ensemble.retrieve import Retriever

from .data import CatalogueData, Judgments, split_queries
from .lexical import build_lexical_index
from .selfcheck import LinearScorer, Scorer, category_checks, served_ndcg

log = logging.getLogger("shopserve.export.transfer")

CUT_PRODUCTS = 10_000
BASELINES = {
    "bm25": {"bm25_ratio": 1.0},
    "encoder": {"cosine": 1.0},
    "zscore_fusion": FUSION_WEIGHTS,
}


def _scorers(repository: Path) -> dict[str, Scorer]:
    scorers: dict[str, Scorer] = {name: LinearScorer(w) for name, w in BASELINES.items()}
    scorers["store_ranker"] = OnnxRanker(store.model_file(repository, store.RANKER))
    return scorers


def _retriever_like(reference: Retriever, titles: list[str], embeddings: np.ndarray) -> Retriever:
    """A retriever over another catalogue with the store's retrieval settings."""
    return Retriever(
        DenseIndex.build(embeddings, ef_search=reference.dense.ef_search),
        build_lexical_index(titles, show_progress=False),
        reference.dense_depth,
        reference.lexical_depth,
    )


def other_shop(repository: Path, catalogue: CatalogueData, seed: int) -> dict:
    """The store's ranker on another catalogue, with its category names as queries."""
    if "category" not in catalogue.extra:
        raise ValueError("the other shop's catalogue needs a category column")
    tokenizer = load_tokenizer(repository)
    encoder = OnnxEncoder(store.model_file(repository, store.ENCODER), 2)
    embeddings = encoder.embed_texts(tokenizer, catalogue.titles, progress="embed other shop")
    retriever = _retriever_like(load_retriever(repository), catalogue.titles, embeddings)
    checks = category_checks(
        catalogue.product_ids, catalogue.extra["category"], np.random.default_rng(seed), 10**6
    )
    ndcg = served_ndcg(
        retriever,
        catalogue.product_ids,
        _scorers(repository),
        checks.queries,
        encoder.embed_texts(tokenizer, checks.queries),
        [dict.fromkeys(ids, 1.0) for ids in checks.relevant],
        desc="other shop",
    )
    log.info("other shop (%d products, %d queries): %s", len(catalogue), len(checks), ndcg)
    return {"products": len(catalogue), "queries": len(checks), "ndcg10": ndcg}


def catalogue_cut(
    repository: Path, judgments: Judgments, dev_fraction: float, seed: int, size: int = CUT_PRODUCTS
) -> dict:
    """The store's dev queries over a catalogue cut without any training query's products."""
    catalogue = store.load_catalogue(repository)
    reference = load_retriever(repository)
    train, dev = split_queries(judgments.queries, dev_fraction, seed)
    seen = {pid for q in train for pid in judgments.by_query[q]}
    dev_products = {pid for q in dev for pid in judgments.by_query[q]} - seen
    rng = np.random.default_rng(seed)
    others = [p for p in catalogue.product_ids.tolist() if p not in seen and p not in dev_products]
    fill = rng.choice(
        len(others), size=min(max(size - len(dev_products), 0), len(others)), replace=False
    )
    keep = np.isin(catalogue.product_ids, list(dev_products) + [others[i] for i in fill])
    rows = np.flatnonzero(keep)
    product_ids = catalogue.product_ids[rows]
    titles = [catalogue.titles[r] for r in rows]
    embeddings = reference.dense.vectors(rows)
    retriever = _retriever_like(reference, titles, embeddings)
    queries, gains = [], []
    for query in dev:
        judged = {p: g for p, g in judgments.gains(query).items() if p in dev_products}
        if any(g > 0 for g in judged.values()):
            queries.append(query)
            gains.append(judged)
    tokenizer = load_tokenizer(repository)
    encoder = OnnxEncoder(store.model_file(repository, store.ENCODER), 2)
    ndcg = served_ndcg(
        retriever,
        product_ids,
        _scorers(repository),
        queries,
        encoder.embed_texts(tokenizer, queries),
        gains,
        desc="catalogue cut",
    )
    log.info("catalogue cut (%d products, %d queries): %s", len(rows), len(queries), ndcg)
    return {"products": len(rows), "queries": len(queries), "ndcg10": ndcg}
