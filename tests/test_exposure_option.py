"""The exposure-aware ranking option (shopserve.ensemble.exposure): Plackett-Luce draws of the top
k, reproducible with a seed, and its inputs checked."""

from __future__ import annotations

import numpy as np
import pytest
from shopserve.ensemble.exposure import OFF, PLACKETT_LUCE, ExposurePolicy
from shopserve.ensemble.postprocess import top_k
from shopserve.ensemble.validation import InvalidRequest

LOGITS = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)
IDS = np.array([40, 10, 30, 20])


def test_off_is_the_rankers_own_order() -> None:
    assert ExposurePolicy().order(LOGITS, 3) is None
    ids, scores = top_k(IDS, LOGITS, 3, ExposurePolicy(OFF))
    assert ids.tolist() == [40, 10, 30] and np.all(np.diff(scores) < 0)


def test_a_seed_replays_the_draw_and_another_seed_draws_again() -> None:
    draws = {
        seed: top_k(IDS, LOGITS, 4, ExposurePolicy(PLACKETT_LUCE, 1.0, seed))[0].tolist()
        for seed in range(30)
    }
    again = top_k(IDS, LOGITS, 4, ExposurePolicy(PLACKETT_LUCE, 1.0, 7))[0].tolist()
    assert again == draws[7]
    assert len({tuple(d) for d in draws.values()}) > 3
    assert all(sorted(d) == sorted(IDS.tolist()) for d in draws.values())  # a permutation


def test_the_first_product_is_drawn_in_proportion_to_its_weight() -> None:
    for temperature in (0.5, 2.0):
        firsts = [
            int(ExposurePolicy(PLACKETT_LUCE, temperature, seed).order(LOGITS, 1)[0])
            for seed in range(4000)
        ]
        weights = np.exp(LOGITS / temperature)
        expected = weights / weights.sum()
        observed = np.bincount(firsts, minlength=4) / len(firsts)
        np.testing.assert_allclose(observed, expected, atol=0.03)


def test_request_inputs_override_the_store_default() -> None:
    store_default = ExposurePolicy.of_parameters({"exposure": "plackett-luce"})
    assert store_default == ExposurePolicy(PLACKETT_LUCE)
    assert ExposurePolicy.of_parameters({}) == ExposurePolicy(OFF)
    asked = store_default.with_inputs(
        {"EXPOSURE": np.array([b"off"], dtype=object), "TEMPERATURE": None, "SEED": None}
    )
    assert asked.mode == OFF
    asked = ExposurePolicy().with_inputs(
        {
            "EXPOSURE": np.array([b"Plackett-Luce"], dtype=object),
            "TEMPERATURE": np.array([2.0], dtype=np.float32),
            "SEED": np.array([5], dtype=np.int64),
        }
    )
    assert asked == ExposurePolicy(PLACKETT_LUCE, 2.0, 5)
    with pytest.raises(ValueError, match="exposure parameters"):
        ExposurePolicy.of_parameters({"exposure": "random"})


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [
        ({"EXPOSURE": np.array([b"shuffle"], dtype=object)}, "EXPOSURE must be one of"),
        ({"TEMPERATURE": np.array([0.0], dtype=np.float32)}, "TEMPERATURE must be between"),
        ({"TEMPERATURE": np.array([1e4], dtype=np.float32)}, "TEMPERATURE must be between"),
        ({"TEMPERATURE": np.array([np.nan], dtype=np.float32)}, "TEMPERATURE must be between"),
        ({"TEMPERATURE": np.array([1], dtype=np.int32)}, "TEMPERATURE must be a float"),
        ({"SEED": np.array([-1], dtype=np.int64)}, "SEED must be ≥ 0"),
        ({"SEED": np.array([1.5], dtype=np.float32)}, "SEED must be an integer"),
    ],
)
def test_bad_exposure_inputs_are_named(inputs: dict, problem: str) -> None:
    with pytest.raises(InvalidRequest, match=problem):
        ExposurePolicy(PLACKETT_LUCE).with_inputs(inputs)


def test_the_documented_bounds_are_accepted_as_fp32_delivers_them() -> None:
    for bound in (0.01, 100.0):
        temperature = np.array([bound], dtype=np.float32)  # 0.01 arrives as 0.0099999998
        assert ExposurePolicy(PLACKETT_LUCE).with_inputs({"TEMPERATURE": temperature}).temperature
