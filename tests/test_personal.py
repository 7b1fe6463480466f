"""Personalisation end to end: a store built from the generic Instacart files alone (no judgments),
served by the real tritonserver: recommend for known and unknown shoppers, personalised against
anonymous search, bad inputs, the CLI, and the server agreeing with the in-process pipelines."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import raw_infer, tensor
from shopserve.client import Filters, InvalidRequestError, SearchClient
from shopserve.client._cli import main as cli
from shopserve.ensemble import SearchPipeline, store
from shopserve.ensemble.personal import RecommendPipeline, profile_namespace
from shopserve.ensemble.profiles import UserKeys
from shopserve.ensemble.redis_link import connect

from shopserve.server import default_live_profiles, free_ports

pytestmark = [pytest.mark.slow, pytest.mark.server]

SHOPPERS = [str(u) for u in (1, 2, 7, 13, 21, 42, 77, 101, 202, 303)]
QUERIES = ["yogurt", "organic milk", "sparkling water", "bananas", "frozen pizza"]


@pytest.fixture(scope="module")
def manifest(personal_repository) -> dict:
    return json.loads((personal_repository / store.MANIFEST_FILE).read_text())


@pytest.fixture(scope="module")
def client(personal_server) -> SearchClient:
    with SearchClient(personal_server.grpc_url, timeout=30) as shopper_client:
        yield shopper_client


@pytest.fixture(scope="module")
def recommender(personal_repository) -> RecommendPipeline:
    return RecommendPipeline.from_repository(personal_repository)


@pytest.fixture(scope="module")
def searcher(personal_repository) -> SearchPipeline:
    return SearchPipeline.from_repository(personal_repository)


def ids(hits) -> list[int]:
    return [hit.product_id for hit in hits]


def test_the_store_was_built_from_generic_files_without_judgments(manifest) -> None:
    assert manifest["models"].keys() >= {store.RECOMMEND, store.REC_RANKER, store.SEARCH}
    assert manifest["data"]["queries"] == 0
    assert set(manifest["data"]["files"]) == {"items.csv", "events.csv"}
    personal = manifest["personalization"]
    assert personal["users"] == personal["profiles"] == 593
    assert personal["user_key_fingerprint"] == UserKeys.from_environment().fingerprint()
    assert personal["holdout"] == "each shopper's last basket, inside the evaluation only"
    assert personal["split"]["seed"] == 13 and personal["split"]["train_users"] > 400
    recommend = personal["evaluation"]["recommend"]
    assert recommend["users"] >= 590
    for system in ("popularity", "purchase_frequency", "tifu_knn", "recommend"):
        low, high = recommend["systems"][system]["recall20"]["ci95"]
        assert 0 <= low <= recommend["systems"][system]["recall20"]["mean"] <= high <= 1
    ranker = personal["ranker"]
    gate = ranker["validation_recall20"]
    assert ranker["selected"] in ("learned", "purchase_frequency", "tifu_knn")
    assert gate[ranker["selected"]] == max(gate.values())
    assert ranker["tifu_knn"]["k"] > 0 and 0 < ranker["tifu_knn"]["alpha"] < 1
    served = personal["evaluation"]["recommend_validation_shoppers"]["systems"]
    assert served["recommend"]["recall20"]["mean"] >= max(
        served[name]["recall20"]["mean"] for name in ("purchase_frequency", "tifu_knn")
    )
    search = personal["evaluation"]["personalised_search"]
    assert search["queries"] > 1000
    assert set(search["systems"]) == {
        "anonymous_search",
        "frequency_among_candidates",
        "personalised_search",
    }
    for system in search["systems"].values():
        for metric in ("ndcg10", "mrr10", "category_ndcg10"):
            low, high = system[metric]["ci95"]
            assert 0 <= low <= system[metric]["mean"] <= high <= 1


def test_the_fitted_search_weight_lives_with_its_version(personal_repository, manifest) -> None:
    weight = manifest["personalization"]["search_weight"]["value"]
    parameters = store.config_parameters(personal_repository, store.SEARCH, 1)
    assert float(parameters["personal_weight"]) == weight
    fitted = store.fitted_parameters(store.version_dir(personal_repository, store.SEARCH, 1))
    assert float(fitted["personal_weight"]) == weight
    assert "search/1/fitted.json" in manifest["files"]  # checksummed with the version's files


def test_recommend_for_known_shoppers_matches_the_in_process_pipeline(client, recommender) -> None:
    for shopper in SHOPPERS:
        hits = client.recommend(shopper, top_k=20)
        reference = recommender.recommend(shopper, 20)
        assert ids(hits) == reference.product_ids.tolist(), shopper
        np.testing.assert_allclose([h.score for h in hits], reference.scores, atol=1e-5)
        assert [h.title for h in hits] == reference.titles


def test_a_known_shoppers_recommendations_lean_on_their_history(client, recommender) -> None:
    shopper = SHOPPERS[0]
    view = recommender.personal.view(shopper)
    bought = set(recommender.personal.recommender.product_ids[view.rows].tolist())
    assert len(bought & set(ids(client.recommend(shopper, top_k=10)))) >= 5


def test_new_only_recommends_nothing_the_shopper_bought(client, recommender) -> None:
    for shopper in SHOPPERS[:4]:
        hits = client.recommend(shopper, top_k=20, new_only=True)
        view = recommender.personal.view(shopper)
        bought = recommender.personal.recommender.product_ids[view.rows[view.purchases > 0]]
        assert len(hits) == 20 and not set(ids(hits)) & set(bought.tolist())
        assert ids(hits) == recommender.recommend(shopper, 20, new_only=True).product_ids.tolist()


def test_the_served_profiles_hold_every_basket_of_the_events_file(client, instacart_files) -> None:
    """new_only never returns anything a shopper bought, in any basket, the latest included."""
    bought: dict[str, set[int]] = {}
    with instacart_files[1].open() as handle:
        for row in csv.DictReader(handle):
            bought.setdefault(row["user_id"], set()).add(int(row["product_id"]))
    assert len(bought) == 593
    for shopper, products in bought.items():
        hits = client.recommend(shopper, top_k=20, new_only=True)
        assert len(hits) == 20 and not set(ids(hits)) & products, shopper


def test_an_unknown_shopper_gets_the_best_sellers(client, recommender) -> None:
    hits = client.recommend("never-seen-shopper", top_k=10)
    cold = recommender.cold_start(10)
    assert ids(hits) == cold.product_ids.tolist()
    assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
    assert ids(client.recommend("someone-else-unknown", top_k=10)) == ids(hits)


def test_recommend_and_personalised_search_keep_to_a_category(
    client, recommender, searcher, instacart_files
) -> None:
    """A category filter (Instacart's department / aisle) on recommend, NEW_ONLY, the cold start and
    personalised search: k products, all in the category, as the in-process pipelines answer."""
    with instacart_files[0].open() as handle:
        category = {int(r["product_id"]): r["category"].lower() for r in csv.DictReader(handle)}
    frozen = Filters(category="Frozen")
    inputs = {"CATEGORY": "Frozen"}
    for shopper in [*SHOPPERS[:4], "never-seen-shopper"]:
        for new_only in (False, True):
            hits = client.recommend(shopper, top_k=20, new_only=new_only, filters=frozen)
            local = recommender.recommend(shopper, 20, new_only, inputs)
            assert ids(hits) == local.product_ids.tolist(), (shopper, new_only)
            assert len(hits) == 20 and all(category[h].startswith("frozen /") for h in ids(hits))
        hits = client.search("ice cream", top_k=10, user_id=shopper, filters=frozen)
        local = searcher.search("ice cream", 10, shopper, inputs)
        assert ids(hits) == local.product_ids.tolist()
        assert len(hits) == 10 and all(category[h].startswith("frozen /") for h in ids(hits))
    unfiltered = ids(client.recommend(SHOPPERS[0], top_k=20))
    assert not all(category[h].startswith("frozen /") for h in unfiltered)


def test_search_without_a_shopper_is_exactly_the_anonymous_search(client) -> None:
    for query in QUERIES:
        anonymous = client.search(query, top_k=10)
        unknown = client.search(query, top_k=10, user_id="never-seen-shopper")
        assert ids(unknown) == ids(anonymous)
        assert [h.score for h in unknown] == [h.score for h in anonymous]


def test_personalised_search_matches_the_in_process_pipeline(client, searcher) -> None:
    changed = 0
    for shopper in SHOPPERS[:5]:
        for query in QUERIES:
            hits = client.search(query, top_k=10, user_id=shopper)
            reference = searcher.search(query, 10, user_id=shopper)
            assert ids(hits) == reference.product_ids.tolist(), (shopper, query)
            np.testing.assert_allclose([h.score for h in hits], reference.scores, atol=1e-5)
            changed += ids(hits) != ids(client.search(query, top_k=10))
    assert changed > 0  # the shopper's history moves some answers


def test_recommendations_explain_themselves_in_the_shoppers_own_numbers(
    client, recommender, searcher
) -> None:
    """EXPLAIN on recommend (known shopper, NEW_ONLY, unknown shopper) and on personalised search,
    through the server: the in-process explanations, adding up to each hit's logit; a product the
    shopper bought says how often, one of NEW_ONLY never does."""
    from test_server import assert_same_explanations

    shopper = SHOPPERS[0]
    view = recommender.personal.view(shopper)
    history = dict(
        zip(
            recommender.personal.recommender.product_ids[view.rows].tolist(),
            view.purchases.tolist(),
            strict=True,
        )
    )
    for split in recommender.explainer.rankers.values():  # a learned ranker records its network
        learned = (split.ranker.contract or {}).get("form") == "monotone calibrated network"
        assert (split.network is not None) == learned
    hits = client.recommend(shopper, top_k=10, explain=True)
    assert ids(hits) == ids(client.recommend(shopper, top_k=10))
    assert_same_explanations(hits, recommender.recommend(shopper, 10, explain=True))
    for hit in hits:
        words = {r.signal: r.text for r in hit.explanation.reasons}
        if history.get(hit.product_id, 0) > 0:
            count = history[hit.product_id]
            times = {1: "once", 2: "twice"}.get(count, f"{count} times")
            assert words["your_purchases"].startswith(f"you bought it {times},")
        else:
            assert words["your_purchases"] == "you have not bought it before"
    fresh = client.recommend(shopper, top_k=10, new_only=True, explain=True)
    assert_same_explanations(fresh, recommender.recommend(shopper, 10, True, explain=True))
    assert all(
        r.contribution == 0
        for h in fresh
        for r in h.explanation.reasons
        if r.signal == "your_purchases"
    )
    newcomer = client.recommend("never-seen-shopper", top_k=3, explain=True)
    assert all("we do not know you yet" in h.explanation.reasons[0].text for h in newcomer)
    personalised = client.search("organic milk", top_k=5, user_id=shopper, explain=True)
    expected = searcher.search("organic milk", 5, user_id=shopper, explain=True)
    assert_same_explanations(personalised, expected)
    signals = {r.signal for h in personalised for r in h.explanation.reasons}
    assert {"meaning", "your_purchases"} <= signals


@pytest.mark.parametrize(
    ("user_id", "problem"),
    [
        (b"", "USER_ID is empty"),
        (b"   ", "USER_ID is empty"),
        (b"x" * 257, "USER_ID is 257 bytes long; the limit is 256"),
        (b"\xff\xfe", "USER_ID is not valid UTF-8"),
    ],
)
def test_bad_user_ids_are_invalid_argument(client, user_id, problem) -> None:
    with pytest.raises(InvalidRequestError, match=problem):
        client.recommend(user_id, top_k=5)
    with pytest.raises(InvalidRequestError, match=problem):
        client.search("milk", top_k=5, user_id=user_id)
    assert len(client.recommend(SHOPPERS[0], top_k=3)) == 3


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [
        (
            [
                ("USER_ID", np.array([7], np.int32), "INT32"),
                ("TOP_K", np.array([5], np.int32), "INT32"),
            ],
            "expects 'BYTES'",
        ),
        (
            [
                ("USER_ID", np.array([b"1", b"2"], dtype=object), "BYTES"),
                ("TOP_K", np.array([5], np.int32), "INT32"),
            ],
            "unexpected shape",
        ),
        ([("TOP_K", np.array([5], np.int32), "INT32")], "missing required input"),
    ],
)
def test_malformed_recommend_requests_are_invalid_argument(
    personal_server, client, inputs, problem
) -> None:
    error = raw_infer(personal_server.grpc_url, store.RECOMMEND, [tensor(*s) for s in inputs])
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and problem in error.message()
    assert len(client.recommend(SHOPPERS[0], top_k=3)) == 3


def test_recommend_and_personalised_search_cli(personal_server, capsys) -> None:
    assert cli([SHOPPERS[0], "-k", "3", "--url", personal_server.grpc_url], recommend=True) == 0
    assert cli(["milk", "-k", "3", "--user", SHOPPERS[0], "--url", personal_server.grpc_url]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 8 and "product_id" in out
    frozen = [SHOPPERS[0], "--category", "frozen", "--json", "--url", personal_server.grpc_url]
    assert cli(frozen, recommend=True) == 0
    assert len(capsys.readouterr().out.splitlines()) == 10
    explained = [SHOPPERS[0], "-k", "2", "--explain", "--url", personal_server.grpc_url]
    assert cli(explained, recommend=True) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 3 + 2 * 3 and "you bought it" in out


def _serve(repository: Path, work: Path, env: dict, *flags: str) -> subprocess.CompletedProcess:
    """``shopserve serve`` as an operator runs it, for a start that is refused."""
    command = [str(Path(sys.executable).parent / "shopserve"), "serve"]
    return subprocess.run(
        [*command, "--model-repository", str(repository), "--work-dir", str(work), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_the_server_refuses_a_personalised_store_without_the_secret(
    personal_repository, tmp_path, request, backend
):
    """Before it writes anything: no live file, no Redis namespace seeded under a wrong secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOPSERVE_USER")}
    work = tmp_path / "work"
    live = [] if backend == "sqlite" else ["--profile-store", request.getfixturevalue("redis_url")]

    def serve() -> subprocess.CompletedProcess:
        return _serve(personal_repository, work, env, *live)

    run = serve()
    assert run.returncode == 1
    assert "is a personalised store" in run.stderr and "shopserve keys create" in run.stderr
    env["SHOPSERVE_USER_KEY"] = "another secret, not the build's"  # a wrong one: refused too
    run = serve()
    assert run.returncode == 1
    assert "is not the one version 1" in run.stderr
    assert "every shopper would look unknown" in run.stderr
    assert env["SHOPSERVE_USER_KEY"] not in run.stderr
    assert not default_live_profiles(work).exists()
    if live:  # no key names the build's namespace, whatever the store's key layout
        assert not connect(live[1]).keys(f"*{profile_namespace(personal_repository)}*")


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_the_server_says_why_its_profile_store_could_not_be_prepared(
    personal_repository, tmp_path, backend
):
    """A Redis that is not there, or a live file that cannot be made: a message that names the
    store (never its password) and the reason, exit 1, no traceback."""
    if backend == "redis":
        (port,) = free_ports(1)  # nothing listens there
        location, reason = f"redis://:never-shown-pw@127.0.0.1:{port}/0", "(ConnectionError)"
    else:
        (tmp_path / "a-file").write_text("")
        location, reason = str(tmp_path / "a-file" / "live.sqlite"), "(FileExistsError: "
    run = _serve(
        personal_repository, tmp_path / "work", dict(os.environ), "--profile-store", location
    )
    assert run.returncode == 1, run.stderr
    assert f"could not be prepared {reason}" in run.stderr and "did not start" in run.stderr
    assert "Traceback" not in run.stderr and "never-shown-pw" not in run.stderr
