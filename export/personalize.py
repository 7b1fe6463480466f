"""The behaviour side of the release build.

From an events file it builds: the shop's item statistics (popularity, categories, items bought
together), every shopper's profile, the recommendation ranker and the personalised-search weight.

Time split, per shopper (the standard next-basket protocol):

* the **last basket** is held out: no statistic, profile or model sees it; the served store holds each
  profile as it was before it, so that it can be evaluated (``--no-holdout`` serves everything);
* the ranker learns from the **second-to-last basket** as the label, with the profile and shop
  statistics as they were before it, on the shoppers of the seeded training split;
* the rest of the shoppers validate it on their second-to-last basket: it must beat their own purchase
  frequency there, or the build serves the frequency ranking instead (the gate).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from shopserve.ensemble import store
from shopserve.ensemble.models import OnnxRanker
from shopserve.ensemble.personal import PERSONAL_WEIGHT, PROFILES_FILE
from shopserve.ensemble.profile_store import open_store
from shopserve.ensemble.profiles import UserKeys
from shopserve.ensemble.recommend import (
    ITEMS_FILE,
    REC_FEATURE_NAMES,
    REC_MONOTONE,
    Recommender,
)
from shopserve.ensemble.retrieve import Retriever
from tqdm.auto import tqdm

from . import monotone
from .data import CatalogueData, EventsData
from .evaluate_personal import (
    evaluate_personal_search,
    evaluate_recommendations,
    fit_search_weight,
    score_queries,
)
from .history import (
    Case,
    basket_queries,
    cases,
    embedding_of,
    ranked,
    recall,
    replay,
    shop_items,
    split_users,
    timelines,
)
from .ranker import write_linear_ranker
from .repository import RepositoryWriter
from .selfcheck import LinearScorer

log = logging.getLogger("shopserve.export.personalize")

LEARNED = "learned"
FREQUENCY = "purchase_frequency"
FREQUENCY_WEIGHTS = {"purchases": 10.0, "recency": 1.0, "popularity": 0.01}  # count, then recency
REC_SPECS = [monotone.FeatureSpec(name, name in REC_MONOTONE) for name in REC_FEATURE_NAMES]
GATE_K = 20
# Fewer, shorter lists than search (one per training shopper): smaller steps, more of them.
REC_EPOCHS, REC_LEARNING_RATE, REC_BATCH = 80, 0.01, 32


def training_lists(cases: Sequence[Case], recommender: Recommender) -> monotone.TrainingLists:
    lists = []
    for case in tqdm(cases, desc="recommendation lists", unit="user"):
        rows = recommender.candidates(case.view)
        gains = np.isin(recommender.product_ids[rows], list(case.label)).astype(np.float32)
        if gains.any():
            lists.append((recommender.features(case.view, rows), gains))
    return monotone.TrainingLists.pad(lists, len(REC_FEATURE_NAMES))


def gate(
    validation: Sequence[Case],
    recommender: Recommender,
    scorers: Mapping[str, Callable[[np.ndarray], np.ndarray]],
) -> dict[str, float]:
    """Recall@GATE_K of each scorer on the validation shoppers' label baskets."""
    return {
        name: float(
            np.mean([recall(ranked(c, recommender, scorer, GATE_K), c.label) for c in validation])
        )
        for name, scorer in scorers.items()
    }


SEARCH_WEIGHT_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass(frozen=True)
class SearchSide:
    """What personalised search fuses with: the served retrieval and search ranker, the encoder."""

    retriever: Retriever
    ranker: Callable[[np.ndarray], np.ndarray]
    embed: Callable[[str], np.ndarray]


