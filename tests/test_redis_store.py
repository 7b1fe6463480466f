"""The Redis profile store against a real Redis server: seeding a shared namespace from a build's
snapshot (all or nothing, once, concurrent servers waiting for one seeding, a killed seeder
recovered) and a Redis that runs out of memory (nothing acknowledged lost, nothing refused kept)."""

from __future__ import annotations

import threading
import time

import pytest
from redis.exceptions import OutOfMemoryError
from shopserve.ensemble.profile_store import (
    LiveState,
    SqliteProfileStore,
    StoredEvent,
    seed,
)
from shopserve.ensemble.profiles import Profile
from shopserve.ensemble.redis_link import connect
from shopserve.ensemble.redis_store import RedisProfileStore

from benchmarks.local_redis import running_redis

PURCHASE = 3
SHOPPERS = 40


@pytest.fixture()
def snapshot(tmp_path):
    """A build's profile snapshot: SHOPPERS shoppers with a few purchases each."""
    path = tmp_path / "profiles.sqlite"
    store = SqliteProfileStore(path)
    profiles = []
    for shopper in range(SHOPPERS):
        profile = Profile()
        for basket in range(3):
            profile.apply(shopper + basket, PURCHASE, 10.0 * basket, f"b{basket}")
        profiles.append((f"key-{shopper}", profile))
    store.put(profiles)
    store.close()
    return path


@pytest.fixture(scope="module")
def redis(module_folder):
    """One Redis server for the module; each test uses its own namespace."""
    with running_redis(module_folder("redis")) as url:
        yield url


def _namespace(url: str, name: str) -> RedisProfileStore:
    """A namespace with an event log of its own (the tests share one Redis)."""
    return RedisProfileStore(url, name, log_name=f"log-{name}")


def _seed(url: str, snapshot, name: str) -> str:
    return seed(url, snapshot, name, range(1000), log_name=f"log-{name}")


def _snapshot_state(snapshot):
    return lambda: LiveState.of_snapshot(snapshot)


def test_servers_starting_at_once_seed_one_namespace_once(redis, snapshot) -> None:
    said: list[str] = []
    starters = [
        threading.Thread(target=lambda: said.append(_seed(redis, snapshot, "together")))
        for _ in range(4)
    ]
    for starter in starters:
        starter.start()
    for starter in starters:
        starter.join()
    assert sum(s.startswith(f"seeded {SHOPPERS} profiles") for s in said) == 1, said
    assert sum("already holds namespace together" in s for s in said) == 3, said
    live = _namespace(redis, "together")
    reference = SqliteProfileStore(snapshot, readonly=True)
    assert live.users() == SHOPPERS
    for key, profile in reference.profiles():
        assert live.get(key).items == profile.items
    assert connect(redis).exists("shopserve:together:seeding") == 0  # lock released


def test_a_seeded_namespace_keeps_its_live_writes(redis, snapshot) -> None:
    assert _seed(redis, snapshot, "kept").startswith(f"seeded {SHOPPERS}")
    live = _namespace(redis, "kept")
    changed = Profile()
    changed.apply(999, PURCHASE, 50.0, "live")
    live.put([("key-0", changed)])
    assert "already holds" in _seed(redis, snapshot, "kept")  # a restart seeds nothing
    assert set(live.get("key-0").items) == {999}


def test_a_seeder_killed_mid_seeding_leaves_nothing_and_the_next_start_seeds(
    redis, snapshot
) -> None:
    # A server killed after it took the lock and sent part of its transaction: Redis discards a
    # MULTI without EXEC when the connection closes, and the lock expires.
    dead = connect(redis).connection_pool.make_connection()
    dead.send_command("SET", "shopserve:crashed:seeding", "dead-server", "PX", 1500)
    dead.send_command("MULTI")
    dead.send_command("HSET", "shopserve:crashed:u:key-0", "baskets", 1)
    assert [dead.read_response() for _ in range(3)] == [b"OK", b"OK", b"QUEUED"]
    dead.disconnect()
    live = _namespace(redis, "crashed")
    assert live.users() == 0
    started = time.monotonic()
    count = live.seed_once(_snapshot_state(snapshot), "crashed")
    assert count == SHOPPERS and live.users() == SHOPPERS
    assert time.monotonic() - started >= 1.0  # it waited for the dead seeder's lock to expire


