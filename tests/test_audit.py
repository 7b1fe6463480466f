"""``python -m shopserve.export audit`` on the built Home Depot and Instacart stores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT, documented_commands
from shopserve.export.audit import RANKINGS_FILE, product_groups
from shopserve.export.exposure import product_exposure

pytestmark = [pytest.mark.slow]


def run_audit(*arguments: object, env: dict | None = None) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shopserve.export", "audit", *map(str, arguments)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_home_depot_audit_reproduces_from_its_rankings(built_repository, data_dir, tmp_path):
    """The documented command on the built store; its table of the most exposed groups
    recomputed from the rankings the report keeps."""
    (command,) = documented_commands("fairness.md", "audit")
    assert command[:4] == ["python", "-m", "shopserve.export", "audit"], command
    swap = {
        "stores/homedepot": built_repository,
        "../shared/data/homedepot": data_dir,
        "audit/homedepot": tmp_path,
    }
    run_audit(*[swap.get(word, word) for word in command[4:]])
    report = json.loads((tmp_path / "audit.json").read_text())
    search = report["search"]
    assert report["queries"].startswith("dev split") and search["queries"] > 1000
    for name in ("exposure_gini", "top_1pct_groups_share", "disparity_to_merit", "ndcg_at_10"):
        entry = search["metrics"][name]
        assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1], name
    assert 0.5 < search["metrics"]["exposure_gini"]["value"] < 1
    assert 0 < search["metrics"]["disparity_to_merit"]["value"] < 1
    assert {"exposure_lorenz.png", "exposure_vs_merit.png"} <= set(report["plots"])
    assert "| exposure_gini |" in (tmp_path / "audit.md").read_text()
    # the table of the most exposed groups, recomputed from the rankings the report kept
    rankings = json.loads((tmp_path / RANKINGS_FILE).read_text())
    groups = product_groups(built_repository)
    catalogue_ids = np.load(next(built_repository.glob("postprocess/*/catalogue_ids.npy")))
    group_of = dict(zip(catalogue_ids.tolist(), groups.of_row.tolist(), strict=True))
    by_group = np.zeros(len(groups.names))
    for product, exposure in product_exposure(rankings["product_ids"], 10).items():
        by_group[group_of[product]] += exposure
    for row in search["top_groups"]:
        share = by_group[groups.names.index(row["group"])] / by_group.sum()
        assert row["exposure_share"] == pytest.approx(share, abs=1e-4)


def test_the_recommendation_audit_agrees_with_the_build(
    personal_repository, instacart_files, user_key_file, tmp_path
):
    items, events = instacart_files
    queries = tmp_path / "queries.txt"
    queries.write_text("yogurt\nfresh fruits\ncookies cakes\n")
    run_audit(
        "--repository", personal_repository,
        "--catalogue", items,
        "--queries", queries,
        "--events", events,
        "--output", tmp_path / "report",
    )  # fmt: skip
    report = json.loads((tmp_path / "report" / "audit.json").read_text())
    recommend = report["recommend"]
    groups = recommend["by_history"]
    assert sum(g["cases"] for g in groups.values()) == recommend["shoppers"]
    for group in groups.values():
        low, high = group["recall_at_20"]["ci95"]
        assert low <= group["recall_at_20"]["value"] <= high
    # the served ranker on the same held-out baskets as the build's own evaluation
    manifest = json.loads((Path(personal_repository) / "manifest.json").read_text())
    built = manifest["personalization"]["evaluation"]["recommend"]["systems"]["recommend"]
    assert recommend["overall"]["recall_at_20"]["mean"] == built["recall20"]["mean"]
    assert recommend["shoppers"] == built["recall20"]["n"]
    assert 0 < recommend["most_bought_1pct_exposure_share"] < 1
    assert report["search"]["group_kind"] == "top-level category"
    assert "quality_by_shopper_group.png" in report["plots"]
    # personalised search by shopper group: the build's basket queries through the served search
    searched = report["personalised_search"]
    built = manifest["personalization"]["evaluation"]["personalised_search"]
    assert searched["queries"] == built["queries"]
    assert sum(g["cases"] for g in searched["by_history"].values()) == searched["queries"]
    for name, system in (
        ("personalised_ndcg_at_10", "personalised_search"),
        ("anonymous_ndcg_at_10", "anonymous_search"),
    ):
        assert searched["overall"][name]["mean"] == pytest.approx(
            built["systems"][system]["ndcg10"]["mean"], abs=1e-3
        )
    gain = searched["overall"]["personalisation_gain"]["mean"]
    assert gain == pytest.approx(
        searched["overall"]["personalised_ndcg_at_10"]["mean"]
        - searched["overall"]["anonymous_ndcg_at_10"]["mean"],
        abs=2e-4,
    )
    assert "personalised_search_by_shopper_group.png" in report["plots"]
    assert (
        "## Personalised search: whom it serves well"
        in (tmp_path / "report" / "audit.md").read_text()
    )
