"""Live events, measured against a running server of a store built with ``--events``.

* **The real-time gain**: on a store built without each shopper's last basket (the events file that
  :func:`write_events_before_last` writes: a store serves every event it is built from), for every
  shopper whose last basket has two or more items, send the first half of it (in add-to-cart order)
  through the server as ``add_to_cart`` events, then ask ``recommend`` for the rest: Recall@20 of the
  remaining items with and without those events.
  While it runs, a background load of anonymous searches keeps the server busy, and every shopper's
  next request after the acknowledgement is checked for the events (the carted items must be gone
  from their recommendations): the visibility, and the acknowledgement latency, under load.
* **Ingestion throughput** (perf_analyzer, in :func:`ingestion`): durable ``events`` requests of 1
  and of 32 events at concurrency 8, against ``search`` at concurrency 8 in the same run; and
  ``recommend`` p99 at concurrency 1 alone and while events stream in at 200 a second.
"""

from __future__ import annotations

import csv
import json
import logging
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
from shopserve.client import Event, SearchClient
from shopserve.ensemble import store
from shopserve.export.data import load_catalogue, load_events
from shopserve.export.evaluate_personal import interval
from shopserve.export.history import timelines

from shopserve.formats import parse_timestamp
from shopserve.server import TritonServer

from . import perf_analyzer
from .common import BenchmarkError, cpu_lock

log = logging.getLogger("benchmarks.realtime")

K = 20
BACKGROUND_CLIENTS = 2
STREAM_RATE = 200  # events a second while recommend is measured
INGEST_CONCURRENCY = 8


def held_out_baskets(data: Path) -> dict[str, list[int]]:
    """Every shopper's last basket, in add-to-cart (time) order."""
    catalogue = load_catalogue(data / "items.csv")
    events = load_events(data / "events.csv", catalogue)
    baskets = {}
    for user, line in timelines(events).items():
        positions = line.positions[line.basket_of == line.baskets - 1]
        ordered = positions[np.argsort(events.timestamps[positions], kind="stable")]
        baskets[user] = list(dict.fromkeys(events.product_ids[ordered].tolist()))
    return baskets


def write_events_before_last(data: Path, output: Path) -> Path:
    """``data/events.csv`` without the events at or after each shopper's last basket."""
    catalogue = load_catalogue(data / "items.csv")
    events = load_events(data / "events.csv", catalogue)
    keep = np.zeros(len(events), dtype=bool)
    for line in timelines(events).values():
        keep[line.before(events, line.baskets - 1)] = True
    with (data / "events.csv").open(newline="", encoding="utf-8") as source:
        rows = list(csv.DictReader(source))
    # load_events sorts by (user, time): match rows to positions by the same stable order
    order = sorted(
        range(len(rows)),
        key=lambda i: (rows[i]["user_id"].strip(), parse_timestamp(rows[i]["timestamp"])),
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[i] for position, i in enumerate(order) if keep[position])
    log.info("wrote %s (%d of %d events)", output, int(keep.sum()), len(events))
    return output


def _background_search(url: str, stop: threading.Event, queries: list[str]) -> None:
    with SearchClient(url, timeout=30) as client:
        i = 0
        while not stop.is_set():
            client.search(queries[i % len(queries)], top_k=10)
            i += 1