def test_a_seeding_that_outlived_its_lock_writes_nothing(redis, snapshot) -> None:
    """The transaction WATCHes the lock: another server that took the expired lock and seeded
    wins, and the late one's writes are dropped whole."""
    slow = _namespace(redis, "late")
    other = _namespace(redis, "late")

    def late_profiles():
        time.sleep(0.6)  # past the lock: the other server seeds meanwhile
        assert other.seed_once(_snapshot_state(snapshot), "other", lock_s=5) == SHOPPERS
        extra = Profile()
        extra.apply(1, PURCHASE, 1.0, "x")
        return LiveState.of([("late-only", extra)])

    assert slow.seed_once(late_profiles, "slow", lock_s=0.3) is None
    assert slow.users() == SHOPPERS and slow.get("late-only") is None
    assert connect(redis).get("shopserve:late:seeded") == b"other"


def test_a_server_waits_for_another_servers_seeding(redis, snapshot) -> None:
    holder = connect(redis)
    holder.set("shopserve:busy:seeding", "another-server", px=60_000)
    waiting = _namespace(redis, "busy")
    with pytest.raises(TimeoutError, match="being seeded by another server"):
        waiting.seed_once(_snapshot_state(snapshot), "busy", wait_s=0.5)
    holder.set("shopserve:busy:seeded", "another-server")
    assert waiting.seed_once(_snapshot_state(snapshot), "busy") is None


def test_a_full_redis_refuses_batches_whole_and_keeps_what_it_acknowledged(redis) -> None:
    """maxmemory reached with noeviction: a batch is refused with Redis's OOM error and none of it
    is applied; every batch acknowledged before is there, once."""
    admin = connect(redis)
    live = _namespace(redis, "full")
    used = admin.info("memory")["used_memory"]
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", used + 400_000)
    acknowledged: list[StoredEvent] = []
    try:
        with pytest.raises(OutOfMemoryError):  # Redis said OOM
            for batch in range(10_000):
                events = [
                    StoredEvent(f"shopper-{batch}", f"event-{batch}-{i}", i, PURCHASE, 1.0 * i, "b")
                    for i in range(20)
                ]
                live.apply(events)
                acknowledged += events
        refused = batch
    finally:
        admin.config_set("maxmemory", 0)
    assert acknowledged, "Redis was full before the first batch"
    assert live.get(f"shopper-{refused}") is None  # nothing of the refused batch
    assert live.users() == refused
    for shopper in {e.user_key for e in acknowledged}:
        assert set(live.get(shopper).items) == set(range(20))
    again = live.apply(acknowledged[:20])  # a client's retry counts once
    assert again == set()


def test_an_event_logged_while_a_shopper_is_forgotten_goes_with_them(redis, monkeypatch) -> None:
    """Another server logs an event of the shopper between ``forget``'s scan of the log and its
    transaction: the erasure leaves no event of theirs in the log."""
    here, there = _namespace(redis, "race"), _namespace(redis, "race")
    here.apply([StoredEvent("key-1", "before", 1, PURCHASE, 1.0)])
    scans = []

    def scan_then_another_server_writes(after: str = ""):
        records = list(RedisProfileStore.log(here, after))
        if not scans:
            there.apply([StoredEvent("key-1", "meanwhile", 2, PURCHASE, 2.0)])
        scans.append(after)
        yield from records

    monkeypatch.setattr(here, "log", scan_then_another_server_writes)
    assert here.forget("key-1")
    assert [r.event.event_key for r in there.log() if r.event.user_key == "key-1"] == [""]
    assert there.get("key-1") is None


def test_replicas_of_the_version_before_share_a_namespace_during_an_upgrade(redis) -> None:
    """Earlier versions kept a taste vector in the profile (taste_sum, taste_weight). A profile
    they wrote reads here; one written here tells them it has none (weight 0, no sum), instead of
    failing their read of a missing field or adding their next purchase to a stale sum."""
    store = _namespace(redis, "upgrade")
    user, _, _ = store._keys("key-old")
    fields = {
        "baskets": 1,
        "basket_key": "b1",
        "last_purchase_ts": 5.0,
        "last_ts": 5.0,
        "open_basket": "[]",
        "taste_sum": b"\x00" * 16,
        "taste_weight": 1.0,
    }
    connect(redis).hset(user, mapping=fields)
    assert store.get("key-old").baskets == 1
    store.apply([StoredEvent("key-old", "new", 2, PURCHASE, 9.0, "b2")])
    assert store.get("key-old").baskets == 2
    assert float(connect(redis).hget(user, "taste_weight")) == 0
    assert connect(redis).hget(user, "taste_sum") is None


def test_a_redis_that_lost_its_scripts_still_folds_events(redis) -> None:
    """A restarted (or failed-over) Redis has no scripts: the store loads its read script again."""
    live = _namespace(redis, "scripts")
    live.apply([StoredEvent("key-1", "first", 1, PURCHASE, 1.0, "b")])
    connect(redis).script_flush()
    assert live.apply([StoredEvent("key-1", "second", 2, PURCHASE, 2.0, "b")]) == {"second"}
    assert set(live.get("key-1").items) == {1, 2}
