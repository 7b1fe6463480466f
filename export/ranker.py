"""The search ranker: training lists from judged queries, the monotone model over the bounded
features, the z-score fusion as the unsupervised fallback, and reuse of a ranker trained elsewhere.

Training lists hold each train query's judged products (gain = relevance - min relevance) plus the
unjudged products the server would retrieve for it, as gain-0 examples: served over the whole catalogue,
the ranker mostly sees such products. (Only the hardest unjudged products as negatives, or none, both
measured worse on dev.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError
from shopserve.ensemble.features import (
    FEATURE_NAMES,
    FUSION_WEIGHTS,
    NUM_FEATURES,
    RANKER_FEATURES,
)
from shopserve.ensemble.lexical import LexicalIndex, top_rows
from tqdm.auto import tqdm

from . import monotone
from .scoring import QueryScores

log = logging.getLogger("shopserve.export.ranker")

LEARNED = "learned"
FUSION = "zscore_fusion"
SPECS = [monotone.FeatureSpec(name, monotone=True) for name in RANKER_FEATURES]
COLUMNS = [FEATURE_NAMES.index(name) for name in RANKER_FEATURES]


def training_lists(
    lexical: LexicalIndex,
    embeddings: np.ndarray,
    row_of: dict[int, int],
    queries: list[str],
    query_embeddings: np.ndarray,
    gains: list[dict[int, float]],
    dense_depth: int,
    lexical_depth: int,
) -> monotone.TrainingLists:
    """One list per query: its judged products, then every other product the server would retrieve
    for it (dense top-N ∪ lexical top-N, exact search), unjudged and so gain 0."""
    lists = []
    for query, q_emb, q_gains in tqdm(
        list(zip(queries, query_embeddings, gains, strict=True)), desc="ranker features", unit="q"
    ):
        judged = np.array([row_of[pid] for pid in q_gains], dtype=np.int64)
        scores = QueryScores.compute(lexical, embeddings, query, q_emb)
        pool = np.union1d(
            top_rows(scores.cosine, dense_depth), top_rows(scores.bm25, lexical_depth)
        )
        rows = np.concatenate([judged, np.setdiff1d(pool, judged)])
        target = np.zeros(len(rows), dtype=np.float32)
        target[: len(judged)] = list(q_gains.values())
        lists.append((scores.features(lexical, rows), target))
    return monotone.TrainingLists.pad(lists, NUM_FEATURES)


def train_search_ranker(
    lists: monotone.TrainingLists, destination: Path, seed: int, epochs: int
) -> monotone.TrainReport:
    """Train the monotone ranker on ``lists``, export it to ``destination`` and report."""
    model, loss = monotone.train(lists, SPECS, COLUMNS, seed, epochs=epochs)
    diff = monotone.export(model, SPECS, FEATURE_NAMES, destination, lists.rows()[:2048])
    ranges = [r.__dict__ for r in monotone.feature_ranges(model, SPECS)]
    return monotone.TrainReport(int((lists.gains.sum(1) > 0).sum()), epochs, loss, diff, ranges)


def write_fusion_ranker(destination: Path, scale: float = 1.0) -> Path:
    """The z-score fusion as an ONNX ranker over the same FEATURES, its weights times ``scale``
    (the softmax scale the catalogue checks fit: the same ranking, the learned ranker's logits)."""
    weights = {name: weight * scale for name, weight in FUSION_WEIGHTS.items()}
    return write_linear_ranker(destination, weights, FUSION)


def write_linear_ranker(
    destination: Path,
    weights: dict[str, float],
    form: str,
    names: Sequence[str] = FEATURE_NAMES,
) -> Path:
    """An ONNX ranker scoring a weighted sum of named feature columns (FEATURES [n, len(names)])."""
    import onnx
    from onnx import TensorProto, helper

    columns = [list(names).index(name) for name in weights]
    matrix = np.array(list(weights.values()), dtype=np.float32).reshape(-1, 1)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["FEATURES", "columns"], ["selected"], axis=1),
            helper.make_node("MatMul", ["selected", "weights"], ["fused"]),
            helper.make_node("Squeeze", ["fused", "last_axis"], ["SCORES"]),
        ],
        form,
        [helper.make_tensor_value_info("FEATURES", TensorProto.FLOAT, ["candidates", len(names)])],
        [helper.make_tensor_value_info("SCORES", TensorProto.FLOAT, ["candidates"])],
        initializer=[
            helper.make_tensor("columns", TensorProto.INT64, [len(columns)], columns),
            helper.make_tensor("weights", TensorProto.FLOAT, matrix.shape, matrix.ravel()),
            helper.make_tensor("last_axis", TensorProto.INT64, [1], [1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    destination.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(destination))
    monotone.write_contract(destination, {"inputs": list(names), "form": form, "weights": weights})
    return destination


def check_reusable(
    path: Path, names: Sequence[str] = FEATURE_NAMES, flag: str = "--ranker"
) -> dict:
    """The contract of a ranker trained elsewhere (given as ``flag``), if it reads the features
    ``names`` of this build; else raise."""
    if not path.exists():
        raise monotone.ModelExportError(f"{flag} {path} does not exist")
    try:
        contract = monotone.read_contract(path)
    except (DecodeError, OSError) as exc:
        raise monotone.ModelExportError(f"{flag} {path} is not an ONNX model ({exc})") from None
    if contract is None or contract.get("inputs") != list(names):
        found = contract.get("inputs") if contract else "no shopserve feature contract"
        raise monotone.ModelExportError(
            f"{flag} {path} reads {found}, but this build serves FEATURES {list(names)}; "
            "retrain it with this version of shopserve"
        )
    return contract
