"""The behaviour side of the release build.

From an events file it builds: the shop's item statistics (popularity, categories, items bought
together), every shopper's profile and TIFU-KNN vector, the recommendation ranker and the
personalised-search weight.

Time split, per shopper (the standard next-basket protocol). The hold-out lives only inside the
evaluation; the store that is served holds every event it was given.

* the learned ranker and the NEW_ONLY ranker learn from each training shopper's **second- to
  seventh-to-last baskets** as labels (TRAINING_LABELS), each with the shop and every profile as
  they were before it;
* the **last basket** of every shopper is the evaluation's: the validation shoppers' (a seeded split,
  never trained on) choose TIFU-KNN's parameters and the ranker that is served (the gate: the learned
  ranker against the better of purchase frequency and TIFU-KNN), and the build fails if what it
  serves scores below the best baseline there;
* then every basket is folded in: the served item statistics, profiles and TIFU-KNN vectors are the
  whole history.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from shopserve.ensemble import store
from shopserve.ensemble.dense import DenseIndex
from shopserve.ensemble.models import OnnxRanker
from shopserve.ensemble.neighbours import NEIGHBOURS_FILE
from shopserve.ensemble.personal import PERSONAL_WEIGHT, PROFILES_FILE
from shopserve.ensemble.profile_store import SqliteProfileStore
from shopserve.ensemble.profiles import UserKeys
from shopserve.ensemble.recommend import (
    EXPLORE_FILE,
    ITEMS_FILE,
    REC_FEATURE_NAMES,
    REC_MONOTONE,
    Recommender,
)
from shopserve.ensemble.retrieve import Retriever
from tqdm.auto import tqdm

from . import monotone
from .data import CatalogueData, EventLog, EventsData, HashedIds
from .evaluate_personal import (
    ScoredQuery,
    evaluate_personal_search,
    evaluate_recommendations,
    fit_search_weight,
    score_queries,
)
from .history import (
    Case,
    HistoryCut,
    Timeline,
    basket_queries,
    bought_before,
    recall,
    split_users,
    timelines,
    top_ids,
)
from .ranker import check_reusable, write_linear_ranker
from .repository import RepositoryWriter
from .selfcheck import LinearScorer

log = logging.getLogger("shopserve.export.personalize")

LEARNED = "learned"
FREQUENCY = "purchase_frequency"
TIFU_KNN = "tifu_knn"
BASELINES = (FREQUENCY, TIFU_KNN)
# The shopper's own products by the number of baskets they were in, ties most recent first (the
# share weight makes one more basket outweigh any recency for shoppers of up to 100 baskets), then
# the shop's best sellers.
FREQUENCY_WEIGHTS = {"repeat_share": 100.0, "recency": 1.0, "popularity": 0.01}
# TIFU-KNN's parameters are chosen on the validation shoppers from these (k around the published
# choices; alpha the weight of the shopper's own vector).
TIFU_NEIGHBOURS = (50, 100, 300)
TIFU_ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
REC_SPECS = [monotone.FeatureSpec(name, name in REC_MONOTONE) for name in REC_FEATURE_NAMES]
GATE_K = 20
# While the build runs: the learned rankers, before the gate decides what is served.
LEARNED_FILE, LEARNED_NEW_ONLY_FILE = "learned.onnx", "learned_new_only.onnx"
# The learned rankers' labels (both rankers): each training shopper's baskets this far from the end
# (1 is the last, the evaluation's), each with the shop as it was before it. Measured on Instacart
# (two seeds): six label baskets lift the ranker's Recall@20 by 0.004 over three. The NEW_ONLY
# ranker, whose lists are the few baskets with a new item among the candidates, gains from six
# since its calibrators' knots follow the values above each feature's floor (calibration_knots):
# new-item Recall@20 0.072 against 0.069 with three on a 17,000-product cut; 0.068 either way on
# the whole catalogue (docs/evaluation.md).
TRAINING_LABELS = (2, 3, 4, 5, 6, 7)
# Fewer, shorter lists than search (one per training shopper): smaller steps, more of them.
REC_EPOCHS, REC_LEARNING_RATE, REC_BATCH = 80, 0.01, 32


class RecommendationGateError(RuntimeError):
    """What the build would serve scores below the baseline it reports."""


class ThinHistoryError(RuntimeError):
    """The events hold too few repeat shoppers to train, gate and evaluate recommendations."""


TIFU_WEIGHTS = {"tifu_knn": 1.0}  # TIFU-KNN served alone, with the parameters the build chose
POPULARITY = "popularity"
BASELINE_WEIGHTS = {
    FREQUENCY: FREQUENCY_WEIGHTS,
    TIFU_KNN: TIFU_WEIGHTS,
    POPULARITY: {"popularity": 1.0},  # NEW_ONLY's baseline: the best sellers never bought
}
EXPLORE_BASELINES = (POPULARITY, TIFU_KNN)


def tifu_weights(alpha: float) -> dict[str, float]:
    """TIFU-KNN as a linear ranker over its two halves, for any ``alpha``."""
    return {"recent_share": alpha, "neighbour_share": 1.0 - alpha}


def training_lists(
    cases: Sequence[Case], recommender: Recommender, new_only: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(features, gains) of each case's candidates (with ``new_only``, of the NEW_ONLY candidates
    and the items new to the shopper); cases whose label has no candidate are left out."""
    lists = []
    for case in tqdm(cases, desc="recommendation lists", unit="user"):
        label = case.label - bought_before(case, recommender) if new_only else case.label
        rows, features = recommender.shortlist(case.view, new_only)
        gains = np.isin(recommender.product_ids[rows], list(label)).astype(np.float32)
        if gains.any():
            lists.append((features, gains))
    return lists


