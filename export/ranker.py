"""The learned ranker: an MLP over the fused features, trained listwise on graded judgments.

Training lists hold each train query's judged products (gain = relevance - min relevance) plus the
unjudged products the server would retrieve for it, as gain-0 examples: served over the whole catalogue,
the ranker mostly sees such products. (Only the hardest unjudged products as negatives, or none, both
measured worse on dev: see the issue notes.) The loss is softmax cross-entropy against the gains'
distribution (ListNet), matching the softmax probabilities the server returns.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from shopserve.ensemble.features import FEATURE_NAMES, NUM_FEATURES
from shopserve.ensemble.lexical import LexicalIndex, top_rows
from shopserve.ensemble.models import OnnxRanker
from tqdm.auto import tqdm

from .scoring import QueryScores

log = logging.getLogger("shopserve.export.ranker")

HIDDEN = 32
MAX_ABS_DIFF = 1e-5


@dataclass
class TrainingLists:
    features: np.ndarray  # [queries, width, NUM_FEATURES]
    gains: np.ndarray  # [queries, width]
    mask: np.ndarray  # [queries, width] bool


@dataclass(frozen=True)
class RankerReport:
    train_queries: int
    epochs: int
    final_loss: float
    onnx_max_abs_diff: float
    feature_names: tuple[str, ...]

    def as_dict(self) -> dict:
        return asdict(self)


def training_lists(
    lexical: LexicalIndex,
    embeddings: np.ndarray,
    row_of: dict[int, int],
    queries: list[str],
    query_embeddings: np.ndarray,
    gains: list[dict[int, float]],
    dense_depth: int,
    lexical_depth: int,
) -> TrainingLists:
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
    width = max(len(t) for _, t in lists)
    out = TrainingLists(
        np.zeros((len(lists), width, NUM_FEATURES), np.float32),
        np.zeros((len(lists), width), np.float32),
        np.zeros((len(lists), width), bool),
    )
    for i, (feats, target) in enumerate(lists):
        out.features[i, : len(target)] = feats
        out.gains[i, : len(target)] = target
        out.mask[i, : len(target)] = True
    return out


def _ranker_module(mean: np.ndarray, std: np.ndarray):
    import torch

    class Ranker(torch.nn.Module):
        """Standardise the features (statistics baked in), then a two-layer MLP."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.from_numpy(mean))
            self.register_buffer("std", torch.from_numpy(std))
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(NUM_FEATURES, HIDDEN),
                torch.nn.ReLU(),
                torch.nn.Linear(HIDDEN, HIDDEN),
                torch.nn.ReLU(),
                torch.nn.Linear(HIDDEN, 1),
            )

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.mlp((features - self.mean) / self.std).squeeze(-1)

    return Ranker()


def train_ranker(lists: TrainingLists, seed: int, epochs: int = 40, batch_size: int = 128):
    """Listwise training; returns the torch module and the last epoch's mean loss."""
    import torch

    torch.manual_seed(seed)
    valid = lists.features[lists.mask]
    mean = valid.mean(0).astype(np.float32)
    std = np.maximum(valid.std(0), 1e-6).astype(np.float32)
    model = _ranker_module(mean, std)
    usable = lists.gains.sum(1) > 0
    features = torch.from_numpy(lists.features[usable])
    mask = torch.from_numpy(lists.mask[usable])
    gains = torch.from_numpy(lists.gains[usable])
    # Target distribution over each list: exponential gain, as in nDCG's 2^g - 1.
    target = torch.where(mask, torch.exp2(gains) - 1, torch.zeros_like(gains))
    target = target / target.sum(1, keepdim=True)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-5)
    generator = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    for _ in tqdm(range(epochs), desc="ranker training", unit="epoch"):
        order = torch.randperm(len(features), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            logits = model(features[idx]).masked_fill(~mask[idx], float("-inf"))
            log_probs = torch.log_softmax(logits, dim=1).masked_fill(~mask[idx], 0.0)
            loss = -(target[idx] * log_probs).sum(1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        loss_value = total / len(order)
    return model.eval(), loss_value


def export_ranker(model, destination: Path, check: np.ndarray) -> float:
    """Export to ONNX (dynamic candidate axis) and return the max abs diff to PyTorch on ``check``."""
    import torch

    destination.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.from_numpy(check[:4]),),
            str(destination),
            input_names=["FEATURES"],
            output_names=["SCORES"],
            dynamic_axes={"FEATURES": {0: "candidates"}, "SCORES": {0: "candidates"}},
            opset_version=17,
            dynamo=False,
        )
        reference = model(torch.from_numpy(check)).numpy()
    diff = float(np.abs(OnnxRanker(destination)(check) - reference).max())
    if diff > MAX_ABS_DIFF:
        from .encoder import ExportValidationError

        raise ExportValidationError(f"ONNX ranker differs from PyTorch by {diff:.2e}")
    log.info("ranker ONNX vs PyTorch on %d candidates: max abs diff %.2e", len(check), diff)
    return diff


def ranker_report(lists: TrainingLists, epochs: int, loss: float, diff: float) -> RankerReport:
    return RankerReport(int((lists.gains.sum(1) > 0).sum()), epochs, loss, diff, FEATURE_NAMES)
