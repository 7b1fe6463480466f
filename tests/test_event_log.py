"""The event log on both backends (a SQLite file, a real Redis): every accepted event is logged
once, a live store made for another build is that build's snapshot with the log replayed over it,
and a forgotten shopper stays forgotten whichever build a server starts on."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from shopserve.ensemble.profile_store import (
    ERASED,
    LiveState,
    SqliteProfileStore,
    StoredEvent,
    open_store,
    replay,
    seed,
)
from shopserve.ensemble.profiles import Profile

from benchmarks.local_redis import running_redis
from shopserve.server import free_ports

PURCHASE, VIEW = 3, 0
SHOPPERS = 12
KNOWN = range(100)


def _snapshot(path, first_product: int):
    """A build's snapshot: SHOPPERS shoppers, each with a basket starting at ``first_product``
    (two builds differ by it)."""
    store = SqliteProfileStore(path)
    profiles = []
    for shopper in range(SHOPPERS):
        profile = Profile()
        profile.apply(first_product + shopper, PURCHASE, 10.0, "b0")
        profiles.append((f"key-{shopper}", profile))
    store.put(profiles)
    store.close()
    return path


@pytest.fixture()
def builds(tmp_path):
    return {"v1": _snapshot(tmp_path / "v1.sqlite", 0), "v2": _snapshot(tmp_path / "v2.sqlite", 40)}


@pytest.fixture(scope="module")
def redis_server(module_folder):
    with running_redis(module_folder("redis-log")) as url:
        yield url


@pytest.fixture(params=["sqlite", "redis"])
def location(request, tmp_path):
    """Where a server keeps its live store, and a name for this test's log and namespaces (the
    tests share one Redis)."""
    if request.param == "sqlite":
        return str(tmp_path / "profiles" / "live.sqlite"), ""
    return request.getfixturevalue("redis_server"), "-" + request.node.originalname


def _start(location, builds, build: str) -> None:
    """What ``shopserve serve`` does for the live store when it starts on ``build``."""
    url, test = location
    seed(url, builds[build], f"{build}{test}", KNOWN, f"log{test}")


def _open(location, build: str):
    url, test = location
    return open_store(url, namespace=f"{build}{test}", log_name=f"log{test}")


def _event(shopper: int, product: int, key: str, at: float, kind: int = PURCHASE) -> StoredEvent:
    return StoredEvent(f"key-{shopper}", key, product, kind, at, f"live-{at}")


LIVE = [_event(1, 90, "a", 100.0), _event(1, 91, "b", 100.0), _event(2, 92, "c", 101.0)]


def _expected(snapshot, events) -> dict:
    """The reference: the snapshot's profiles with ``events`` folded in, in memory."""
    state = LiveState.of_snapshot(snapshot)
    return replay(state, [_record(e) for e in events], KNOWN).profiles


def _record(event):
    from shopserve.ensemble.profile_store import LogRecord

    return LogRecord("", 0.0, event)


def _same_profiles(store, expected: dict) -> None:
    assert store.users() == len(expected)
    for key, profile in expected.items():
        stored = store.get(key)
        assert stored is not None, key
        assert stored.items == profile.items, key
        assert stored.baskets == profile.baskets
        assert stored.open_basket == profile.open_basket


def test_every_accepted_event_is_logged_once_in_fold_order(location, builds) -> None:
    _start(location, builds, "v1")
    live = _open(location, "v1")
    later, earlier = _event(3, 5, "late", 200.0), _event(3, 6, "early", 150.0)
    assert live.apply([later, earlier, later]) == {"late", "early"}
    assert live.apply([later, _event(3, 7, "new", 210.0)]) == {"new"}  # a retry
    logged = [r.event for r in live.log()]
    assert [e.event_key for e in logged] == ["early", "late", "new"]
    assert logged[0] == earlier
    positions = [r.position for r in live.log()]
    assert [r.event.event_key for r in live.log(positions[0])] == ["late", "new"]


def test_batches_of_many_shoppers_fold_as_the_reference(location, builds) -> None:
    """Batches mixing known and new shoppers, products they hold and new ones, event kinds, keys
    repeated inside a batch and batches sent again: each shopper's profile is the in-memory
    reference's, and each call reports exactly its new keys (Redis reads every shopper of a batch
    in one round trip: no reply may reach another shopper)."""
    _start(location, builds, "v1")
    live = _open(location, "v1")
    rng = np.random.default_rng(5)
    sent, batches = {}, []
    for number in range(30):
        batch = []
        for i in range(int(rng.integers(1, 40))):
            key = (
                f"e{number}-{i}" if rng.random() > 0.1 or not sent else str(rng.choice(list(sent)))
            )
            event = sent.get(key) or StoredEvent(
                f"key-{rng.integers(SHOPPERS + 6)}",
                key,
                int(rng.integers(20)),
                int(rng.choice([PURCHASE, VIEW, 2])),
                100.0 + number + i / 100,
                f"live-{number}",
            )
            batch.append(event)
        batches.append(batch)
        assert live.apply(batch) == {e.event_key for e in batch} - set(sent)
        sent.update({e.event_key: e for e in batch})
    assert live.apply(batches[3]) == set()  # a whole batch again
    _same_profiles(live, _expected(builds["v1"], list(sent.values())))