def recall_by_scorer(
    cases: Sequence[Case],
    recommender: Recommender,
    scorers: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    new_only: bool = False,
) -> dict[str, float]:
    """Mean Recall@GATE_K of each scorer over the cases (candidates and features made once); with
    ``new_only``, of the NEW_ONLY answer for the items new to the shopper, over the cases with one."""
    totals, counted = dict.fromkeys(scorers, 0.0), 0
    for case in cases:
        label = case.label - bought_before(case, recommender) if new_only else case.label
        if not label:
            continue
        counted += 1
        rows, features = recommender.shortlist(case.view, new_only)
        ids = recommender.product_ids[rows]
        for name, scorer in scorers.items():
            totals[name] += recall(top_ids(ids, scorer(features), GATE_K), label)
    return {name: round(total / max(counted, 1), 4) for name, total in totals.items()}


@dataclass(frozen=True)
class TifuChoice:
    k: int
    alpha: float
    recall20: dict[str, float]  # "k=.., alpha=.." -> validation Recall@20

    def as_dict(self) -> dict:
        return {"k": self.k, "alpha": self.alpha, "validation_recall20": self.recall20}


def choose_tifu(cut: HistoryCut, users: Sequence[str], dense: DenseIndex) -> TifuChoice:
    """TIFU-KNN's neighbourhood size and alpha with the best Recall@20 on ``users`` at ``cut``
    (ties: the first in the grid)."""
    table: dict[str, float] = {}
    best = (-1.0, TIFU_NEIGHBOURS[0], TIFU_ALPHAS[0])
    for k in tqdm(TIFU_NEIGHBOURS, desc="TIFU-KNN parameters", unit="k"):
        recommender = cut.recommender(dense, k, TIFU_ALPHAS[0])
        scores = recall_by_scorer(
            cut.cases(users, recommender),
            recommender,
            {f"{a:g}": LinearScorer(tifu_weights(a), REC_FEATURE_NAMES) for a in TIFU_ALPHAS},
        )
        for alpha in TIFU_ALPHAS:
            table[f"k={k}, alpha={alpha:g}"] = scores[f"{alpha:g}"]
            best = max(best, (scores[f"{alpha:g}"], k, alpha), key=lambda t: t[0])
    return TifuChoice(best[1], best[2], table)


def _check_history(
    lines: Mapping[str, Timeline], train_users: Sequence[str], validation_users: Sequence[str]
) -> None:
    """Stop a build whose shoppers leave the learned ranker nothing to learn from (a training
    shopper needs a basket before their first label basket) or its gate nothing to compare on (a
    validation shopper needs a basket before their last)."""
    training = sum(lines[u].baskets > TRAINING_LABELS[0] for u in train_users)
    validation = sum(lines[u].baskets > 1 for u in validation_users)
    if training and validation:
        return
    raise ThinHistoryError(
        f"too little purchase history for recommendations: of {len(lines)} shoppers, "
        f"{training} of the {len(train_users)} training shoppers have more than "
        f"{TRAINING_LABELS[0]} purchase baskets and {validation} of the {len(validation_users)} "
        "validation shoppers more than 1; each part needs at least one. Build without --events "
        "until the log holds repeat purchases"
    )


