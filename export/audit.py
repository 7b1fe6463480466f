"""``python -m shopserve.export audit``: whom the served search shows, against whom it should.

Queries (the build's dev split of a judgments file, or a log of queries) run through the served
search graph in process (``SearchPipeline``, the graph the server runs). Over their top 10:
provider exposure by group under the logarithmic attention model (shopserve.export.exposure), its
concentration (Gini over every group of the catalogue, the share of the top 1 % of groups),
catalogue coverage, and, where the queries are judged, exposure against merit (the disparity) and
nDCG@10. Every number but the coverage (a count) has a 95 % jackknife interval over queries. The report (``audit.md``), its
numbers (``audit.json``), the rankings they were computed from (``search_rankings.json``) and two plots (the exposure Lorenz curve, exposure against merit per
group) go to ``--output``.

With ``--events`` (a store built with events, and its events file), the recommendations are
audited too, on every shopper's last basket held out as the build evaluates them: Recall@20 and
nDCG@20 by shopper group (history length: ``new``, ``light``, ``heavy``; Fairlearn's MetricFrame
keeps the books, with bootstrap intervals), the share of exposure the most-bought 1 % of products
get, the share that goes to products the shopper never bought, and catalogue coverage; and, where
the catalogue has categories, personalised search by the same groups: the build's basket queries
(one per shopper and category of the held-out basket) answered by the served search for the
shopper and anonymously, nDCG@10 of each and the gain between them.

A product's group is its top-level category where the catalogue has a category column, else its
brand, taken as the first word of its title, lower-cased (Home Depot titles start with the brand:
"DEWALT 20-Volt ...", "BEHR Premium ..."; a title that starts otherwise, "1/2 in. ...", makes a
group of its own word, which the report counts like any other).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse
from shopserve.ensemble import SearchPipeline, store
from shopserve.ensemble.dense import served_dense
from shopserve.ensemble.exposure import OFF, PLACKETT_LUCE
from shopserve.ensemble.filters import load_attributes
from shopserve.ensemble.models import OnnxRanker
from shopserve.ensemble.neighbours import NEIGHBOURS_FILE, ShopperVectors
from shopserve.ensemble.recommend import Recommender
from tqdm.auto import tqdm

from .data import CatalogueData, DataError, Judgments, load_events
from .evaluate_personal import interval, personal_top, score_queries
from .exposure import (
    attention,
    coverage,
    gini,
    jackknife,
    lorenz,
    product_exposure,
    shares,
    top_share,
)
from .history import (
    Case,
    HistoryCut,
    basket_queries,
    bought_before,
    ranked,
    recall,
    timelines,
)
from .metrics import binary_ndcg_at_k, ndcg_at_k

K = 10
RECOMMEND_K = 20
RANKINGS_FILE = "search_rankings.json"  # beside the report: each query's served top 10
# Shopper groups by the number of baskets before the held-out one (Instacart's shoppers have 3 or
# more): at most NEW_BASKETS "new", at most LIGHT_BASKETS "light", more "heavy".
NEW_BASKETS = 3
LIGHT_BASKETS = 10
HISTORY_GROUPS = ("new", "light", "heavy")
FAIRLEARN_BOOTSTRAP = 200
TRADEOFF_TEMPERATURES = (0.1, 0.25, 0.5, 1.0)
DRAWS = 4  # Plackett-Luce draws per query in the trade-off curve
TOP_GROUPS = 0.01  # the "top 1 %" of groups
_FIRST_WORD = re.compile(r"\w[\w&'.-]*")


@dataclass(frozen=True)
class ProductGroups:
    """The group of every catalogue row, and what a group is."""

    kind: str
    names: list[str]  # every group of the catalogue, sorted
    of_row: np.ndarray  # int: the group (index into names) of each catalogue row


def product_groups(repository: Path, version: int | None = None) -> ProductGroups:
    attributes = load_attributes(repository, version)
    if attributes.category_codes is not None:
        tops = [path[0] if path else "?" for path in attributes.categories]
        labels = [tops[c] if c >= 0 else "?" for c in attributes.category_codes.tolist()]
        kind = "top-level category"
    else:
        titles = store.load_catalogue(repository, version).titles
        labels = [brand(title) for title in titles]
        kind = "brand (the title's first word)"
    names, of_row = np.unique(np.array(labels, dtype=str), return_inverse=True)
    return ProductGroups(kind, names.tolist(), of_row)


def brand(title: str) -> str:
    match = _FIRST_WORD.search(title)
    return match.group().lower() if match else "?"


@dataclass(frozen=True)
class SearchRankings:
    queries: list[str]
    rows: list[np.ndarray]  # each query's top-K catalogue rows, best first
    product_ids: np.ndarray  # the catalogue's, by row


def search_rankings(
    pipeline: SearchPipeline, catalogue: store.Catalogue, queries: Sequence[str]
) -> SearchRankings:
    rows_of = catalogue.product_rows()
    rows = [
        rows_of.rows(pipeline.search(query, K).product_ids)
        for query in tqdm(queries, desc="audit queries", unit="query")
    ]
    return SearchRankings(list(queries), rows, np.asarray(catalogue.product_ids))


def _exposure_matrix(rankings: SearchRankings, groups: ProductGroups) -> sparse.csr_matrix:
    """Exposure by query (rows) and group (columns)."""
    weights = attention(K)
    data, columns, starts = [], [], [0]
    for rows in rankings.rows:
        data.extend(weights[: len(rows)])
        columns.extend(groups.of_row[rows].tolist())
        starts.append(len(data))
    shape = (len(rankings.rows), len(groups.names))
    matrix = sparse.csr_matrix((data, columns, starts), shape=shape)
    matrix.sum_duplicates()
    return matrix


def _merit_matrix(
    rankings: SearchRankings, groups: ProductGroups, judgments: Judgments
) -> sparse.csr_matrix:
    """Judged gain by query and group (a judged product the catalogue lacks counts for none)."""
    row_of = {pid: row for row, pid in enumerate(rankings.product_ids.tolist())}
    data, columns, starts = [], [], [0]
    for query in rankings.queries:
        for pid, gain in judgments.gains(query).items():
            if pid in row_of and gain > 0:
                data.append(gain)
                columns.append(int(groups.of_row[row_of[pid]]))
        starts.append(len(data))
    shape = (len(rankings.queries), len(groups.names))
    matrix = sparse.csr_matrix((data, columns, starts), shape=shape)
    matrix.sum_duplicates()
    return matrix


def _with_interval(value: float, interval: tuple[float, float] | None) -> dict:
    return {
        "value": round(value, 4),
        "ci95": None if interval is None else [round(interval[0], 4), round(interval[1], 4)],
    }


def search_audit(
    rankings: SearchRankings,
    groups: ProductGroups,
    judgments: Judgments | None,
    intervals: bool = True,
) -> dict:
    """Exposure concentration, coverage and (judged queries) disparity and nDCG@10; the jackknife
    intervals unless ``intervals`` is False."""
    exposure = _exposure_matrix(rankings, groups)
    count = len(rankings.rows)

    def totals(matrix: sparse.csr_matrix, weights: np.ndarray) -> np.ndarray:
        return np.asarray(matrix.T @ weights).ravel()

    everyone = np.ones(count)
    statistics = {
        "exposure_gini": lambda w: gini(totals(exposure, w)),
        "top_1pct_groups_share": lambda w: top_share(totals(exposure, w), TOP_GROUPS),
    }
    if judgments is not None:
        merit = _merit_matrix(rankings, groups, judgments)

        def disparity(weights: np.ndarray) -> float:
            exposed, deserved = totals(exposure, weights), totals(merit, weights)
            return float(0.5 * np.abs(exposed / exposed.sum() - deserved / deserved.sum()).sum())

        gains = [judgments.gains(q) for q in rankings.queries]
        ndcg = np.array(
            [
                ndcg_at_k(rankings.product_ids[rows].tolist(), gain, K)
                for rows, gain in zip(rankings.rows, gains, strict=True)
            ]
        )
        statistics["disparity_to_merit"] = disparity
        statistics["ndcg_at_10"] = lambda w: float(w @ ndcg / w.sum())
    result = {
        name: _with_interval(
            statistic(everyone), jackknife(statistic, count) if intervals else None
        )
        for name, statistic in statistics.items()
    }
    # Coverage has no interval: it counts the distinct products this query set shows, and any
    # reweighting of the same queries shows the same products.
    result["coverage_at_10"] = {
        "value": round(
            coverage([r.tolist() for r in rankings.rows], K, len(rankings.product_ids)), 4
        ),
        "ci95": None,
    }
    by_group = totals(exposure, everyone)
    table = {"exposure_share": shares(dict(enumerate(by_group)), range(len(groups.names)))}
    if judgments is not None:
        table["merit_share"] = shares(
            dict(enumerate(totals(merit, everyone))), range(len(groups.names))
        )
    return {
        "queries": count,
        "groups": len(groups.names),
        "groups_shown": int((by_group > 0).sum()),
        "group_kind": groups.kind,
        "metrics": result,
        "top_groups": _top_groups(groups, table),
        "_exposure_by_group": by_group,
        "_shares": table,
    }


def _top_groups(groups: ProductGroups, table: dict[str, np.ndarray], count: int = 15) -> list:
    order = np.argsort(-table["exposure_share"], kind="stable")[:count]
    return [
        {"group": groups.names[g], **{k: round(float(v[g]), 4) for k, v in table.items()}}
        for g in order
    ]


def exposure_tradeoff(
    pipeline: SearchPipeline,
    catalogue: store.Catalogue,
    judgments: Judgments,
    groups: ProductGroups,
) -> list[dict]:
    """nDCG@10 against exposure concentration for the ranker's own order and Plackett-Luce draws
    at each of TRADEOFF_TEMPERATURES: DRAWS seeded draws per query, so the exposure is the
    expected exposure over repeated queries."""
    rows_of = catalogue.product_rows()
    curve = []
    for temperature in (None, *TRADEOFF_TEMPERATURES):
        seeds = [None] if temperature is None else range(DRAWS)
        keys, rows = [], []
        for query in tqdm(judgments.queries, desc=f"exposure at {temperature}", unit="query"):
            for seed in seeds:
                exposure = None
                if temperature is not None:
                    exposure = {"EXPOSURE": PLACKETT_LUCE, "TEMPERATURE": temperature, "SEED": seed}
                answer = pipeline.search(query, K, exposure=exposure)
                keys.append(query)
                rows.append(rows_of.rows(answer.product_ids))
        # each draw weighs as one query: shares and means are those of the expected exposure
        draws = Judgments(
            OrderedDict((str(i), judgments.by_query[q]) for i, q in enumerate(keys)),
            judgments.min_relevance,
        )
        ranked = SearchRankings([str(i) for i in range(len(keys))], rows, catalogue.product_ids)
        metrics = search_audit(ranked, groups, draws, intervals=False)["metrics"]
        curve.append(
            {
                "exposure": OFF if temperature is None else PLACKETT_LUCE,
                "temperature": temperature,
                **{name: entry["value"] for name, entry in metrics.items()},
            }
        )
    return curve


def history_group(baskets_before: int) -> str:
    if baskets_before <= NEW_BASKETS:
        return "new"
    return "light" if baskets_before <= LIGHT_BASKETS else "heavy"


@dataclass(frozen=True)
class HeldOutShop:
    """The shop as the build's evaluation sees it: every shopper's last basket held out, the shop
    and profiles as of before it, the store's TIFU-KNN parameters and recommendation ranker."""

    data: CatalogueData
    recommender: Recommender
    served: OnnxRanker
    cases: list[Case]
    group_of: dict[str, str]  # each shopper's history group
    most_bought: set[int]  # the most-bought 1 % of products before the held-out baskets

    @classmethod
    def of(cls, repository: Path, events_path: Path) -> HeldOutShop:
        if not store.version_dirs(repository, store.RECOMMEND):
            raise ValueError(f"{repository} was built without events: it has no recommendations")
        catalogue = store.load_catalogue(repository)
        data = CatalogueData(
            np.asarray(catalogue.product_ids), catalogue.titles, _category_column(repository)
        )
        events = load_events(events_path, data)
        dense = served_dense(repository)
        lines = timelines(events)
        held_out = HistoryCut.of(data, events, lines, 1)
        tifu = ShopperVectors.load(store.version_dir(repository, store.RECOMMEND) / NEIGHBOURS_FILE)
        recommender = held_out.recommender(dense, tifu.k, tifu.alpha)
        popularity = held_out.items.popularity
        top_count = max(1, len(popularity) // 100)
        most_bought = data.product_ids[np.argsort(-popularity, kind="stable")[:top_count]]
        return cls(
            data,
            recommender,
            OnnxRanker(store.model_file(repository, store.REC_RANKER)),
            held_out.cases(list(lines), recommender),
            {user: history_group(line.baskets - 1) for user, line in lines.items()},
            set(most_bought.tolist()),
        )


@dataclass(frozen=True)
class RecommendationLists:
    """Each held-out case's served top 20, what the shopper bought next and before, and group."""

    top: list[list[int]]
    labels: list[set[int]]
    bought_before: list[set[int]]
    groups: list[str]
    most_bought: set[int]  # the most-bought 1 % of products before the held-out baskets
    catalogue_size: int


def recommendation_lists(shop: HeldOutShop) -> RecommendationLists:
    """The served recommendation ranker on every shopper's last basket."""
    cases = shop.cases
    return RecommendationLists(
        [
            ranked(c, shop.recommender, shop.served, RECOMMEND_K)
            for c in tqdm(cases, desc="audit shoppers")
        ],
        [c.label for c in cases],
        [bought_before(c, shop.recommender) for c in cases],
        [shop.group_of[c.user] for c in cases],
        shop.most_bought,
        len(shop.data.product_ids),
    )


@dataclass(frozen=True)
class PersonalSearchLists:
    """Each basket query's top 10, anonymous and personalised, its relevant products (the held-out
    basket's items of the query's category) and the shopper's group."""

    anonymous: list[list[int]]
    personalised: list[list[int]]
    relevant: list[frozenset[int]]
    groups: list[str]
    weight: float


def personal_search_lists(
    shop: HeldOutShop, pipeline: SearchPipeline
) -> PersonalSearchLists | None:
    """The served search, anonymous and for the shopper, on the build's basket queries (one per
    shopper and category of their held-out basket); None for a catalogue without categories."""
    queries = basket_queries(shop.cases, shop.data)
    if not queries or pipeline.personal is None:
        return None
    scored = score_queries(
        queries,
        lambda query: pipeline.encoder(*pipeline.tokenizer(query))[0],
        pipeline.retriever,
        pipeline.ranker,
        shop.recommender,
        shop.served,
        desc="audit basket queries",
    )
    weight = pipeline.personal.search_weight
    return PersonalSearchLists(
        [personal_top(s, 0.0) for s in scored],
        [personal_top(s, weight) for s in scored],
        [s.query.relevant for s in scored],
        [shop.group_of[s.query.case.user] for s in scored],
        weight,
    )


def _category_column(repository: Path) -> dict[str, list[str]]:
    """The catalogue's category column as the build read it (the recommender's item features
    compare categories), rebuilt from the store's attributes."""
    attributes = load_attributes(repository)
    if attributes.category_codes is None:
        return {}
    paths = [" / ".join(path) for path in attributes.categories]
    return {"category": [paths[c] if c >= 0 else "" for c in attributes.category_codes.tolist()]}


def quality_by_group(metrics: dict[str, np.ndarray], groups: Sequence[str]) -> dict:
    """Per-case metrics by history group (Fairlearn's MetricFrame, bootstrap intervals), overall
    (normal approximation) and the largest gap between groups."""
    import pandas as pd
    from fairlearn.metrics import MetricFrame

    cases = np.arange(len(groups))

    def mean_of(values: np.ndarray):
        return lambda y_true, y_pred: float(values[np.asarray(y_true)].mean())

    frame = MetricFrame(
        metrics={name: mean_of(values) for name, values in metrics.items()},
        y_true=cases,
        y_pred=cases,
        sensitive_features=pd.Series(list(groups), name="history"),
        n_boot=FAIRLEARN_BOOTSTRAP,
        ci_quantiles=[0.025, 0.975],
        random_state=0,
    )
    by_group = {}
    for group in frame.by_group.index:
        low, high = (frame.by_group_ci[i].loc[group] for i in (0, 1))
        by_group[str(group)] = {
            "cases": list(groups).count(group),
            **{
                metric: {
                    "value": round(float(frame.by_group.loc[group, metric]), 4),
                    "ci95": [round(float(low[metric]), 4), round(float(high[metric]), 4)],
                }
                for metric in frame.by_group.columns
            },
        }
    return {
        "overall": {name: interval(values) for name, values in metrics.items()},
        "by_history": by_group,
        "largest_gap": {m: round(float(v), 4) for m, v in frame.difference().items()},
    }


def recommendation_audit(lists: RecommendationLists) -> dict:
    """Quality by shopper group, and where the exposure goes."""
    pairs = list(zip(lists.top, lists.labels, strict=True))
    quality = quality_by_group(
        {
            "recall_at_20": np.array([recall(t, y) for t, y in pairs]),
            "ndcg_at_20": np.array([binary_ndcg_at_k(t, y, RECOMMEND_K) for t, y in pairs]),
        },
        lists.groups,
    )
    exposure = product_exposure(lists.top, RECOMMEND_K)
    total = sum(exposure.values())
    unseen = sum(
        weight
        for top, before in zip(lists.top, lists.bought_before, strict=True)
        for weight, pid in zip(attention(RECOMMEND_K), top, strict=False)
        if pid not in before
    )
    return {
        "shoppers": len(lists.top),
        **quality,
        "most_bought_1pct_exposure_share": round(
            sum(w for pid, w in exposure.items() if pid in lists.most_bought) / total, 4
        ),
        "new_to_shopper_exposure_share": round(unseen / total, 4),
        "coverage_at_20": round(coverage(lists.top, RECOMMEND_K, lists.catalogue_size), 4),
    }


def personal_search_audit(lists: PersonalSearchLists) -> dict:
    """nDCG@10 of the personalised and the anonymous search by shopper group."""

    def ndcg(tops: list[list[int]]) -> np.ndarray:
        return np.array(
            [binary_ndcg_at_k(t, y, K) for t, y in zip(tops, lists.relevant, strict=True)]
        )

    personalised, anonymous = ndcg(lists.personalised), ndcg(lists.anonymous)
    quality = quality_by_group(
        {
            "personalised_ndcg_at_10": personalised,
            "anonymous_ndcg_at_10": anonymous,
            "personalisation_gain": personalised - anonymous,
        },
        lists.groups,
    )
    return {
        "queries": len(lists.groups),
        "personal_weight": lists.weight,
        **quality,
    }


def plot(audit: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    share_of_groups, share_of_exposure = lorenz(audit["_exposure_by_group"])
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot(share_of_groups, share_of_exposure, label="served search")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="equal exposure")
    axis.set(xlabel=f"share of groups ({audit['group_kind']}), least exposed first")
    axis.set(ylabel="share of exposure", title="Exposure Lorenz curve")
    axis.legend()
    figure.tight_layout()
    written.append(out / "exposure_lorenz.png")
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)
    if "merit_share" in audit["_shares"]:
        exposure, merit = audit["_shares"]["exposure_share"], audit["_shares"]["merit_share"]
        figure, axis = plt.subplots(figsize=(5, 5))
        axis.scatter(merit, exposure, s=8, alpha=0.5)
        top = max(float(merit.max()), float(exposure.max()))
        axis.plot([0, top], [0, top], linestyle="--", color="grey", label="exposure = merit")
        axis.set(xlabel="share of merit (judged gain)", ylabel="share of exposure")
        axis.set(title="Exposure against merit, per group", xscale="symlog", yscale="symlog")
        axis.set_xscale("symlog", linthresh=1e-4)
        axis.set_yscale("symlog", linthresh=1e-4)
        axis.legend()
        figure.tight_layout()
        written.append(out / "exposure_vs_merit.png")
        figure.savefig(written[-1], dpi=110)
        plt.close(figure)
    return written


