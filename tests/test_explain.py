"""Explanations: exact Shapley values of a ranker's signals, checked against hand-computed games;
on the built stores, contributions that sum to the served logit, monotone signals that never count
against a hit, and words that carry the hit's own numbers. The server's side is in test_server.py
and test_personal.py."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from conftest import PROJECT
from shopserve.ensemble.explain import (
    SEARCH_SIGNALS,
    Explanation,
    Reason,
    ShapleyExplainer,
    search_texts,
)
from shopserve.ensemble.features import FEATURE_NAMES
from shopserve.ensemble.models import CalibratedNetwork


class FunctionRanker:
    """A ranker over three columns with a contract, for games whose Shapley values are known."""

    def __init__(self, function, lows=(0.0, 0.0, 0.0)) -> None:
        self.function = function
        self.contract = {
            "features": [
                {"name": name, "monotone": True, "low": low, "high": 1.0}
                for name, low in zip("abc", lows, strict=True)
            ]
        }
        self.calls = 0

    def __call__(self, features: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.rows = len(features)
        return self.function(features.astype(np.float64)).astype(np.float32)


def test_an_interaction_is_split_evenly_between_its_two_signals() -> None:
    """f = 2a + b + 3ab + c with reference 0: phi_a = 2a + 1.5ab, phi_b = b + 1.5ab, phi_c = c."""
    ranker = FunctionRanker(lambda x: 2 * x[:, 0] + x[:, 1] + 3 * x[:, 0] * x[:, 1] + x[:, 2])
    explainer = ShapleyExplainer(ranker, "abc", {"a": ("a",), "b": ("b",), "c": ("c",)})
    rows = np.array([[1.0, 2.0, 0.5], [0.0, 1.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(
        explainer(rows), [[2 + 3, 2 + 3, 0.5], [0.0, 1.0, 0.0]], rtol=1e-6, atol=1e-6
    )
    assert explainer.reference_logit == 0.0


def test_a_signal_at_the_reference_in_a_row_is_left_out_of_that_rows_game() -> None:
    """c = 0 (its reference) in every row, b in the second: null players, valued 0 without being
    played, and the others' values are those of the whole game."""
    ranker = FunctionRanker(lambda x: 2 * x[:, 0] + x[:, 1] + 3 * x[:, 0] * x[:, 1] + x[:, 2])
    explainer = ShapleyExplainer(ranker, "abc", {"a": ("a",), "b": ("b",), "c": ("c",)})
    values = explainer(np.array([[1.0, 2.0, 0.0], [0.5, 0.0, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(values, [[5.0, 5.0, 0.0], [1.0, 0.0, 0.0]], atol=1e-6)
    assert ranker.rows == 2**2 + 2**1  # two players in the first row, one in the second
    assert (explainer(np.zeros((3, 3), np.float32)) == 0).all()


def test_a_group_is_one_player_and_the_reference_is_the_training_low() -> None:
    """Columns a and b form one signal; with lows (1, 1, 0) the game is played from there:
    f = ab + c at (2, 3, 4) against f(1, 1, 0) = 1: the group gets 6 - 1, c gets 4."""
    ranker = FunctionRanker(lambda x: x[:, 0] * x[:, 1] + x[:, 2], lows=(1.0, 1.0, 0.0))
    explainer = ShapleyExplainer(ranker, "abc", {"ab": ("a", "b"), "c": ("c",)})
    np.testing.assert_allclose(explainer(np.array([[2.0, 3.0, 4.0]])), [[5.0, 4.0]], rtol=1e-6)
    assert explainer.reference_logit == 1.0


def test_shapley_values_add_up_and_respect_null_players_and_symmetry() -> None:
    rng = np.random.default_rng(3)
    weights = rng.normal(size=(3, 5))
    ranker = FunctionRanker(lambda x: np.tanh(x @ weights).sum(axis=1) + x[:, 0] * x[:, 2])
    explainer = ShapleyExplainer(ranker, "abc", {"a": ("a",), "b": ("b",), "c": ("c",)})
    rows = rng.uniform(-1, 1, size=(20, 3)).astype(np.float32)
    rows[:5, 1] = 0.0  # b at its reference: a null player
    values = explainer(rows)
    logits = ranker(rows)
    np.testing.assert_allclose(explainer.reference_logit + values.sum(axis=1), logits, atol=1e-5)
    assert (values[:5, 1] == 0).all()  # exactly: its coalitions are the same rows
    symmetric = FunctionRanker(lambda x: np.sin(x[:, 0] + x[:, 1]) + x[:, 2])
    twins = ShapleyExplainer(symmetric, "abc", {"a": ("a",), "b": ("b",), "c": ("c",)})
    same = twins(np.array([[0.3, 0.3, 1.0]], np.float32))
    assert math.isclose(same[0, 0], same[0, 1], rel_tol=1e-6)


def test_one_ranker_call_answers_every_coalition_of_every_hit() -> None:
    ranker = FunctionRanker(lambda x: x.sum(axis=1))
    explainer = ShapleyExplainer(ranker, "abc", {"a": ("a",), "b": ("b",), "c": ("c",)})
    before = ranker.calls
    explainer(np.ones((10, 3), np.float32))
    assert ranker.calls == before + 1


def random_network(seed: int, lows: np.ndarray) -> dict:
    """The tensors of a calibrated network over columns a, b, c (two knots each, monotone slopes,
    a tanh interaction) whose training range starts at ``lows``."""
    rng = np.random.default_rng(seed)
    starts = np.stack([lows, lows + 0.5], axis=1)
    return {
        "columns": [0, 1, 2],
        "low": lows.tolist(),
        "high": (lows + 1).tolist(),
        "starts": starts.tolist(),
        "widths": np.full((3, 2), 0.5).tolist(),
        "slopes": rng.uniform(0, 2, (3, 2)).tolist(),
        "w1": rng.normal(size=(3, 4)).tolist(),
        "b1": rng.normal(size=4).tolist(),
        "w2": rng.uniform(0, 1, 4).tolist(),
    }


def test_a_recorded_network_is_split_as_the_game_splits_it() -> None:
    """A ranker whose contract records its calibrated network: its sum is split column by column
    and only the interaction is played, in NumPy, giving the values of the game the ranker plays
    (which knows nothing of the network), without a ranker call per coalition."""
    lows = np.array([0.0, 1.0, -0.5])
    tensors = random_network(7, lows)
    function = CalibratedNetwork(tensors)
    played = FunctionRanker(function, lows=lows)
    split = FunctionRanker(function, lows=lows)
    split.contract["network"] = tensors
    groups = {"ab": ("a", "b"), "c": ("c",)}
    by_game, by_network = (
        ShapleyExplainer(played, "abc", groups),
        ShapleyExplainer(split, "abc", groups),
    )
    assert by_game.network is None and by_network.network is not None
    rows = np.random.default_rng(1).uniform(lows - 0.5, lows + 1.5, (50, 3)).astype(np.float32)
    rows[:10, 2] = lows[2]  # c at its reference: a null player, exactly 0 on both paths
    calls = split.calls
    values = by_network(rows)
    assert split.calls == calls
    np.testing.assert_allclose(values, by_game(rows), atol=1e-6)
    assert (values[:10, 1] == 0).all()
    np.testing.assert_allclose(by_network.reference_logit + values.sum(1), split(rows), atol=1e-5)


def test_a_recorded_network_that_does_not_score_as_the_graph_is_refused() -> None:
    lows = np.zeros(3)
    ranker = FunctionRanker(CalibratedNetwork(random_network(7, lows)))
    ranker.contract["network"] = random_network(8, lows)
    with pytest.raises(ValueError, match=r"recorded network scores .* off its graph"):
        ShapleyExplainer(ranker, "abc", {"a": ("a",), "b": ("b",), "c": ("c",)})


def test_every_column_must_belong_to_one_signal() -> None:
    ranker = FunctionRanker(lambda x: x.sum(axis=1))
    with pytest.raises(ValueError, match="exactly one signal"):
        ShapleyExplainer(ranker, "abc", {"a": ("a",), "b": ("b",)})
    with pytest.raises(ValueError, match="exactly one signal"):
        ShapleyExplainer(ranker, "abc", {"a": ("a", "b"), "b": ("b",), "c": ("c",)})


def test_the_search_signals_cover_every_feature_once() -> None:
    grouped = [name for columns in SEARCH_SIGNALS.values() for name in columns]
    assert sorted(grouped) == sorted(FEATURE_NAMES)


def test_search_words_carry_the_candidates_own_numbers() -> None:
    features = np.zeros(len(FEATURE_NAMES), np.float32)
    features[list(FEATURE_NAMES).index("cosine")] = 0.756
    features[list(FEATURE_NAMES).index("query_coverage")] = 2 / 3
    features[list(FEATURE_NAMES).index("bm25_ratio")] = 0.004
    words = search_texts(features)
    assert "cosine 0.76" in words["meaning"]
    assert words["words"].startswith("67 % of the query's words")
    assert "under 1 %" in words["bm25"]


def test_explanations_combine_and_scale_exactly() -> None:
    query = Explanation(3.0, 1.0, (Reason("meaning", 2.0, "m"),))
    history = Explanation(2.0, -1.0, (Reason("your_purchases", 3.0, "p"),))
    both = query.plus(history.scaled(0.5))
    assert both.logit == 4.0 and both.reference == 0.5
    assert [r.signal for r in both.reasons] == ["meaning", "your_purchases"]
    assert both.reference + sum(r.contribution for r in both.reasons) == both.logit


# On the built stores (slow: they need the build).


def _sums(explanation: Explanation) -> float:
    return explanation.reference + sum(reason.contribution for reason in explanation.reasons)


@pytest.mark.slow
def test_search_explanations_sum_to_the_logit_and_never_count_relevance_against(
    pipeline, dev_queries
) -> None:
    ranges = (pipeline.ranker.contract or {}).get("features", [])
    read = {f["name"]: f["monotone"] for f in ranges}  # a learned ranker's; none for the fusion
    monotone = {
        signal
        for signal, columns in SEARCH_SIGNALS.items()
        if any(name in read for name in columns) and all(read.get(n, True) for n in columns)
    }
    assert not ranges or monotone == set(SEARCH_SIGNALS)
    split = pipeline.explainer.shapley
    assert (split.network is not None) == bool(ranges)  # the build records a learned network
    if split.network is not None:
        played = copy.copy(split)
        played.network = None
        low, high = (np.array([f[end] for f in ranges]) for end in ("low", "high"))
        rows = np.tile(split.reference, (200, 1))
        read = [FEATURE_NAMES.index(f["name"]) for f in ranges]
        rows[:, read] = np.random.default_rng(0).uniform(low - 0.1, high + 0.1, (200, len(read)))
        np.testing.assert_allclose(split(rows), played(rows), atol=1e-5)
    for query in dev_queries[:40]:
        answer = pipeline.search(query, 10, explain=True)
        plain = pipeline.search(query, 10)
        assert answer.product_ids.tolist() == plain.product_ids.tolist()
        assert plain.explanations is None and len(answer.explanations) == len(answer.product_ids)
        logits = np.log(answer.scores)  # softmax: logits up to one shared constant
        shifts = [e.logit - log for e, log in zip(answer.explanations, logits, strict=True)]
        assert np.ptp(shifts) < 1e-3, query
        for explanation in answer.explanations:
            assert abs(_sums(explanation) - explanation.logit) < 1e-4
            assert {r.signal for r in explanation.reasons} == set(SEARCH_SIGNALS)
            assert all(r.contribution >= -1e-5 for r in explanation.reasons if r.signal in monotone)
            magnitudes = [abs(r.contribution) for r in explanation.reasons]
            assert magnitudes == sorted(magnitudes, reverse=True)


def test_the_cost_benchmark_compares_off_with_adapters_that_never_read_explain(tmp_path) -> None:
    """`benchmarks explain` measures "before EXPLAIN" on the shipped adapters less their one read
    of the input: anything else that differs would be measured as EXPLAIN's cost."""
    from benchmarks.explain import EXPLAIN_READ, _adapters_without_explain

    files = _adapters_without_explain(PROJECT / "model_repository", tmp_path)
    assert set(files) == {"search/{version}/model.py", "recommend/{version}/model.py"}
    for relative, path in files.items():
        shipped = (PROJECT / "model_repository" / relative.format(version="1")).read_text()
        before = path.read_text()
        assert shipped.count(EXPLAIN_READ) == 1 and "EXPLAIN" not in before.split('"""', 2)[2]
        assert len(before.splitlines()) == len(shipped.splitlines())
        compile(before, str(path), "exec")
