"""The search ranker's contract: monotone in every relevance signal, bounded inputs, the fusion
fallback, reuse checks and the judgment-free catalogue checks. Fast: a small ranker trained here."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shopserve.ensemble.features import FEATURE_NAMES, FUSION_WEIGHTS, NUM_FEATURES, RANKER_FEATURES
from shopserve.ensemble.models import CalibratedNetwork, OnnxRanker
from shopserve.export import monotone
from shopserve.export.ranker import (
    COLUMNS,
    FUSION,
    LEARNED,
    SPECS,
    check_reusable,
    train_search_ranker,
    write_fusion_ranker,
)
from shopserve.export.selfcheck import (
    LinearScorer,
    category_checks,
    category_leaf,
    choose,
    known_item_checks,
    softmax_scale,
)


def synthetic_lists(seed: int = 0, queries: int = 64, width: int = 40) -> monotone.TrainingLists:
    """Lists whose gains rise with a mix of the signals (and a non-monotone wiggle to resist)."""
    rng = np.random.default_rng(seed)
    features = rng.uniform(0, 1, (queries, width, NUM_FEATURES)).astype(np.float32)
    features[..., FEATURE_NAMES.index("cosine")] = rng.uniform(-0.2, 0.9, (queries, width))
    signal = features[..., COLUMNS].mean(-1) + 0.1 * np.sin(12 * features[..., 0])
    gains = np.where(signal > np.quantile(signal, 0.8), 2.0, 0.0).astype(np.float32)
    return monotone.TrainingLists(features, gains, np.ones((queries, width), bool))


@pytest.fixture(scope="module")
def trained(module_folder) -> tuple[OnnxRanker, dict]:
    path = module_folder("ranker") / "model.onnx"
    report = train_search_ranker(synthetic_lists(), path, seed=3, epochs=8)
    return OnnxRanker(path), {"path": path, "report": report}


def test_training_records_the_ranges_it_saw(trained) -> None:
    ranker, info = trained
    ranges = {r["name"]: r for r in info["report"].features}
    assert list(ranges) == list(RANKER_FEATURES)
    assert all(r["monotone"] for r in ranges.values())
    assert ranges["cosine"]["low"] == pytest.approx(-0.2, abs=0.01)
    assert ranges["cosine"]["high"] == pytest.approx(0.9, abs=0.01)
    contract = monotone.read_contract(info["path"])
    assert contract["inputs"] == list(FEATURE_NAMES)
    assert [f["name"] for f in contract["features"]] == list(RANKER_FEATURES)
    # and the function itself, which NumPy rebuilds to score as the graph does, off range too
    rows = np.random.default_rng(0).uniform(-2, 2, (64, NUM_FEATURES)).astype(np.float32)
    network = CalibratedNetwork.of(ranker, rows)
    assert network is not None
    np.testing.assert_allclose(network(rows), ranker(rows), atol=1e-5)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    row=st.lists(st.floats(-3, 3), min_size=NUM_FEATURES, max_size=NUM_FEATURES),
    signal=st.sampled_from(RANKER_FEATURES),
    rise=st.floats(1e-3, 5),
)
def test_raising_a_signal_never_lowers_the_score(trained, row, signal, rise) -> None:
    ranker, _ = trained
    before = np.array([row], dtype=np.float32)
    after = before.copy()
    after[0, FEATURE_NAMES.index(signal)] += np.float32(rise)
    assert ranker(after)[0] >= ranker(before)[0] - 1e-5


def test_inputs_beyond_the_training_range_score_as_its_edge(trained) -> None:
    ranker, info = trained
    ranges = {r["name"]: r for r in info["report"].features}
    base = np.full((1, NUM_FEATURES), 0.5, dtype=np.float32)
    for name in RANKER_FEATURES:
        far, edge = base.copy(), base.copy()
        far[0, FEATURE_NAMES.index(name)] = 1e6
        edge[0, FEATURE_NAMES.index(name)] = ranges[name]["high"]
        assert ranker(far)[0] == pytest.approx(ranker(edge)[0], abs=1e-6), name
    huge_z = base.copy()
    huge_z[0, FEATURE_NAMES.index("bm25_z")] = 19.3  # the fusion's columns are not read
    assert ranker(huge_z)[0] == pytest.approx(ranker(base)[0], abs=1e-6)


def test_the_torch_module_read_back_from_onnx_scores_the_same(trained) -> None:
    import torch

    ranker, info = trained
    module = monotone.load_frozen(info["path"])
    rows = synthetic_lists(seed=2, queries=4).rows()
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(rows)).numpy(), ranker(rows), atol=1e-5)


def test_the_ranker_learns_the_signal(trained) -> None:
    ranker, _ = trained
    lists = synthetic_lists(seed=1, queries=8)
    rows, gains = lists.features.reshape(-1, NUM_FEATURES), lists.gains.reshape(-1)
    scores = ranker(rows)
    assert scores[gains > 0].mean() > scores[gains == 0].mean() + 1.0


def test_training_scores_only_real_candidates_with_the_padded_lists_loss() -> None:
    """Training scores each list's real candidates only; its first loss (one batch of every list,
    before any step) is the ListNet loss of the model on the padded lists, padding masked out, and
    lists with no gain are left out."""
    import torch

    lists = synthetic_lists(queries=24, width=30)
    lengths = np.random.default_rng(5).integers(3, 31, len(lists.gains))
    lists.mask = np.arange(30) < lengths[:, None]
    lists.gains[~lists.mask] = 0.0
    lists.features[~lists.mask] = 1e6  # padding that would swamp the loss if it were scored
    lists.gains[0] = 0.0  # a list without gain
    _, loss = monotone.train(lists, SPECS, COLUMNS, seed=4, epochs=1, batch_size=64)

    usable = lists.gains.sum(1) > 0
    knots = monotone.calibration_knots(lists.rows()[:, list(COLUMNS)])
    model = monotone._module(SPECS, COLUMNS, knots, seed=4)
    mask = torch.from_numpy(lists.mask[usable])
    features = torch.from_numpy(np.where(lists.mask[..., None], lists.features, 0.0)[usable])
    with torch.no_grad():
        logits = model(features).masked_fill(~mask, float("-inf"))
    gains = torch.from_numpy(lists.gains[usable])
    target = torch.where(mask, torch.exp2(gains) - 1, torch.zeros_like(gains))
    target = target / target.sum(1, keepdim=True)
    log_probs = torch.log_softmax(logits, dim=1).masked_fill(~mask, 0.0)
    assert loss == pytest.approx(float(-(target * log_probs).sum(1).mean()), rel=1e-6)


def test_knots_follow_a_sparse_feature_above_its_floor() -> None:
    """A feature at 0 for 90 % of the candidates (a co-occurrence) keeps one knot at its floor and
    spreads the others over its values above it, as does a dense feature; a constant one collapses
    onto its value. The first and last knots are the training range."""
    rng = np.random.default_rng(3)
    sparse = np.where(rng.uniform(size=2000) < 0.9, 0.0, rng.uniform(0.1, 0.5, 2000))
    dense = rng.uniform(-1.0, 1.0, 2000)
    knots = monotone.calibration_knots(np.stack([sparse, dense, np.full(2000, 0.3)], 1), knots=4)

    positive = sparse[sparse > 0]
    np.testing.assert_allclose(knots[0], [0.0, *np.quantile(positive, [0, 1 / 3, 2 / 3, 1])])
    assert knots[0, 1] > 0.09  # quantiles of all values would put 4 of the 5 knots at 0
    above = np.sort(dense)[1:]
    np.testing.assert_allclose(
        knots[1], [dense.min(), *np.quantile(above, [0, 1 / 3, 2 / 3, 1])], rtol=1e-6
    )
    np.testing.assert_allclose(knots[2], 0.3)


def test_fusion_ranker_onnx_equals_the_linear_fusion(tmp_path) -> None:
    path = write_fusion_ranker(tmp_path / "fusion.onnx")
    features = np.random.default_rng(0).normal(size=(50, NUM_FEATURES)).astype(np.float32)
    expected = LinearScorer(FUSION_WEIGHTS)(features)
    np.testing.assert_allclose(OnnxRanker(path)(features), expected, rtol=1e-6)
    assert check_reusable(path)["form"] == FUSION


def test_the_fusion_is_written_at_its_softmax_scale(tmp_path) -> None:
    path = write_fusion_ranker(tmp_path / "fusion.onnx", scale=2.5)
    features = np.random.default_rng(0).normal(size=(50, NUM_FEATURES)).astype(np.float32)
    expected = 2.5 * LinearScorer(FUSION_WEIGHTS)(features)
    np.testing.assert_allclose(OnnxRanker(path)(features), expected, rtol=1e-6)


@pytest.mark.parametrize("true_scale", [0.3, 1.0, 4.0])
def test_the_softmax_scale_is_the_one_the_relevant_answers_were_drawn_with(true_scale) -> None:
    """Each list's relevant candidate is drawn from softmax(true_scale x scores): the fitted
    scale recovers it; lists without a relevant candidate are left out."""
    rng = np.random.default_rng(7)
    lists = []
    for _ in range(3000):
        scores = rng.normal(0.0, 2.0, size=30)
        weights = np.exp(true_scale * (scores - scores.max()))
        relevant = np.zeros(30, dtype=bool)
        relevant[rng.choice(30, p=weights / weights.sum())] = True
        lists.append((scores, relevant))
    lists.append((rng.normal(size=30), np.zeros(30, dtype=bool)))
    fitted = softmax_scale(lists)
    assert fitted["lists"] == 3000
    assert fitted["scale"] == pytest.approx(true_scale, rel=0.1)
    assert softmax_scale(lists[-1:]) == {"scale": 1.0, "lists": 0}


def test_a_ranker_for_other_features_is_refused(tmp_path, trained) -> None:
    _, info = trained
    with pytest.raises(monotone.ModelExportError, match="does not exist"):
        check_reusable(tmp_path / "missing.onnx")
    other = tmp_path / "other.onnx"
    other.write_bytes(info["path"].read_bytes())
    monotone.write_contract(other, {"inputs": ["cosine", "bm25"]})
    with pytest.raises(monotone.ModelExportError, match=r"reads \['cosine', 'bm25'\]"):
        check_reusable(other)


def test_known_item_checks_cut_queries_from_titles() -> None:
    titles = ["Cordless Drill Driver 20V Kit", "Cordless drill driver 20v kit", "Red Brick", "Oak"]
    ids = np.array([10, 11, 12, 13])
    checks = known_item_checks(ids, titles, np.random.default_rng(0), count=10)
    assert 1 <= len(checks) <= 2  # only the two drill titles have three usable words
    for query, relevant in zip(checks.queries, checks.relevant, strict=True):
        words = query.split()
        assert 2 <= len(words) <= 3 and set(words) < {"cordless", "drill", "driver", "kit"}
        assert relevant == {10, 11}  # the same title twice: both are the known item


def test_category_checks_use_leaf_names_of_large_categories() -> None:
    assert category_leaf("Frozen / Frozen Pizza") == "frozen pizza"
    assert category_leaf("Tools > Drills") == "drills"
    categories = ["frozen / pizza"] * 6 + ["pantry / spices"] * 5 + ["misc / other"] * 9 + ["x"]
    ids = np.arange(len(categories))
    checks = category_checks(ids, categories, np.random.default_rng(0), count=10)
    assert sorted(checks.queries) == ["pizza", "spices"]
    assert dict(zip(checks.queries, checks.relevant, strict=True))["spices"] == set(range(6, 11))


def test_choose_falls_back_to_the_fusion_only_when_the_ranker_is_worse() -> None:
    assert choose({LEARNED: 0.41, FUSION: 0.40}, LEARNED, FUSION) == LEARNED
    assert choose({LEARNED: 0.40, FUSION: 0.40}, LEARNED, FUSION) == LEARNED
    assert choose({LEARNED: 0.39, FUSION: 0.40}, LEARNED, FUSION) == FUSION
