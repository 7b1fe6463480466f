"""TIFU-KNN (shopserve.ensemble.neighbours) against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from shopserve.ensemble.neighbours import ShopperVectors
from shopserve.ensemble.profiles import BASKET_DECAY, PURCHASE, Profile
from shopserve.ensemble.recommend import REC_FEATURE_NAMES, UserView
from shopserve.export.personalize import tifu_weights
from shopserve.export.selfcheck import LinearScorer

ITEMS = 4
# Three shoppers' decayed basket shares over four items (rows: keys in sorted order).
SHOPPERS = {
    "a": {0: 0.5, 1: 0.25},
    "b": {1: 0.5},
    "c": {2: 1.0},
}


def vectors(k: int) -> ShopperVectors:
    return ShopperVectors.from_vectors(
        (
            (key, np.array(list(shares)), np.array(list(shares.values())))
            for key, shares in SHOPPERS.items()
        ),
        ITEMS,
        k,
        alpha=0.7,
    )


def test_the_nearest_shoppers_are_the_closest_in_euclidean_distance() -> None:
    # The shopper (0.5 on item 0) is 0.0625 from a, 0.5 from b and 1.25 from c (squared).
    shopper = (np.array([0]), np.array([0.5]))
    assert vectors(2).nearest(*shopper).tolist() == [0, 1]
    assert vectors(1).nearest(*shopper).tolist() == [0]
    assert vectors(5).nearest(*shopper).tolist() == [0, 1, 2]  # k beyond the shop: everyone


def test_the_neighbourhood_is_the_mean_of_the_nearest_vectors() -> None:
    neighbourhood = vectors(2).neighbourhood(np.array([0]), np.array([0.5]))
    np.testing.assert_allclose(neighbourhood, [0.25, 0.375, 0.0, 0.0])


def test_a_shopper_is_not_their_own_neighbour() -> None:
    # Shopper "a" asks: a itself is left out, b (0.25 + 0.0625 = 0.3125) and c come next.
    assert vectors(2).nearest(np.array([0, 1]), np.array([0.5, 0.25]), "a").tolist() == [1, 2]


def test_the_only_shopper_of_a_shop_has_no_neighbours() -> None:
    alone = ShopperVectors.from_vectors(
        [("a", np.array([0, 1]), np.array([0.5, 0.25]))], ITEMS, 2, alpha=0.7
    )
    assert alone.nearest(np.array([0, 1]), np.array([0.5, 0.25]), "a").tolist() == []
    assert not alone.neighbourhood(np.array([0, 1]), np.array([0.5, 0.25]), "a").any()


def test_a_shopper_who_bought_nothing_has_no_neighbourhood() -> None:
    assert not vectors(2).neighbourhood(np.array([], dtype=np.int64), np.array([])).any()


def test_tifu_knn_scores_alpha_own_plus_one_minus_alpha_neighbours() -> None:
    shopper = vectors(2)
    own = np.array([0.5, 0.0, 0.0, 0.0])
    neighbourhood = shopper.neighbourhood(np.array([0]), np.array([0.5]))
    # item 0: 0.7 x 0.5 + 0.3 x 0.25; item 1: 0.3 x 0.375
    expected = [0.425, 0.1125, 0.0, 0.0]
    np.testing.assert_allclose(shopper.score(own, neighbourhood), expected, rtol=1e-6)
    features = np.zeros((ITEMS, len(REC_FEATURE_NAMES)), dtype=np.float32)
    features[:, REC_FEATURE_NAMES.index("recent_share")] = own
    features[:, REC_FEATURE_NAMES.index("neighbour_share")] = neighbourhood
    scores = LinearScorer(tifu_weights(0.7), REC_FEATURE_NAMES)(features)  # the parameter search
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_a_profiles_vector_is_its_decayed_basket_share() -> None:
    profile = Profile()
    # item 10 in baskets 0 and 2, item 11 in basket 1
    for product, basket in ((10, "b0"), (11, "b1"), (10, "b2")):
        profile.apply(product, PURCHASE, 0.0, basket)
    view = UserView.of(profile, lambda ids: np.asarray(ids) - 10)
    shares = dict(zip(view.rows.tolist(), view.shares.tolist(), strict=True))
    r = BASKET_DECAY
    assert shares[0] == pytest.approx((1 - r) * (1 + r**2))
    assert shares[1] == pytest.approx((1 - r) * r)


def test_vectors_survive_a_save_and_load(tmp_path) -> None:
    saved = vectors(2)
    saved.save(tmp_path / "neighbours.npz")
    loaded = ShopperVectors.load(tmp_path / "neighbours.npz")
    assert (loaded.k, loaded.alpha) == (2, 0.7) and loaded.keys.tolist() == ["a", "b", "c"]
    for part in ("values", "columns", "starts"):
        np.testing.assert_array_equal(getattr(loaded.matrix, part), getattr(saved.matrix, part))