def plot_tradeoff(curve: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 4))
    axis.plot([p["exposure_gini"] for p in curve], [p["ndcg_at_10"] for p in curve], marker="o")
    for point in curve:
        label = "off" if point["temperature"] is None else f"T={point['temperature']}"
        axis.annotate(label, (point["exposure_gini"], point["ndcg_at_10"]), fontsize=8)
    axis.set(xlabel="Gini of group exposure (expected)", ylabel="nDCG@10")
    axis.set(title="Exposure option: relevance against concentration")
    figure.tight_layout()
    path = out / "exposure_tradeoff.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_shopper_groups(
    audit: dict, metrics: Sequence[str], title: str, out: Path, name: str
) -> Path:
    """Bars of ``metrics`` by history group, with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in HISTORY_GROUPS if n in audit["by_history"]]
    width = 0.8 / len(metrics)
    figure, axis = plt.subplots(figsize=(6, 4))
    for index, metric in enumerate(metrics):
        entries = [audit["by_history"][n][metric] for n in names]
        values = [e["value"] for e in entries]
        errors = np.array(
            [
                [e["value"] - e["ci95"][0] for e in entries],
                [e["ci95"][1] - e["value"] for e in entries],
            ]
        )
        offset = (index - (len(metrics) - 1) / 2) * width
        axis.bar(np.arange(len(names)) + offset, values, width, yerr=errors, label=metric)
    axis.set_xticks(
        np.arange(len(names)), [f"{n} ({audit['by_history'][n]['cases']})" for n in names]
    )
    axis.set(ylabel="mean over cases", title=title)
    axis.legend()
    figure.tight_layout()
    path = out / name
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def markdown(report: dict) -> str:
    search = report["search"]
    lines = [
        "# Audit: who the served search shows",
        "",
        f"Store `{report['repository']}`, {search['queries']:,} queries ({report['queries']}); "
        f"groups: {search['group_kind']}, {search['groups']:,} in the catalogue, "
        f"{search['groups_shown']:,} shown. Attention: 1 / log2(rank + 1) over the top {K}. "
        "Intervals: 95 %, leave-one-query-out jackknife.",
        "",
        "| metric | value | 95 % interval |",
        "|---|---|---|",
    ]
    for name, entry in search["metrics"].items():
        interval = "–".join(f"{v:.4f}" for v in entry["ci95"]) if entry["ci95"] else "(a count)"
        lines.append(f"| {name} | {entry['value']:.4f} | {interval} |")
    columns = [k for k in search["top_groups"][0] if k != "group"] if search["top_groups"] else []
    lines += ["", "Most exposed groups:", "", "| group | " + " | ".join(columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for row in search["top_groups"]:
        lines.append(f"| {row['group']} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    if "exposure_tradeoff" in report:
        lines += _tradeoff_lines(report["exposure_tradeoff"])
    if "recommend" in report:
        lines += _recommendation_lines(report["recommend"])
    if "personalised_search" in report:
        lines += _personal_search_lines(report["personalised_search"])
    return "\n".join(lines) + "\n"


def _tradeoff_lines(curve: list[dict]) -> list[str]:
    off = curve[0]
    lines = [
        "",
        "## The exposure option's trade-off",
        "",
        f"The same queries answered by the ranker's own order and by Plackett-Luce draws ({DRAWS} "
        "seeded draws a query: expected exposure); changes relative to the ranker's order.",
        "",
        "| exposure | temperature | nDCG@10 | change | exposure Gini | change | disparity to merit "
        "| coverage@10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for point in curve:
        ndcg_change = point["ndcg_at_10"] / off["ndcg_at_10"] - 1
        gini_change = point["exposure_gini"] / off["exposure_gini"] - 1
        lines.append(
            f"| {point['exposure']} | {point['temperature'] or '—'} | {point['ndcg_at_10']:.4f} "
            f"| {ndcg_change:+.1%} | {point['exposure_gini']:.4f} | {gini_change:+.1%} "
            f"| {point['disparity_to_merit']:.4f} | {point['coverage_at_10']:.4f} |"
        )
    return lines


def _group_table(audit: dict, metrics: dict[str, str], cases: str) -> list[str]:
    """A table of ``metrics`` (key: column title) by history group, then over all cases."""
    header = " | ".join(f"{title} | 95 % interval" for title in metrics.values())
    lines = [f"| shoppers | {cases} | {header} |", "|---|---" + "|---|---" * len(metrics) + "|"]
    for name in HISTORY_GROUPS:
        if name not in audit["by_history"]:
            continue
        group = audit["by_history"][name]
        cells = [
            f"{group[m]['value']:.4f} | {group[m]['ci95'][0]:.4f}–{group[m]['ci95'][1]:.4f}"
            for m in metrics
        ]
        lines.append(f"| {name} | {group['cases']:,} | " + " | ".join(cells) + " |")
    overall = audit["overall"]
    cells = [
        f"{overall[m]['mean']:.4f} | {overall[m]['ci95'][0]:.4f}–{overall[m]['ci95'][1]:.4f}"
        for m in metrics
    ]
    count = overall[next(iter(metrics))]["n"]
    lines.append(f"| all | {count:,} | " + " | ".join(cells) + " |")
    gaps = ", ".join(f"{title} {audit['largest_gap'][m]:.4f}" for m, title in metrics.items())
    return [*lines, "", f"Largest gap between groups: {gaps}."]


def _groups_sentence() -> str:
    return (
        f"By history length (baskets before the held-out one: new ≤ {NEW_BASKETS}, light ≤ "
        f"{LIGHT_BASKETS}, heavy more). Intervals: 95 %, bootstrap ({FAIRLEARN_BOOTSTRAP} rounds, "
        "Fairlearn's MetricFrame); overall: normal approximation."
    )


def _recommendation_lines(audit: dict) -> list[str]:
    return [
        "",
        "## Recommendations: whom they serve well",
        "",
        f"{audit['shoppers']:,} shoppers, each one's last basket held out; Recall@20 and nDCG@20 "
        f"of the served ranker. {_groups_sentence()}",
        "",
        *_group_table(audit, {"recall_at_20": "Recall@20", "ndcg_at_20": "nDCG@20"}, "count"),
        "",
        "| popularity and novelty | value |",
        "|---|---|",
        f"| exposure share of the most-bought 1 % of products | "
        f"{audit['most_bought_1pct_exposure_share']:.4f} |",
        f"| exposure share of products new to the shopper | "
        f"{audit['new_to_shopper_exposure_share']:.4f} |",
        f"| catalogue coverage of the top 20 | {audit['coverage_at_20']:.4f} |",
    ]


def _personal_search_lines(audit: dict) -> list[str]:
    return [
        "",
        "## Personalised search: whom it serves well",
        "",
        f"{audit['queries']:,} basket queries (one per shopper and category of the held-out "
        "basket: the category's name is the query, the basket's items of that category are "
        "relevant), answered by the served search anonymously and for the shopper (personal "
        f"weight {audit['personal_weight']:g}); nDCG@10 and the gain personalisation brings. "
        f"{_groups_sentence()}",
        "",
        *_group_table(
            audit,
            {
                "personalised_ndcg_at_10": "personalised nDCG@10",
                "anonymous_ndcg_at_10": "anonymous nDCG@10",
                "personalisation_gain": "gain",
            },
            "queries",
        ),
    ]


def audit_summary(repository: Path, version: int, judgments: Judgments) -> dict:
    """The search audit's numbers for a build's manifest: the dev queries through the graph of
    ``version`` (the build calls it on its staged repository)."""
    pipeline = SearchPipeline.from_repository(repository, version)
    catalogue = store.load_catalogue(repository, version)
    rankings = search_rankings(pipeline, catalogue, judgments.queries)
    search = search_audit(rankings, product_groups(repository, version), judgments)
    keep = ("queries", "group_kind", "groups", "groups_shown", "metrics")
    return {"command": "python -m shopserve.export audit", **{k: search[k] for k in keep}}


def audit(
    repository: Path,
    output: Path,
    queries: Sequence[str],
    judgments: Judgments | None,
    scope: str,
    events: Path | None = None,
    tradeoff: bool = False,
) -> Path:
    """Write ``audit.md``, ``audit.json`` and the plots for ``queries`` (and, with ``events``, the
    recommendations; with ``tradeoff``, the exposure option's trade-off curve) into ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    if tradeoff and judgments is None:
        raise DataError("the exposure trade-off needs judged queries (relevance to trade)")
    pipeline = SearchPipeline.from_repository(repository)
    catalogue, groups = store.load_catalogue(repository), product_groups(repository)
    rankings = search_rankings(pipeline, catalogue, queries)
    search = search_audit(rankings, groups, judgments)
    public = {k: v for k, v in search.items() if not k.startswith("_")}
    manifest = json.loads((repository / store.MANIFEST_FILE).read_text())
    report = {
        "repository": str(repository),
        "built_at": manifest.get("built_at"),
        "queries": scope,
        "events": str(events) if events else None,
        "search": public,
    }
    rankings_file = output / RANKINGS_FILE
    rankings_file.write_text(
        json.dumps(
            {
                "queries": rankings.queries,
                "product_ids": [rankings.product_ids[r].tolist() for r in rankings.rows],
            }
        )
        + "\n"
    )
    plots = plot(search, output)
    if tradeoff:
        report["exposure_tradeoff"] = exposure_tradeoff(pipeline, catalogue, judgments, groups)
        plots.append(plot_tradeoff(report["exposure_tradeoff"], output))
    if events is not None:
        shop = HeldOutShop.of(repository, events)
        report["recommend"] = recommendation_audit(recommendation_lists(shop))
        plots.append(
            plot_shopper_groups(
                report["recommend"],
                ("recall_at_20", "ndcg_at_20"),
                "Recommendation quality by shopper history",
                output,
                "quality_by_shopper_group.png",
            )
        )
        searches = personal_search_lists(shop, pipeline)
        if searches is not None:
            report["personalised_search"] = personal_search_audit(searches)
            plots.append(
                plot_shopper_groups(
                    report["personalised_search"],
                    ("personalised_ndcg_at_10", "anonymous_ndcg_at_10"),
                    "Personalised search quality by shopper history",
                    output,
                    "personalised_search_by_shopper_group.png",
                )
            )
    (output / "audit.json").write_text(
        json.dumps({**report, "plots": [p.name for p in plots]}, indent=2) + "\n"
    )
    path = output / "audit.md"
    text = markdown(report)
    path.write_text(text + "".join(f"\n![{p.stem}]({p.name})\n" for p in plots))
    return path