def test_a_release_rollback_and_restart_keep_every_logged_event(
    location, builds, monkeypatch
) -> None:
    from shopserve.ensemble.redis_store import RedisProfileStore

    monkeypatch.setattr(RedisProfileStore, "CATCH_UP_BATCH", 1)  # a catch-up of several batches
    _start(location, builds, "v1")
    _open(location, "v1").apply(LIVE[:2])
    _same_profiles(_open(location, "v1"), _expected(builds["v1"], LIVE[:2]))
    _start(location, builds, "v2")  # a restart on the newer build
    _same_profiles(_open(location, "v2"), _expected(builds["v2"], LIVE[:2]))
    _open(location, "v2").apply(LIVE[2:])
    _start(location, builds, "v1")  # back to the older build: it catches up with the log
    _same_profiles(_open(location, "v1"), _expected(builds["v1"], LIVE))
    _start(location, builds, "v1")  # a plain restart changes nothing
    _same_profiles(_open(location, "v1"), _expected(builds["v1"], LIVE))
    _start(location, builds, "v2")
    _same_profiles(_open(location, "v2"), _expected(builds["v2"], LIVE))
    assert len(list(_open(location, "v2").log())) == len(LIVE)  # replays log nothing


def test_a_forgotten_shopper_stays_forgotten_on_every_build(location, builds) -> None:
    _start(location, builds, "v1")
    live = _open(location, "v1")
    live.apply(LIVE)
    assert live.forget("key-1")
    logged = [r.event for r in live.log()]
    assert [e.kind for e in logged if e.user_key == "key-1"] == [ERASED]  # no event kept
    assert logged[-1].event_key == "" and logged[-1].product_id == 0
    comeback = _event(1, 93, "d", 300.0)
    live.apply([comeback])
    for build in ("v2", "v1", "v2"):
        _start(location, builds, build)
        store = _open(location, build)
        assert set(store.get("key-1").items) == {93}, build  # the snapshot's history is gone
        assert set(store.get("key-2").items) >= {92}
    assert not _open(location, "v2").forget("key-never-seen")


def _folded_build(path, forgotten: str, erased_at: float, comeback: StoredEvent):
    """A build that folded an export of the log: the shopper forgotten at ``erased_at`` holds only
    the event they sent afterwards, whose key the snapshot records with the erasure."""
    store = SqliteProfileStore(path)
    profile = Profile()
    profile.apply(comeback.product_id, PURCHASE, comeback.timestamp, "b")
    store.put([(forgotten, profile)])
    store.record_folded_log({forgotten: {comeback.event_key}}, {forgotten: erased_at})
    store.close()
    return path


def test_a_build_that_folded_an_erasure_keeps_what_the_shopper_sent_after_it(
    location, builds, tmp_path
) -> None:
    """Forget a shopper, who then buys again; a build folds the export. Starting on that build
    must not apply the erasure again (it would drop the comeback, which the log holds no later
    than the snapshot's watermark); a later forget still holds on every restart."""
    _start(location, builds, "v1")
    live = _open(location, "v1")
    live.apply(LIVE)
    live.forget("key-1")
    erased_at = next(r.event.timestamp for r in live.log() if r.event.kind == ERASED)
    comeback = _event(1, 93, "after-forget", erased_at - 5.0)  # the client's clock runs behind
    live.apply([comeback])
    builds["v3"] = _folded_build(tmp_path / "v3.sqlite", "key-1", erased_at, comeback)
    for _ in range(2):  # the start that seeds, and a restart
        _start(location, builds, "v3")
        assert set(_open(location, "v3").get("key-1").items) == {93}
    assert _open(location, "v3").forget("key-1")
    for build in ("v3", "v3", "v1"):
        _start(location, builds, build)
        assert _open(location, build).get("key-1") is None, build


def test_each_shopper_has_their_own_watermark(location, builds, tmp_path) -> None:
    """A shopper whose clock ran a day ahead when the build read their event does not hide
    another shopper's later events from the replay over that build."""
    _start(location, builds, "v1")
    _open(location, "v1").apply([_event(3, 95, "w", 500.0)])
    ahead = SqliteProfileStore(tmp_path / "ahead.sqlite")
    skewed = Profile()
    skewed.apply(7, PURCHASE, 500.0 + 86_400, "b")
    ahead.put([("key-9", skewed)])
    ahead.close()
    builds["ahead"] = tmp_path / "ahead.sqlite"
    _start(location, builds, "ahead")
    assert set(_open(location, "ahead").get("key-3").items) == {95}