def learned_ranker(
    cuts: Sequence[tuple[HistoryCut, Recommender]],
    users: Sequence[str],
    destination: Path,
    seed: int,
    new_only: bool = False,
) -> dict:
    """Train the monotone recommendation ranker on ``users``' baskets at each cut (with
    ``new_only``, the ranker of NEW_ONLY answers); its report."""
    cases = [
        one
        for cut, recommender in cuts
        for one in training_lists(cut.cases(users, recommender), recommender, new_only)
    ]
    if not cases:
        raise ThinHistoryError(
            "no training shopper's label basket holds a "
            + ("product new to them among its candidates" if new_only else "candidate")
            + f": the {'NEW_ONLY' if new_only else 'recommendation'} ranker has nothing to learn from"
        )
    lists = monotone.TrainingLists.pad(cases, len(REC_FEATURE_NAMES))
    model, loss = monotone.train(
        lists,
        REC_SPECS,
        range(len(REC_SPECS)),
        seed,
        epochs=REC_EPOCHS,
        learning_rate=REC_LEARNING_RATE,
        batch_size=REC_BATCH,
        desc="NEW_ONLY ranker" if new_only else "recommendation ranker",
    )
    diff = monotone.export(model, REC_SPECS, REC_FEATURE_NAMES, destination, lists.rows()[:2048])
    return monotone.TrainReport(
        len(lists.gains),
        REC_EPOCHS,
        loss,
        diff,
        [r.__dict__ for r in monotone.feature_ranges(model, REC_SPECS)],
    ).as_dict()


# The affinity's scale depends on the served ranker (a learned logit, or a baseline's share in
# [0, 1]): the grid spans both.
SEARCH_WEIGHT_GRID = (0.0, *(2.0**e for e in range(-2, 11)))  # 0, 0.25 ... 1024


@dataclass(frozen=True)
class SearchSide:
    """What personalised search fuses with: the served retrieval and search ranker, the encoder."""

    retriever: Retriever
    ranker: Callable[[np.ndarray], np.ndarray]
    embed: Callable[[str], np.ndarray]

    def score_baskets(
        self,
        cases: Sequence[Case],
        catalogue: CatalogueData,
        recommender: Recommender,
        rec_ranker: OnnxRanker,
        purpose: str,
    ) -> list[ScoredQuery]:
        """Each case's label basket as queries (its aisles), their candidates scored by the search
        ranker and by ``rec_ranker`` for the shopper (``purpose`` names the progress bar)."""
        return score_queries(
            basket_queries(cases, catalogue),
            self.embed,
            self.retriever,
            self.ranker,
            recommender,
            rec_ranker,
            desc=f"{purpose} personalised search",
        )


