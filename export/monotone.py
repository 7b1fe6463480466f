"""A ranking model that is monotone in its relevance signals and bounded in its inputs, by construction.

Shared by the search ranker and the recommendation ranker. For a feature row ``x``:

1. ``x`` is clipped to the range seen in training (recorded in the model), so the model never
   extrapolates: a catalogue whose scores fall outside that range gets the edge value.
2. Each feature goes through a piecewise-linear calibrator whose knots are the feature's training
   minimum and quantiles of its values above it (``calibration_knots``). The slopes of a
   *monotone* feature's calibrator are non-negative (softplus); a *context* feature's (lengths,
   sizes) are free.
3. The score is the sum of the calibrated features plus a small interaction network,
   ``tanh(c @ W1 + b1) @ w2``, whose weights from monotone inputs and whose output weights are
   non-negative. tanh is increasing, so every path from a monotone feature to the score has a
   non-negative slope: raising a monotone feature never lowers the score.

Training is listwise (softmax cross-entropy against the gains' distribution, ListNet), so the served
softmax over candidates is what was optimised.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from shopserve.ensemble.models import NETWORK_TENSORS, RANKER_METADATA_KEY
from tqdm.auto import tqdm

from .threads import every_core

log = logging.getLogger("shopserve.export.monotone")

KNOTS = 8  # calibrator segments per feature
HIDDEN = 16
MAX_ABS_DIFF = 1e-5


class ModelExportError(RuntimeError):
    """An exported ranker disagrees with its PyTorch source, or a reused one does not fit."""


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    monotone: bool  # the score must be non-decreasing in this feature


@dataclass
class TrainingLists:
    """Padded ranking lists: one row per query (or user), one column per candidate."""

    features: np.ndarray  # [lists, width, features]
    gains: np.ndarray  # [lists, width]
    mask: np.ndarray  # [lists, width] bool

    @classmethod
    def pad(
        cls, lists: Sequence[tuple[np.ndarray, np.ndarray]], num_features: int
    ) -> TrainingLists:
        width = max(len(gains) for _, gains in lists)
        out = cls(
            np.zeros((len(lists), width, num_features), np.float32),
            np.zeros((len(lists), width), np.float32),
            np.zeros((len(lists), width), bool),
        )
        for i, (features, gains) in enumerate(lists):
            out.features[i, : len(gains)] = features
            out.gains[i, : len(gains)] = gains
            out.mask[i, : len(gains)] = True
        return out

    def rows(self) -> np.ndarray:
        """Every real (unpadded) candidate row, [n, features]."""
        return self.features[self.mask]


@dataclass(frozen=True)
class FeatureRange:
    name: str
    monotone: bool
    low: float
    high: float


@dataclass(frozen=True)
class TrainReport:
    lists: int
    epochs: int
    final_loss: float
    onnx_max_abs_diff: float
    features: list[dict]  # FeatureRange as dicts: the ranges seen in training

    def as_dict(self) -> dict:
        return asdict(self)


def calibration_knots(values: np.ndarray, knots: int = KNOTS) -> np.ndarray:
    """``knots + 1`` non-decreasing knot positions per feature, [features, K+1]: the feature's
    training minimum, then the quantiles 0, 1/(K-1) ... 1 of its training values above that
    minimum. The first segment is the step from the floor to the smallest value above it, and the
    others follow the values where the feature varies: a feature at its floor for most candidates
    (a co-occurrence or a neighbours' share is 0 for most items) keeps its resolution there, where
    quantiles of all values would stack most knots on the floor."""
    levels = np.linspace(0.0, 1.0, knots)
    rows = []
    for column in values.astype(np.float64).T:
        floor = column.min()
        above = column[column > floor]
        rows.append([floor, *(np.quantile(above, levels) if len(above) else [floor] * knots)])
    return np.asarray(rows, dtype=np.float32).reshape(values.shape[1], knots + 1)


def _score(features, columns, low, high, starts, widths, slopes, w1, b1, w2):
    """The model as a function of its (already constrained) tensors: shared by training and export."""
    import torch

    x = torch.index_select(features, -1, columns)
    x = torch.minimum(torch.maximum(x, low), high)
    segments = ((x.unsqueeze(-1) - starts) / widths).clamp(0.0, 1.0)
    calibrated = (segments * slopes).sum(-1)
    return calibrated.sum(-1) + torch.tanh(calibrated @ w1 + b1) @ w2


def frozen(tensors: dict[str, np.ndarray]):
    """The exported form: a torch module that is a pure function of named, constrained tensors, so
    the ONNX initializers keep those names and :func:`load_frozen` can rebuild it."""
    import torch

    class FrozenMonotoneRanker(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name in NETWORK_TENSORS:
                self.register_buffer(name, torch.from_numpy(np.array(tensors[name])))

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return _score(features, *(getattr(self, name) for name in NETWORK_TENSORS))

    return FrozenMonotoneRanker().eval()


def load_frozen(onnx_path: Path):
    """The exported ranker back as a torch module (for the PyTorch baseline service)."""
    import onnx
    from onnx import numpy_helper

    found = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(onnx_path)).graph.initializer}
    missing = [name for name in NETWORK_TENSORS if name not in found]
    if missing:
        raise ModelExportError(f"{onnx_path} is not a monotone ranker export (no {missing})")
    return frozen(found)


def _module(specs: Sequence[FeatureSpec], columns: Sequence[int], knots: np.ndarray, seed: int):
    import torch

    class MonotoneRanker(torch.nn.Module):
        """Trainable: raw parameters, constrained (softplus) where monotonicity needs it."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            features = len(specs)
            self.register_buffer("columns", torch.tensor(list(columns), dtype=torch.int64))
            self.register_buffer("low", torch.from_numpy(knots[:, 0].copy()))
            self.register_buffer("high", torch.from_numpy(knots[:, -1].copy()))
            self.register_buffer("starts", torch.from_numpy(knots[:, :-1].copy()))
            widths = np.maximum(np.diff(knots, axis=1), 1e-6).astype(np.float32)
            self.register_buffer("widths", torch.from_numpy(widths))
            self.register_buffer("monotone", torch.tensor([s.monotone for s in specs]))
            self.slopes = torch.nn.Parameter(torch.zeros(features, knots.shape[1] - 1))
            self.w1 = torch.nn.Parameter(torch.randn(features, HIDDEN) * 0.3 - 1.0)
            self.b1 = torch.nn.Parameter(torch.zeros(HIDDEN))
            self.w2 = torch.nn.Parameter(torch.full((HIDDEN,), -2.0))

        def _positive_where_monotone(self, weights: torch.Tensor) -> torch.Tensor:
            positive = torch.nn.functional.softplus(weights)
            return torch.where(self.monotone.view(-1, 1), positive, weights)

        def constrained(self) -> dict[str, torch.Tensor]:
            return {
                "columns": self.columns,
                "low": self.low,
                "high": self.high,
                "starts": self.starts,
                "widths": self.widths,
                "slopes": self._positive_where_monotone(self.slopes),
                "w1": self._positive_where_monotone(self.w1),
                "b1": self.b1,
                "w2": torch.nn.functional.softplus(self.w2),
            }

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return _score(features, **self.constrained())

        def freeze(self):
            return frozen({k: v.detach().numpy() for k, v in self.constrained().items()})

    return MonotoneRanker()


def train(
    lists: TrainingLists,
    specs: Sequence[FeatureSpec],
    columns: Sequence[int],
    seed: int,
    epochs: int = 30,
    batch_size: int = 128,
    learning_rate: float = 0.02,
    desc: str = "ranker training",
):
    """Fit a MonotoneRanker listwise; returns the module (eval mode) and the last epoch's loss."""
    import torch

    usable = lists.gains.sum(1) > 0
    knots = calibration_knots(lists.rows()[:, list(columns)])
    model = _module(specs, columns, knots, seed)
    mask = torch.from_numpy(lists.mask[usable])
    # The model scores only real candidates (the padding of a list is not computed): the rows of
    # every usable list, and each padded slot's row number.
    rows = torch.from_numpy(lists.features[usable][lists.mask[usable]])
    row_of = torch.zeros(mask.shape, dtype=torch.int64)
    row_of[mask] = torch.arange(len(rows))
    gains = torch.from_numpy(lists.gains[usable])
    # Target distribution over each list: exponential gain, as in nDCG's 2^g - 1.
    target = torch.where(mask, torch.exp2(gains) - 1, torch.zeros_like(gains))
    target = target / target.sum(1, keepdim=True)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    padding = torch.tensor(float("-inf"))

    def epoch() -> float:
        """One pass over the lists in a random order; the mean loss per list."""
        order = torch.randperm(len(mask), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            real = mask[idx]
            scores = model(rows[row_of[idx][real]])
            logits = padding.expand(real.shape).masked_scatter(real, scores)
            log_probs = torch.log_softmax(logits, dim=1).masked_fill(~real, 0.0)
            loss = -(target[idx] * log_probs).sum(1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        return total / len(order)

    loss_value = float("nan")
    with every_core():
        for _ in tqdm(range(epochs), desc=desc, unit="epoch"):
            loss_value = epoch()
    return model.eval(), loss_value


def feature_ranges(model, specs: Sequence[FeatureSpec]) -> list[FeatureRange]:
    return [
        FeatureRange(spec.name, spec.monotone, float(low), float(high))
        for spec, low, high in zip(specs, model.low.tolist(), model.high.tolist(), strict=True)
    ]


def export(
    model,
    specs: Sequence[FeatureSpec],
    input_names: Sequence[str],
    destination: Path,
    check: np.ndarray,
) -> float:
    """Export to ONNX (FEATURES [n, len(input_names)] -> SCORES [n]) with the feature contract in
    its metadata, and return the max abs diff to PyTorch on ``check``."""
    import torch
    from shopserve.ensemble.models import OnnxRanker

    destination.parent.mkdir(parents=True, exist_ok=True)
    exported = model.freeze()
    with torch.no_grad():
        torch.onnx.export(
            exported,
            (torch.from_numpy(check[:4]),),
            str(destination),
            input_names=["FEATURES"],
            output_names=["SCORES"],
            dynamic_axes={"FEATURES": {0: "candidates"}, "SCORES": {0: "candidates"}},
            opset_version=17,
            dynamo=False,
            do_constant_folding=False,  # keep the named tensors load_frozen reads back
        )
        reference = model(torch.from_numpy(check)).numpy()
    contract = {
        "inputs": list(input_names),
        "features": [asdict(r) for r in feature_ranges(model, specs)],
        "form": "monotone calibrated network",
        # the function itself, for explanations that split a logit along its sum (serving has
        # no onnx package to read the initializers with)
        "network": {name: getattr(exported, name).numpy().tolist() for name in NETWORK_TENSORS},
    }
    write_contract(destination, contract)
    diff = float(np.abs(OnnxRanker(destination)(check) - reference).max())
    if diff > MAX_ABS_DIFF:
        raise ModelExportError(f"ONNX ranker differs from PyTorch by {diff:.2e}")
    log.info("%s: ONNX vs PyTorch on %d rows: max abs diff %.2e", destination, len(check), diff)
    return diff


def write_contract(path: Path, contract: dict) -> None:
    """Record which FEATURES columns a ranker reads (and their training ranges) in its ONNX metadata."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = RANKER_METADATA_KEY, json.dumps(contract)
    onnx.save(model, str(path))


def read_contract(path: Path) -> dict | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for entry in model.metadata_props:
        if entry.key == RANKER_METADATA_KEY:
            return json.loads(entry.value)
    return None
