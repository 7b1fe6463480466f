"""``python -m benchmarks catalogue``: live catalogue updates against a running server.

* **Search while updates stream in**: ``search`` at concurrency 1 (perf_analyzer, the real query
  log) alone and while one new product a STREAM_INTERVAL_S arrives through the ``catalogue``
  endpoint (20 products a second), in turn, ROUNDS times: the p99 ratio (median of the rounds).
* **Update throughput**: CONCURRENCY clients send upserts of BATCH new products each (real Home
  Depot titles with a suffix: new strings, so every title is embedded), back to back for
  DURATION_S: products a second, embedding and the durable log write included.
* **Repricing throughput**: the same, for the build's products with their own titles and a new
  price: nothing to embed (the log keeps their vectors).
* **Visible on the next request**: VISIBILITY_CHECKS updates, each followed at once by a search
  for its title: the share found in the top 10.

Every product added stays in the live catalogue, so the last two run over a catalogue some
thousands of products past its build; the search p50 before any update and after them is reported.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from shopserve.client import ProductChange, SearchClient
from shopserve.ensemble import store

from shopserve.server import ServerConfig, TritonServer, free_ports

from . import machine, perf_analyzer
from .common import WORK_DIR, BenchmarkError, cpu_lock, write_results
from .queries import load_traffic, write_perf_analyzer_data

CONCURRENCY = 4
BATCH = 32
DURATION_S = 20.0
STREAM_INTERVAL_S = 0.05  # 20 products a second
ROUNDS = 3
VISIBILITY_CHECKS = 100
FIRST_NEW_ID = 900_000_000


class _Repricing:
    """Batches of the build's products with their own titles and a new price: no title to embed."""

    def __init__(self, catalogue: store.Catalogue) -> None:
        self.catalogue = catalogue
        self.count = 0
        self.lock = threading.Lock()

    def take(self) -> list[ProductChange]:
        with self.lock:
            start, self.count = self.count, self.count + BATCH
        rows = [i % len(self.catalogue) for i in range(start, start + BATCH)]
        return [
            ProductChange(
                int(self.catalogue.product_ids[r]), self.catalogue.titles[r], 1 + start % 97, True
            )
            for r in rows
        ]


class _Titles:
    """New product ids and titles: the catalogue's titles, each with a unique suffix."""

    def __init__(self, titles: list[str]) -> None:
        self.titles = titles
        self.count = 0
        self.lock = threading.Lock()

    def take(self, n: int) -> list[ProductChange]:
        with self.lock:
            start, self.count = self.count, self.count + n
        return [
            ProductChange(
                FIRST_NEW_ID + i, f"{self.titles[i % len(self.titles)]} model {i:x}", 9.99, True
            )
            for i in range(start, start + n)
        ]


def _stream(url: str, titles: _Titles, stop: threading.Event) -> None:
    with SearchClient(url, timeout=30) as client:
        next_at = time.monotonic()
        while not stop.is_set():
            client.update_catalogue(titles.take(1))
            next_at += STREAM_INTERVAL_S
            time.sleep(max(0.0, next_at - time.monotonic()))