def build_personalization(
    catalogue: CatalogueData,
    events: EventsData,
    search: SearchSide,
    keys: UserKeys | HashedIds,
    writer: RepositoryWriter,
    seed: int,
    transferred_ranker: Path | None = None,
    event_log: EventLog | None = None,
    validation_fraction: float = 0.2,
) -> dict:
    """Build profiles, item statistics, TIFU-KNN vectors, the recommendation ranker and the
    personalised-search weight into the staged repository; evaluate them; return the manifest's
    record. ``transferred_ranker``: a recommendation ranker trained elsewhere, gated like one trained
    here. ``event_log``: the exported log ``events`` holds (its keys and erasures go into the
    snapshot, so no replay over it counts them again)."""
    dense = search.retriever.dense
    lines = timelines(events)
    users = list(lines)
    train_users, validation_users = split_users(events, lines, validation_fraction, seed)
    _check_history(lines, train_users, validation_users)
    held_out = HistoryCut.of(catalogue, events, lines, 1)
    tifu = choose_tifu(held_out, validation_users, dense)
    log.info("TIFU-KNN: k=%d, alpha=%g", tifu.k, tifu.alpha)
    held_out_rec = held_out.recommender(dense, tifu.k, tifu.alpha)
    rec_dir = writer.version_dir(store.REC_RANKER)
    learned = {False: rec_dir / LEARNED_FILE, True: rec_dir / LEARNED_NEW_ONLY_FILE}
    (train_cut, train_rec), training = _train_rankers(
        lambda label: HistoryCut.of(catalogue, events, lines, label),
        train_users,
        tifu,
        dense,
        learned,
        seed,
        transferred_ranker,
    )
    selection = _gate(held_out.cases(validation_users, held_out_rec), held_out_rec, learned)
    rec_ranker = OnnxRanker(rec_dir / store.ONNX_FILE)

    weight, weight_table, weight_queries = _fit_search_weight(
        train_cut.cases(train_users, train_rec), catalogue, search, train_rec, rec_ranker
    )
    writer.set_parameter(store.SEARCH, PERSONAL_WEIGHT, f"{weight:g}")
    stored = _write_served_history(
        HistoryCut.of(catalogue, events, lines, 0), keys, dense, tifu, writer, event_log
    )
    evaluation_cases = held_out.cases(users, held_out_rec)
    evaluation = _evaluate(
        evaluation_cases,
        set(validation_users),
        held_out_rec,
        rec_ranker,
        OnnxRanker(rec_dir / EXPLORE_FILE),
        selection["selected"],
    )
    personalised_search = _evaluate_personalised_search(
        evaluation_cases, catalogue, search, held_out_rec, rec_ranker, weight
    )
    if personalised_search is not None:
        evaluation["personalised_search"] = personalised_search
    return {
        "events": len(events),
        "users": len(users),
        "profiles": stored,
        "served_history": "every event of the events file",
        "holdout": "each shopper's last basket, inside the evaluation only",
        "split": {
            "seed": seed,
            "validation_fraction": validation_fraction,
            "train_users": len(train_users),
            "validation_users": len(validation_users),
            "training_labels": f"each training shopper's baskets {TRAINING_LABELS} from the end",
            "gate_and_evaluation_label": "each shopper's last basket",
        },
        "ranker": {**selection, "training": training, "tifu_knn": tifu.as_dict()},
        "search_weight": {"value": weight, "grid_ndcg10": weight_table, "queries": weight_queries},
        "evaluation": evaluation,
    }


def _train_rankers(
    cut_at: Callable[[int], HistoryCut],
    train_users: Sequence[str],
    tifu: TifuChoice,
    dense: DenseIndex,
    learned: Mapping[bool, Path],
    seed: int,
    transferred: Path | None,
) -> tuple[tuple[HistoryCut, Recommender], dict]:
    """Train (or take ``transferred``) the learned rankers into ``learned[new_only]``, from the
    training shoppers' label baskets (the shop cut before each of TRAINING_LABELS); return the
    first cut with its recommender (the search weight's) and each ranker's training record."""
    # A transferred ranker is not trained here: only the first cut (the search weight's) is needed.
    labels = TRAINING_LABELS[:1] if transferred else TRAINING_LABELS
    cuts = [cut_at(label) for label in labels]
    at_label = {
        label: (cut, cut.recommender(dense, tifu.k, tifu.alpha))
        for label, cut in zip(labels, cuts, strict=True)
    }
    training = {
        "new_only" if new_only else "ranker": _transferred(transferred, path)
        if transferred
        else learned_ranker(list(at_label.values()), train_users, path, seed, new_only)
        for new_only, path in learned.items()
    }
    return at_label[TRAINING_LABELS[0]], training


def _transferred(source: Path, destination: Path) -> dict:
    contract = check_reusable(source, REC_FEATURE_NAMES, "--rec-ranker")
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)
    return {"source": f"transferred from {source}", "form": contract.get("form")}


def _gate(
    validation: Sequence[Case], recommender: Recommender, learned: Mapping[bool, Path]
) -> dict:
    """Serve a learned ranker (``learned[new_only]``) only where it beats the better baseline on the
    validation shoppers: as the ranker, against purchase frequency and TIFU-KNN; for NEW_ONLY
    answers, against popularity and TIFU-KNN. Writes both served rankers beside them."""
    rec_dir = learned[False].parent
    record = {}
    for new_only, baselines, served in (
        (False, BASELINES, rec_dir / store.ONNX_FILE),
        (True, EXPLORE_BASELINES, rec_dir / EXPLORE_FILE),
    ):
        learned_path = learned[new_only]
        scorers = {
            name: LinearScorer(BASELINE_WEIGHTS[name], REC_FEATURE_NAMES) for name in baselines
        }
        recall20 = recall_by_scorer(
            validation, recommender, {LEARNED: OnnxRanker(learned_path), **scorers}, new_only
        )
        baseline = max(baselines, key=lambda name: recall20[name])  # ties: the simpler
        selected = LEARNED if recall20[LEARNED] > recall20[baseline] else baseline
        if selected == LEARNED:
            shutil.copyfile(learned_path, served)
        else:
            write_linear_ranker(served, BASELINE_WEIGHTS[selected], selected, REC_FEATURE_NAMES)
        log.info(
            "%s: %s (validation Recall@%d %s)",
            "NEW_ONLY ranker" if new_only else "recommendation ranker",
            selected,
            GATE_K,
            recall20,
        )
        record["new_only" if new_only else "ranker"] = {
            "selected": selected,
            "best_baseline": baseline,
            "validation_new_item_recall20" if new_only else "validation_recall20": recall20,
        }
    for path in learned.values():
        path.unlink()
    return {**record.pop("ranker"), **record, "validation_shoppers": len(validation)}