def build_personalization(
    catalogue: CatalogueData,
    events: EventsData,
    embeddings: np.ndarray,
    search: SearchSide,
    keys: UserKeys,
    writer: RepositoryWriter,
    seed: int,
    holdout: bool = True,
    validation_fraction: float = 0.2,
) -> dict:
    """Build profiles, item statistics, the recommendation ranker and the personalised-search
    weight into the staged repository; evaluate them; return the manifest's record."""
    dense = search.retriever.dense
    embedding = embedding_of(
        {pid: row for row, pid in enumerate(catalogue.product_ids.tolist())}, embeddings
    )
    lines = timelines(events)
    held = 1 if holdout else 0
    users = list(lines)
    train_users, validation_users = split_users(users, validation_fraction, seed)
    # Training sees the shop as it was before each shopper's label basket (second-to-last).
    train_rec = Recommender(
        shop_items(catalogue, events, lines, lambda line: line.baskets - 1 - held),
        dense,
        catalogue.product_ids,
    )
    label_basket = 1 + held

    def cases_of(group: Sequence[str], recommender: Recommender, from_end: int) -> list[Case]:
        return cases(events, lines, group, recommender, embedding, from_end)

    train_cases = cases_of(train_users, train_rec, label_basket)
    lists = training_lists(train_cases, train_rec)
    rec_dir = writer.version_dir(store.REC_RANKER)
    learned_path = rec_dir / "learned.onnx"
    model, loss = monotone.train(
        lists,
        REC_SPECS,
        range(len(REC_SPECS)),
        seed,
        epochs=REC_EPOCHS,
        learning_rate=REC_LEARNING_RATE,
        batch_size=REC_BATCH,
        desc="recommendation ranker",
    )
    diff = monotone.export(model, REC_SPECS, REC_FEATURE_NAMES, learned_path, lists.rows()[:2048])
    validation = cases_of(validation_users, train_rec, label_basket)
    gate_recall = gate(
        validation,
        train_rec,
        {
            LEARNED: OnnxRanker(learned_path),
            FREQUENCY: LinearScorer(FREQUENCY_WEIGHTS, REC_FEATURE_NAMES),
        },
    )
    selected = LEARNED if gate_recall[LEARNED] >= gate_recall[FREQUENCY] else FREQUENCY
    ranker_path = rec_dir / store.ONNX_FILE
    if selected == LEARNED:
        learned_path.rename(ranker_path)
    else:
        learned_path.unlink()
        write_linear_ranker(ranker_path, FREQUENCY_WEIGHTS, FREQUENCY, REC_FEATURE_NAMES)
    rec_ranker = OnnxRanker(ranker_path)
    log.info("recommendation ranker: %s (validation Recall@%d %s)", selected, GATE_K, gate_recall)

    # The personalised-search weight, fitted on the training shoppers' label baskets.
    train_queries = basket_queries(train_cases, catalogue)
    weight, weight_table = SEARCH_WEIGHT_GRID[0], {}
    if train_queries:
        scored = score_queries(
            train_queries,
            search.embed,
            search.retriever,
            search.ranker,
            train_rec,
            rec_ranker,
            desc="fit personalised search",
        )
        weight, weight_table = fit_search_weight(scored, SEARCH_WEIGHT_GRID)
    writer.set_parameter(store.SEARCH, PERSONAL_WEIGHT, f"{weight:g}")

    # What is served: the shop and every profile as they were before the held-out basket.
    serve_items = shop_items(catalogue, events, lines, lambda line: line.baskets - held)
    recommend_dir = writer.version_dir(store.RECOMMEND)
    serve_items.save(recommend_dir / ITEMS_FILE)
    profiles = open_store(recommend_dir / PROFILES_FILE)
    stored = profiles.put(
        (keys.key(user), replay(events, line.before(events, line.baskets - held), embedding))
        for user, line in tqdm(lines.items(), desc="profiles", unit="user")
    )
    profiles.close()
    record = {
        "events": len(events),
        "users": len(users),
        "profiles": stored,
        "holdout": "each shopper's last basket" if holdout else "none",
        "split": {
            "seed": seed,
            "validation_fraction": validation_fraction,
            "train_users": len(train_users),
            "validation_users": len(validation_users),
            "label": "each shopper's basket before the held-out one",
        },
        "ranker": {
            "selected": selected,
            "validation_recall20": gate_recall,
            "training": monotone.TrainReport(
                len(lists.gains),
                REC_EPOCHS,
                loss,
                diff,
                [r.__dict__ for r in monotone.feature_ranges(model, REC_SPECS)],
            ).as_dict(),
        },
        "search_weight": {
            "value": weight,
            "grid_ndcg10": weight_table,
            "queries": len(train_queries),
        },
    }
    if holdout:
        serve_rec = Recommender(serve_items, dense, catalogue.product_ids)
        held_out = cases_of(users, serve_rec, 1)
        record["evaluation"] = {
            "recommend": evaluate_recommendations(held_out, serve_rec, rec_ranker),
        }
        queries = basket_queries(held_out, catalogue)
        if queries:
            scored = score_queries(
                queries,
                search.embed,
                search.retriever,
                search.ranker,
                serve_rec,
                rec_ranker,
                desc="evaluate personalised search",
            )
            record["evaluation"]["personalised_search"] = evaluate_personal_search(scored, weight)
    return record
