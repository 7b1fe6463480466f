"""The scale scenario's catalogue generator (benchmarks/grow_catalogue.py), on a tiny data folder."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT
from shopserve.export.data import load_catalogue

from benchmarks.grow_catalogue import INSTACART_ID_OFFSET, SYNTHETIC_ID_OFFSET, grow

HOMEDEPOT = ["Simpson Strong-Tie 12-Gauge Angle", "BEHR Premium 1-gal. Tugboat Wood Coating"]
INSTACART = ["Chocolate Sandwich Cookies", "All-Seasons Salt", "Organic Greek Yogurt 32 oz"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "homedepot").mkdir()
    (tmp_path / "instacart").mkdir()
    with (tmp_path / "homedepot" / "products.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [["product_uid", "product_title"], *[[100001 + i, t] for i, t in enumerate(HOMEDEPOT)]]
        )
    with (tmp_path / "instacart" / "products.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [["product_id", "product_name", "aisle_id", "department_id"]]
            + [[1 + i, t, 1, 1] for i, t in enumerate(INSTACART)]
        )
    return tmp_path


def test_real_titles_come_first_then_labelled_variants(data: Path) -> None:
    rows = list(grow(data, 400))
    assert [r[2] for r in rows[:5]] == ["homedepot"] * 2 + ["instacart"] * 3
    assert [r[1] for r in rows[:5]] == HOMEDEPOT + INSTACART
    assert rows[2][0] == INSTACART_ID_OFFSET + 1
    synthetic = rows[5:]
    assert len(synthetic) == 395 and {r[2] for r in synthetic} == {"synthetic"}
    assert [r[0] for r in synthetic] == list(range(SYNTHETIC_ID_OFFSET, SYNTHETIC_ID_OFFSET + 395))
    assert len({r[0] for r in rows}) == 400
    titles = [r[1] for r in synthetic]
    assert len(set(titles)) > 300  # variants, not copies
    assert not set(titles) & set(HOMEDEPOT + INSTACART)
    # numbers are redrawn with as many digits: "12-Gauge" stays a two-digit gauge
    gauges = [t for t in titles if "Gauge" in t and "Simpson" in t]
    assert gauges and all(re.search(r"\b\d{2}-Gauge", t) for t in gauges)
    assert list(grow(data, 400)) == rows  # deterministic
    assert list(grow(data, 4)) == rows[:4]  # a cut of the real titles when N is smaller


def test_the_command_writes_a_catalogue_the_build_reads(data: Path, tmp_path: Path) -> None:
    output = tmp_path / "grown" / "products.csv"
    command = [sys.executable, "-m", "benchmarks", "grow-catalogue", "--data", str(data)]
    done = subprocess.run(
        [*command, "--products", "50", "--output", str(output)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "2 homedepot, 3 instacart, 45 synthetic" in done.stdout
    catalogue = load_catalogue(output)
    assert len(catalogue) == 50 and catalogue.titles[:2] == HOMEDEPOT
    categories = catalogue.extra["category"]
    assert categories[:5] == ["real/homedepot"] * 2 + ["real/instacart"] * 3
    assert set(categories[5:]) == {"synthetic"}