def test_a_catch_up_folds_in_log_order(location, builds) -> None:
    """Two batches of one shopper, the later one with an earlier timestamp and no basket ids:
    a namespace that catches up with them holds what live ingestion made of them."""
    late_first = StoredEvent("key-4", "late", 60, PURCHASE, 5_000.0)
    early_second = StoredEvent("key-4", "early", 61, PURCHASE, 1_000.0)
    _start(location, builds, "v2")
    _start(location, builds, "v1")
    for event in (late_first, early_second):
        _open(location, "v1").apply([event])
    _start(location, builds, "v2")  # a Redis namespace seeded before: it catches up
    expected = _expected(builds["v2"], [late_first, early_second])
    stored = _open(location, "v2").get("key-4")
    assert stored.items == expected["key-4"].items and stored.baskets == expected["key-4"].baskets


def test_the_log_exports_as_an_events_file_with_hashed_ids(location, builds, tmp_path) -> None:
    import csv

    from shopserve.ensemble.profile_store import export_log

    _start(location, builds, "v1")
    live = _open(location, "v1")
    live.apply(LIVE)
    live.forget("key-2")
    events, erasures = export_log(live, tmp_path / "log.csv")
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert (events, erasures) == (2, 1)
    assert [(r["user_key"], r["product_id"], r["event"]) for r in rows] == [
        ("key-1", "90", "purchase"),
        ("key-1", "91", "purchase"),
        ("key-2", "", "forget"),
    ]
    later = float(rows[-1]["logged_at"]) + 1  # erasures are exported whatever their age
    assert export_log(live, tmp_path / "later.csv", since=later) == (0, 1)


def test_events_export_cli(tmp_path, builds, monkeypatch, capsys) -> None:
    from shopserve.cli import main

    monkeypatch.setenv("SHOPSERVE_USER_KEY", "a-test-secret-of-enough-bytes")
    location = str(tmp_path / "live.sqlite")
    seed(location, builds["v1"], "v1", KNOWN)
    open_store(location).apply(LIVE)
    assert main(["events", "export", "--profile-store", location, str(tmp_path / "out.csv")]) == 0
    assert "wrote 3 events and 0 erasures" in capsys.readouterr().out
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 4
    assert main(["events", "export", "--profile-store", str(tmp_path / "no.sqlite"), "x"]) == 1
    capsys.readouterr()
    port = free_ports(1)[0]  # no Redis there: a message that names it (no password), no traceback
    away = f"redis://:never-shown-pw@127.0.0.1:{port}/0"
    assert main(["events", "export", "--profile-store", away, str(tmp_path / "x.csv")]) == 1
    error = capsys.readouterr().err
    assert f"127.0.0.1:{port}/0 could not be opened (ConnectionError)" in error
    assert "never-shown-pw" not in error


def test_logged_events_a_build_already_holds_are_not_replayed_twice(location, builds) -> None:
    """An event no later than a snapshot's latest event is in that build's own event files (a
    back-fill of history): a new build's replay skips it, later events are replayed."""
    _start(location, builds, "v1")
    backfill, fresh = _event(4, 94, "old", 5.0), _event(4, 95, "new", 500.0)
    _open(location, "v1").apply([backfill, fresh])
    _start(location, builds, "v2")
    assert set(_open(location, "v2").get("key-4").items) == {44, 95}


def test_compaction_drops_old_events_and_keeps_erasures(location, builds, monkeypatch) -> None:
    import time

    _start(location, builds, "v1")
    live = _open(location, "v1")
    live.apply(LIVE[:2])
    live.forget("key-5")
    cut = time.time() + 0.01
    time.sleep(0.02)
    live.apply(LIVE[2:])
    assert live.compact(cut) == 2
    assert [(r.event.user_key, r.event.kind) for r in live.log()] == [
        ("key-5", ERASED),
        ("key-2", PURCHASE),
    ]
    assert live.compact(cut) == 0


def test_events_compact_cli(tmp_path, builds, monkeypatch, capsys) -> None:
    from shopserve.cli import main

    monkeypatch.setenv("SHOPSERVE_USER_KEY", "a-test-secret-of-enough-bytes")
    location = str(tmp_path / "live.sqlite")
    seed(location, builds["v1"], "v1", KNOWN)
    open_store(location).apply(LIVE)
    assert main(["events", "compact", "--profile-store", location, "--before", "1e12"]) == 0
    assert "deleted 3 logged events" in capsys.readouterr().out
    assert list(open_store(location).log()) == []