def gain(server: TritonServer, data: Path, queries: list[str]) -> dict:
    """The real-time gain and the visibility of events under a background search load."""
    stop = threading.Event()
    load = [
        threading.Thread(target=_background_search, args=(server.grpc_url, stop, queries))
        for _ in range(BACKGROUND_CLIENTS)
    ]
    for thread in load:
        thread.start()
    without, with_events, acknowledgement_ms, visible = [], [], [], []
    try:
        with SearchClient(server.grpc_url, timeout=30) as client:
            for user, basket in held_out_baskets(data).items():
                if len(basket) < 2:
                    continue
                sent, rest = basket[: len(basket) // 2], set(basket[len(basket) // 2 :])
                before = [h.product_id for h in client.recommend(user, top_k=K)]
                started = time.perf_counter()
                client.record_many(
                    [Event(user, p, "add_to_cart", event_id=uuid.uuid4().hex) for p in sent]
                )
                acknowledgement_ms.append((time.perf_counter() - started) * 1e3)
                after = [h.product_id for h in client.recommend(user, top_k=K)]
                visible.append(not set(sent) & set(after))
                without.append(len(rest & set(before)) / len(rest))
                with_events.append(len(rest & set(after)) / len(rest))
    finally:
        stop.set()
        for thread in load:
            thread.join()
    result = {
        "users": len(without),
        "recall20_without_live_events": interval(without),
        "recall20_with_live_events": interval(with_events),
        "next_request_saw_the_events": float(np.mean(visible)),
        "acknowledgement_ms": {
            "p50": float(np.percentile(acknowledgement_ms, 50)),
            "p99": float(np.percentile(acknowledgement_ms, 99)),
        },
        "background_search_clients": BACKGROUND_CLIENTS,
    }
    log.info("real-time gain: %s", result)
    return result


def _events_data(path: Path, product_ids: np.ndarray, batch: int, steps: int) -> Path:
    """perf_analyzer input: ``steps`` requests of ``batch`` events, every event id unique."""
    rng = np.random.default_rng(batch)
    now = time.time()
    data = []
    for step in range(steps):
        products = rng.choice(product_ids, batch).tolist()
        users = [f"bench-{rng.integers(100_000)}" for _ in range(batch)]
        data.append(
            {
                "USER_IDS": {"content": users, "shape": [batch]},
                "PRODUCT_IDS": {"content": products, "shape": [batch]},
                "EVENT_TYPES": {"content": ["add_to_cart"] * batch, "shape": [batch]},
                "TIMESTAMPS": {"content": [now] * batch, "shape": [batch]},
                "EVENT_IDS": {
                    "content": [f"b{batch}-{step}-{i}" for i in range(batch)],
                    "shape": [batch],
                },
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": data}))
    return path


def _stream_events(url: str, stop: threading.Event, product_ids: np.ndarray) -> int:
    sent = 0
    with SearchClient(url, timeout=30) as client:
        next_at = time.monotonic()
        while not stop.is_set():
            client.record(
                f"stream-{sent % 500}", int(product_ids[sent % len(product_ids)]), "click"
            )
            sent += 1
            next_at += 1.0 / STREAM_RATE
            time.sleep(max(0.0, next_at - time.monotonic()))
    return sent


def _answered(server: TritonServer, model: str) -> float:
    return server.metric_by_model("nv_inference_request_success").get(model, 0.0)


def _check_sent_once(answered: float, steps: int) -> None:
    """Each step of the events data carries new event ids: a step sent twice is a duplicate, which
    the store skips (cheaper than a new event), and would flatter the measurement."""
    if answered != steps:
        raise BenchmarkError(
            f"the events scenario was answered {answered:.0f} times for {steps} steps of input "
            "data: every step must be sent exactly once"
        )


def ingestion(
    server: TritonServer,
    wrapper: Path,
    out: Path,
    search_data: Path,
    recommend_data: Path,
    settings: perf_analyzer.Settings,
    rounds: int,
    steps: tuple[int, int] = (90_000, 18_000),
) -> dict:
    """Events at concurrency 8 (1 and 32 a request) against search at 8; recommend p99 at 1, alone
    and with events streaming in, in turn ``rounds`` times (the median of the ratios). perf_analyzer
    counts a run sent by request count in whole seconds: ``steps`` make each run last some 40 s
    (at 13 s, one second more or less moved the rate by 8 %)."""
    product_ids = store.load_catalogue(server.config.model_repository).product_ids
    rows = {}

    def measure(name: str, model: str, data: Path, level: int, request_count: int = 0) -> dict:
        with cpu_lock(f"realtime {name}"):
            row = perf_analyzer.measure(
                wrapper,
                server.grpc_url,
                model,
                data,
                level,
                out / "raw" / f"{name}.csv",
                settings,
                attempts=1 if request_count else 2,  # a second attempt would resend the data
                request_count=request_count,
            )
        rows[name] = asdict(row)
        return rows[name]

    search = measure("search_c8", store.SEARCH, search_data, INGEST_CONCURRENCY)
    for batch, count in zip((1, 32), steps, strict=True):
        data = _events_data(out / "raw" / f"events_b{batch}.json", product_ids, batch, count)
        before = _answered(server, store.EVENTS)
        measure(f"events_b{batch}_c8", store.EVENTS, data, INGEST_CONCURRENCY, count)
        _check_sent_once(_answered(server, store.EVENTS) - before, count)
    rises = []
    for number in range(rounds):
        quiet = measure(f"recommend_c1_r{number}", store.RECOMMEND, recommend_data, 1)
        stop = threading.Event()
        streamer = threading.Thread(
            target=_stream_events, args=(server.grpc_url, stop, product_ids), daemon=True
        )
        streamer.start()
        try:
            busy = measure(
                f"recommend_c1_with_events_r{number}", store.RECOMMEND, recommend_data, 1
            )
        finally:
            stop.set()
            streamer.join()
        rises.append(busy["p99_us"] / quiet["p99_us"])
        rows["recommend_c1"], rows["recommend_c1_with_events"] = quiet, busy
    return {
        "rows": rows,
        "events_b1_over_search_requests": rows["events_b1_c8"]["throughput"] / search["throughput"],
        "events_b32_over_search_requests": rows["events_b32_c8"]["throughput"]
        * 32
        / search["throughput"],
        "recommend_p99_with_events_over_quiet": float(np.median(rises)),
        "recommend_p99_rises": rises,
        "stream_rate": STREAM_RATE,
    }
