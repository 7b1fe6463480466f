"""Exposure-aware ranking, off by default: the top k drawn from the ranker's own probabilities.

With ``plackett-luce`` the answer is a Plackett-Luce sample over the candidates with weights
``exp(logit / temperature)``: the first product is drawn in proportion to its weight, the next from
the rest, and so on (drawn at once by the Gumbel-top-k trick: the k largest of ``logit /
temperature + Gumbel noise``). Over repeated queries the products near the top share the attention
in proportion to their probability instead of the first few taking all of it; a lower temperature
stays closer to the ranker's order. A request's SEED makes the draw reproducible; without one, each
request draws afresh. The SCORES returned stay the ranker's softmax probabilities.

A request sets EXPOSURE ("off" or "plackett-luce"), TEMPERATURE and SEED; a store sets its
default with the ``search`` config's ``exposure`` and ``exposure_temperature`` parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .validation import InvalidRequest, decode_number, decode_text

EXPOSURE_INPUTS = ("EXPOSURE", "TEMPERATURE", "SEED")
OFF = "off"
PLACKETT_LUCE = "plackett-luce"
MODES = (OFF, PLACKETT_LUCE)
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
# The largest of the audit's temperatures within 2 % of the ranker's nDCG@10 (docs/fairness.md).
DEFAULT_TEMPERATURE = 0.1
EXPOSURE_PARAMETER = "exposure"  # the search config's store default
TEMPERATURE_PARAMETER = "exposure_temperature"


@dataclass(frozen=True)
class ExposurePolicy:
    mode: str = OFF
    temperature: float = DEFAULT_TEMPERATURE
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidRequest(f"EXPOSURE must be one of {', '.join(MODES)}, got {self.mode!r}")
        # TEMPERATURE travels as FP32: the lowest bound sent arrives as float32(0.01) < 0.01
        if not (
            math.isfinite(self.temperature)
            and float(np.float32(MIN_TEMPERATURE)) <= self.temperature <= MAX_TEMPERATURE
        ):
            raise InvalidRequest(
                f"TEMPERATURE must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, "
                f"got {self.temperature}"
            )
        if self.seed is not None and self.seed < 0:
            raise InvalidRequest(f"SEED must be ≥ 0, got {self.seed}")

    @classmethod
    def of_parameters(cls, parameters: Mapping[str, str]) -> ExposurePolicy:
        """A store's default, from its ``search`` config parameters (off when they are absent)."""
        try:
            return cls(
                parameters.get(EXPOSURE_PARAMETER, OFF),
                float(parameters.get(TEMPERATURE_PARAMETER, DEFAULT_TEMPERATURE)),
            )
        except (InvalidRequest, ValueError) as exc:
            raise ValueError(f"the search config's exposure parameters: {exc}") from exc

    def with_inputs(self, inputs: Mapping[str, object] | None) -> ExposurePolicy:
        """This default overridden by a request's EXPOSURE, TEMPERATURE and SEED, checked."""
        if not inputs:
            return self
        mode, temperature, seed = (inputs.get(name) for name in EXPOSURE_INPUTS)
        return ExposurePolicy(
            self.mode if mode is None else decode_text(mode, "EXPOSURE", 32).strip().lower(),
            self.temperature
            if temperature is None
            else float(decode_number(temperature, "TEMPERATURE", integer=False)),
            None if seed is None else int(decode_number(seed, "SEED", integer=True)),
        )

    def order(self, logits: np.ndarray, k: int) -> np.ndarray | None:
        """The candidates' positions of the top ``k`` drawn, in order; None when off (then the
        answer is the ranker's own top k)."""
        if self.mode == OFF:
            return None
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        noise = np.random.default_rng(self.seed).gumbel(size=len(logits))
        keys = logits / self.temperature + noise
        return np.argsort(-keys, kind="stable")[:k]