def test_a_live_file_from_before_the_log_is_served_as_it_is(builds, tmp_path) -> None:
    """An upgrade: a live SQLite file seeded by an older server (profiles, no log) keeps its live
    events; the next build change rebuilds it."""
    import shutil

    old = tmp_path / "old-live.sqlite"
    shutil.copyfile(builds["v1"], old)
    SqliteProfileStore(old).apply(LIVE, log=False)  # no log then
    location = (str(old), "")
    _start(location, builds, "v1")
    _same_profiles(_open(location, "v1"), _expected(builds["v1"], LIVE))
    _start(location, builds, "v2")
    _same_profiles(_open(location, "v2"), _expected(builds["v2"], []))


def test_an_event_in_the_shop_files_and_the_log_counts_once(tmp_path) -> None:
    """The shop's events file names its events (``event_id``); a logged event with the same id of
    the same shopper (it reached the server live and the shop's files) is folded once."""
    from shopserve.ensemble.events import event_key
    from shopserve.export.data import (
        CatalogueData,
        load_event_log,
        load_events,
        with_event_log,
    )

    catalogue = CatalogueData(np.arange(10, dtype=np.int64), [f"p{i}" for i in range(10)])
    shop = tmp_path / "events.csv"
    shop.write_text(
        "user_id,product_id,timestamp,event,event_id\n"
        "alice,1,100,purchase,order-1-line-1\n"
        "alice,2,100,purchase,\n"
        "bob,3,100,purchase,order-2-line-1\n"
    )
    key = {"alice": "key-a", "bob": "key-b"}.get
    log = tmp_path / "log.csv"
    log.write_text(
        "user_key,product_id,timestamp,event,event_key,logged_at\n"
        f"key-a,1,100,purchase,{event_key('key-a', 'order-1-line-1')},101\n"  # in the shop file
        f"key-a,4,200,purchase,{event_key('key-a', 'live-only')},201\n"
        f"key-b,5,200,purchase,{event_key('key-b', 'order-1-line-1')},201\n"  # another's id
    )
    merged = with_event_log(load_events(shop, catalogue), key, load_event_log(log, catalogue))
    pairs = sorted(zip(merged.user_ids, merged.product_ids.tolist(), strict=True))
    assert pairs == [("key-a", 1), ("key-a", 2), ("key-a", 4), ("key-b", 3), ("key-b", 5)]


def test_a_group_larger_than_sqlites_limit_on_bound_values_is_taken_whole(tmp_path) -> None:
    """SQLite's build sets how many values one statement binds (32,766 by default, 250,000 in
    Debian's); a group of event batches may carry more, and is then looked up in several
    statements, in the same transaction."""
    live = SqliteProfileStore(tmp_path / "live.sqlite")
    live._db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 50)  # a small build of SQLite
    first = [_event(shopper, 10 + shopper % 7, f"k{shopper}", 100.0) for shopper in range(120)]
    assert live.apply(first) == {e.event_key for e in first}
    again = [*first[::2], *[_event(s, 3, f"n{s}", 200.0) for s in range(60, 180)]]
    assert live.apply(again) == {f"n{s}" for s in range(60, 180)}  # retries skipped
    _same_profiles(live, _expected_from_nothing(first + again[60:]))


def _expected_from_nothing(events: list[StoredEvent]) -> dict:
    return replay(LiveState.of({}), [_record(e) for e in events], KNOWN).profiles


def test_a_build_keeps_what_an_erased_shopper_sent_after_the_erasure_in_log_order(tmp_path):
    """The export is in log order: an erased shopper's events after their erasure count, even
    when the client's clock put them earlier; the shop file's events up to the erasure go."""
    from shopserve.export.data import CatalogueData, load_event_log, load_events, with_event_log

    catalogue = CatalogueData(np.arange(10, dtype=np.int64), [f"p{i}" for i in range(10)])
    shop = tmp_path / "events.csv"
    shop.write_text("user_id,product_id,timestamp,event\nalice,1,100,purchase\nalice,2,900,view\n")
    log = tmp_path / "log.csv"
    log.write_text(
        "user_key,product_id,timestamp,event,event_key,logged_at\n"
        "key-a,3,150,purchase,before,151\n"  # logged before the erasure (an older export's row)
        "key-a,,500,forget,,500\n"
        "key-a,4,450,purchase,after,502\n"  # the client's clock runs behind the server's
    )
    event_log = load_event_log(log, catalogue)
    assert event_log.erased == {"key-a": 500.0}
    assert event_log.event_keys() == {"key-a": {"after"}}
    merged = with_event_log(load_events(shop, catalogue), {"alice": "key-a"}.get, event_log)
    assert sorted(merged.product_ids.tolist()) == [2, 4]  # the shop's view came after the erasure