def _fit_search_weight(
    cases: Sequence[Case],
    catalogue: CatalogueData,
    search: SearchSide,
    recommender: Recommender,
    rec_ranker: OnnxRanker,
) -> tuple[float, dict, int]:
    """The personalised-search weight, fitted on the training shoppers' label baskets."""
    scored = search.score_baskets(cases, catalogue, recommender, rec_ranker, "fit")
    if not scored:
        return SEARCH_WEIGHT_GRID[0], {}, 0
    return (*fit_search_weight(scored, SEARCH_WEIGHT_GRID), len(scored))


def _write_served_history(
    whole: HistoryCut,
    keys: UserKeys | HashedIds,
    dense: DenseIndex,
    tifu: TifuChoice,
    writer: RepositoryWriter,
    event_log: EventLog | None,
) -> int:
    """The shop and every shopper as of the whole history, under keyed hashes: what is served."""
    recommend_dir = writer.version_dir(store.RECOMMEND)
    whole.items.save(recommend_dir / ITEMS_FILE)
    keyed = [(keys.key(user), profile) for user, profile in whole.profiles.items()]
    profiles = SqliteProfileStore(recommend_dir / PROFILES_FILE)
    stored = profiles.put(tqdm(keyed, desc="profiles", unit="user"))
    if event_log is not None:
        profiles.record_folded_log(event_log.event_keys(), event_log.erased)
    profiles.close()
    recommender = Recommender(whole.items, dense, whole.catalogue.product_ids)
    recommender.shopper_vectors(keyed, tifu.k, tifu.alpha).save(recommend_dir / NEIGHBOURS_FILE)
    return stored


def _evaluate(
    cases: Sequence[Case],
    validation_users: set[str],
    recommender: Recommender,
    served: OnnxRanker,
    served_new_only: OnnxRanker,
    selected: str,
) -> dict:
    """Every shopper's last basket, and the validation shoppers' alone (the gate's): the build
    fails if what it serves scores below the best baseline there."""
    baselines = {
        name: LinearScorer(BASELINE_WEIGHTS[name], REC_FEATURE_NAMES) for name in BASELINES
    }
    every = evaluate_recommendations(cases, recommender, served, served_new_only, baselines)
    gated = evaluate_recommendations(
        [c for c in cases if c.user in validation_users],
        recommender,
        served,
        served_new_only,
        baselines,
    )
    recall20 = {
        name: gated["systems"][name]["recall20"]["mean"] for name in (*BASELINES, "recommend")
    }
    best = max(BASELINES, key=lambda name: recall20[name])
    if recall20["recommend"] < recall20[best]:
        raise RecommendationGateError(
            f"the served recommendation ranker ({selected}) scores Recall@{GATE_K} "
            f"{recall20['recommend']} on the validation shoppers' last baskets, below {best} "
            f"({recall20[best]}): the build stops rather than serve it"
        )
    return {"recommend": every, "recommend_validation_shoppers": gated}


def _evaluate_personalised_search(
    cases: Sequence[Case],
    catalogue: CatalogueData,
    search: SearchSide,
    recommender: Recommender,
    rec_ranker: OnnxRanker,
    weight: float,
) -> dict | None:
    """Personalised search on the held-out baskets' queries at the fitted ``weight`` (None when
    the baskets make no query)."""
    scored = search.score_baskets(cases, catalogue, recommender, rec_ranker, "evaluate")
    return evaluate_personal_search(scored, weight) if scored else None