def _throughput(url: str, batches: Callable[[], list[ProductChange]]) -> dict:
    sent = [0] * CONCURRENCY
    deadline = time.monotonic() + DURATION_S

    def client_loop(worker: int) -> None:
        with SearchClient(url, timeout=60) as client:
            while time.monotonic() < deadline:
                sent[worker] += client.update_catalogue(batches()).applied

    started = time.monotonic()
    workers = [threading.Thread(target=client_loop, args=(w,)) for w in range(CONCURRENCY)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - started
    return {"products": sum(sent), "seconds": elapsed, "products_per_s": sum(sent) / elapsed}


def _visibility(url: str, titles: _Titles) -> dict:
    found = 0
    with SearchClient(url, timeout=30) as client:
        for _ in range(VISIBILITY_CHECKS):
            (change,) = titles.take(1)
            client.update_catalogue([change])
            hits = client.search(change.title, top_k=10)
            found += change.product_id in [hit.product_id for hit in hits]
    return {"checks": VISIBILITY_CHECKS, "found_in_top_10": found / VISIBILITY_CHECKS}


def run(repository: Path, out: Path, queries: int = 1000) -> Path:
    manifest = json.loads((repository / store.MANIFEST_FILE).read_text())
    if store.CATALOGUE not in manifest["models"]:
        raise BenchmarkError(f"{repository} has no catalogue endpoint: build it with this version")
    wrapper = perf_analyzer.install()
    search_data = write_perf_analyzer_data(
        load_traffic(manifest, queries).queries, out / "raw" / "catalogue_search.json"
    )
    catalogue = store.load_catalogue(repository)
    titles = _Titles(catalogue.titles)
    work = WORK_DIR / "triton" / "catalogue"
    shutil.rmtree(work / "catalogue", ignore_errors=True)  # the log starts empty
    config = ServerConfig(repository, *free_ports(3), work_dir=work)
    rows: dict[str, dict] = {}

    def measure(name: str) -> dict:
        with cpu_lock(f"catalogue {name}"):
            row = perf_analyzer.measure(
                wrapper, server.grpc_url, store.SEARCH, search_data, 1, out / "raw" / f"{name}.csv"
            )
        rows[name] = asdict(row)
        return rows[name]

    with TritonServer(config, log_file=WORK_DIR / "logs" / "catalogue.log") as server:
        measure("search_c1_before_updates")
        rises = []
        for number in range(ROUNDS):
            quiet = measure(f"search_c1_r{number}")
            stop = threading.Event()
            streamer = threading.Thread(target=_stream, args=(server.grpc_url, titles, stop))
            streamer.start()
            try:
                busy = measure(f"search_c1_with_updates_r{number}")
            finally:
                stop.set()
                streamer.join()
            rises.append(busy["p99_us"] / quiet["p99_us"])
        with cpu_lock("catalogue throughput"):
            throughput = _throughput(server.grpc_url, lambda: titles.take(BATCH))
            repricing = _throughput(server.grpc_url, _Repricing(catalogue).take)
        visibility = _visibility(server.grpc_url, titles)
        after = measure("search_c1_after_updates")
    result = {
        "machine": machine.describe(),
        "rows": rows,
        "search_p99_with_updates_over_quiet": float(np.median(rises)),
        "search_p99_rises": rises,
        "stream_products_per_s": 1 / STREAM_INTERVAL_S,
        "throughput": {"concurrency": CONCURRENCY, "batch": BATCH, **throughput},
        "repricing": repricing,
        "visibility": visibility,
        "products_added": titles.count,
        "search_p50_after_over_before": after["p50_us"]
        / rows["search_c1_before_updates"]["p50_us"],
    }
    return write_results(out, "catalogue", result, markdown(result))


def markdown(result: dict) -> str:
    described = result["machine"]
    throughput = result["throughput"]
    rows = result["rows"]
    rises = ", ".join(f"{r:.2f}" for r in result["search_p99_rises"])
    return "\n".join(
        [
            "# Live catalogue updates",
            "",
            f"Commit {described['git_commit']}, {described['date_utc']}. The real server on one "
            "store, its catalogue log on SQLite; written by `python -m benchmarks catalogue` "
            "(benchmarks/catalogue.py).",
            "",
            "| measure | value | target |",
            "|---|---|---|",
            f"| updates at concurrency {throughput['concurrency']}, {throughput['batch']} new "
            f"products each, embedding included | {throughput['products_per_s']:.0f} products/s "
            f"({throughput['products']} in {throughput['seconds']:.1f} s) | ≥ 200 |",
            f"| updates at concurrency {throughput['concurrency']} repricing the build's products "
            f"({throughput['batch']} each, same titles: nothing to embed) "
            f"| {result['repricing']['products_per_s']:.0f} products/s | – |",
            f"| search p99 at concurrency 1 while {result['stream_products_per_s']:.0f} products/s "
            f"stream in, over quiet (median of {len(result['search_p99_rises'])} rounds: {rises}) "
            f"| {result['search_p99_with_updates_over_quiet']:.2f} | ≤ 1.20 |",
            f"| an update's product found by the next search for its title (top 10) "
            f"| {result['visibility']['found_in_top_10']:.0%} of "
            f"{result['visibility']['checks']} | 100 % |",
            f"| search p50 after {result['products_added']} products were added, over before any "
            f"| {result['search_p50_after_over_before']:.2f} | – |",
            "",
            "| run | p50 ms | p99 ms | requests/s |",
            "|---|---|---|---|",
            *(
                f"| {name} | {row['p50_us'] / 1000:.2f} | {row['p99_us'] / 1000:.2f} | "
                f"{row['throughput']:.1f} |"
                for name, row in rows.items()
            ),
            "",
        ]
    )
