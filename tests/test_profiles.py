"""Behaviour data: the events format, profiles folded from events, the profile store, keyed user ids
and the recommendation features. Fast: small hand-made logs."""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3

import numpy as np
import pytest
from shopserve.ensemble import store
from shopserve.ensemble.events import EventIngest, EventRequest
from shopserve.ensemble.personal import check_user_key
from shopserve.ensemble.profile_store import SqliteProfileStore, StoredEvent, open_store
from shopserve.ensemble.profiles import (
    ADD_TO_CART,
    CLICK,
    PURCHASE,
    VIEW,
    MissingUserKeyError,
    Profile,
    UserKeys,
    WrongUserKeyError,
)
from shopserve.ensemble.recommend import taste
from shopserve.export.data import CatalogueData, DataError, load_events
from shopserve.export.history import split_users, timelines

from shopserve.formats import parse_timestamp

CATALOGUE = CatalogueData(np.array([1, 2, 3, 4], dtype=np.int64), ["a", "b", "c", "d"])


def write(path, rows: list[str]) -> None:
    path.write_text("user_id,product_id,timestamp,event,basket_id\n" + "\n".join(rows) + "\n")


def test_timestamps_are_iso_8601_or_epoch_seconds() -> None:
    assert parse_timestamp("1970-01-01T00:01:00Z") == 60.0
    assert parse_timestamp("1970-01-01T01:00:00+01:00") == 0.0
    assert parse_timestamp("1970-01-01 00:00:30") == 30.0  # no zone: UTC
    assert parse_timestamp("1500000000") == 1_500_000_000.0
    # BigQuery's text form (REES46's logs, Google Analytics exports): a zone name at the end
    assert parse_timestamp("1970-01-01 00:01:00 UTC") == 60.0
    assert parse_timestamp("1970-01-01 00:01:00.5 gmt") == 60.5


def test_other_systems_event_names_read_as_ours(tmp_path) -> None:
    """RetailRocket's, REES46's and Google Analytics 4's names, and ours in any case."""
    path = tmp_path / "events.csv"
    names = [
        "addtocart",
        "transaction",
        "cart",
        "view_item",
        "select_item",
        "PURCHASE",
        "Add-To-Cart",
    ]
    write(path, [f"u1,1,{10 + i},{name}," for i, name in enumerate(names)])
    events = load_events(path, CATALOGUE)
    kinds = [ADD_TO_CART, PURCHASE, ADD_TO_CART, VIEW, CLICK, PURCHASE, ADD_TO_CART]
    assert events.events.tolist() == kinds
    write(path, ["u1,1,10,remove_from_cart,"])
    with pytest.raises(DataError, match="drop other events' rows first"):
        load_events(path, CATALOGUE)


def test_events_are_sorted_by_user_and_time(tmp_path) -> None:
    path = tmp_path / "events.csv"
    write(path, ["u2,3,50,view,", "u1,2,20,purchase,b1", "u1,1,10,purchase,b1"])
    events = load_events(path, CATALOGUE)
    assert events.user_ids == ["u1", "u1", "u2"]
    assert events.product_ids.tolist() == [1, 2, 3]
    assert events.basket_ids == ["b1", "b1", ""]
    assert {u: list(r) for u, r in events.by_user().items()} == {"u1": [0, 1], "u2": [2]}


def test_bad_events_name_their_first_rows_and_count(tmp_path) -> None:
    path = tmp_path / "events.csv"
    rows = ["u1,1,10,purchase,"] + [f"u1,{900 + i},10,purchase," for i in range(7)]
    rows += ["u2,1,yesterday,view,", "u3,1,10,like,", ",1,10,view,"]
    rows += ["u4,1,nan,view,", "u4,1,-5,view,", "u4,1,1700000000000,view,"]
    write(path, rows)
    with pytest.raises(DataError) as error:
        load_events(path, CATALOGUE)
    message = str(error.value)
    assert "7 rows with unknown product ids (first: row 3: '900', row 4: '901'" in message
    assert "row 8: '905'" not in message  # only the first five are named
    assert "1 rows with unparseable timestamps (first: row 10: 'yesterday')" in message
    assert "1 rows with unknown event types" in message and "row 11: 'like'" in message
    assert "1 rows with an empty user_id (first: row 12" in message
    # what the server would refuse as an event's time: not a number of seconds since the epoch
    assert (
        "3 rows with timestamps before the epoch or over a day ahead (seconds, not milliseconds) "
        "(first: row 13: 'nan', row 14: '-5', row 15: '1700000000000')"
    ) in message


def test_a_profile_folds_baskets_and_carts() -> None:
    profile = Profile()
    profile.apply(1, PURCHASE, 0.0, "b1")
    profile.apply(2, PURCHASE, 1.0, "b1")
    profile.apply(1, PURCHASE, 100.0, "b2")
    profile.apply(3, ADD_TO_CART, 101.0, "")
    profile.apply(4, CLICK, 102.0, "")
    assert profile.baskets == 2
    assert profile.items[1].purchases == 2 and profile.items[1].baskets == 2
    assert (profile.items[1].first_basket, profile.items[1].last_basket) == (0, 1)
    assert profile.items[2].last_basket == 0 and profile.items[4].clicks == 1
    assert profile.open_basket == [3]
    profile.apply(3, PURCHASE, 200.0, "b3")  # bought: leaves the cart
    assert profile.open_basket == [] and profile.baskets == 3


def test_the_taste_vector_weighs_each_product_by_its_purchases() -> None:
    vectors = np.array([[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 5], [9, 9, 9, 9]], dtype=np.float32)
    purchases = np.array([2, 1, 0, 3])  # row 2 was only put in the cart
    expected = np.array([2 + 27, 2 + 27, 27, 27], dtype=np.float32)
    got = taste(np.arange(4), purchases, lambda rows: vectors[rows])
    np.testing.assert_allclose(got, expected / np.linalg.norm(expected), rtol=1e-6)
    assert taste(np.arange(4), np.zeros(4), lambda rows: vectors[rows]) is None


def test_baskets_without_ids_are_sessions() -> None:
    profile = Profile()
    for when in (0, 60, 600, 5000, 5060):  # a gap over 30 minutes opens a basket
        profile.apply(1, PURCHASE, float(when), "")
    assert profile.baskets == 2 and profile.items[1].baskets == 2


def test_timelines_number_baskets_like_profiles(tmp_path) -> None:
    path = tmp_path / "events.csv"
    write(path, ["u1,1,0,purchase,a", "u1,2,5,view,", "u1,2,10,purchase,b", "u1,3,11,purchase,b"])
    events = load_events(path, CATALOGUE)
    line = timelines(events)["u1"]
    assert line.baskets == 2 and line.basket_of.tolist() == [0, -1, 1, 1]
    assert line.items(events, 1) == {2, 3}
    assert line.before(events, 1).tolist() == [0, 1]  # the view came before basket 1 began


def test_the_validation_split_follows_histories_not_ids(tmp_path) -> None:
    """Renaming every shopper (a log under another secret's hashes) and reordering a basket's
    events of one timestamp draw the same shoppers for validation."""
    histories = [[f"{1 + p % 4},{t},purchase,b{t}" for p in range(t % 3 + 1)] for t in range(40)]
    plain, renamed = tmp_path / "plain.csv", tmp_path / "renamed.csv"
    write(plain, [f"u{n},{row}" for n, rows in enumerate(histories) for row in rows])
    write(renamed, [f"{99 - n:x},{row}" for n, rows in enumerate(histories) for row in rows[::-1]])
    splits = []
    for path in (plain, renamed):
        events = load_events(path, CATALOGUE)
        train, validation = split_users(events, timelines(events), 0.25, seed=13)
        assert len(validation) == 10 and not set(train) & set(validation)
        splits.append(sorted(int(u[1:]) if u[0] == "u" else 99 - int(u, 16) for u in validation))
    assert splits[0] == splits[1]


def test_profile_store_round_trip_keyed_by_hash(tmp_path) -> None:
    keys = UserKeys(b"0123456789abcdef0123456789abcdef")
    profile = Profile()
    profile.apply(1, PURCHASE, 5.0, "b1")
    profile.apply(2, ADD_TO_CART, 6.0, "")
    store = open_store(f"sqlite://{tmp_path / 'profiles.sqlite'}")
    assert store.put([(keys.key("alice"), profile)]) == 1
    store.close()
    readonly = open_store(tmp_path / "profiles.sqlite", readonly=True)
    back = readonly.get(keys.key("alice"))
    assert back.items == profile.items and back.open_basket == [2] and back.baskets == 1
    assert back.last_ts == profile.last_ts and back.basket_key == "b1"
    assert readonly.get(keys.key("bob")) is None and readonly.get("alice") is None
    raw = (tmp_path / "profiles.sqlite").read_bytes()
    assert b"alice" not in raw and keys.key("alice").encode() in raw


def test_an_id_with_surrounding_spaces_is_the_same_shopper_everywhere(tmp_path) -> None:
    """The build reads ids from its files without surrounding whitespace: an event recorded live
    (or imported) for " alice " must land on the shopper the build and the server call "alice"."""
    keys = UserKeys(b"0123456789abcdef0123456789abcdef")
    assert keys.key(" alice\t") == keys.key("alice") != keys.key("al ice")
    write(tmp_path / "events.csv", [" alice ,1,100,purchase,b1"])
    (built,) = timelines(load_events(tmp_path / "events.csv", CATALOGUE))
    live = open_store(f"sqlite://{tmp_path / 'live.sqlite'}")
    EventIngest(live, keys).ingest(
        [EventRequest([" alice "], np.array([2]), [PURCHASE], np.array([200.0]), ["e1"], [""])]
    )
    assert built == "alice" and set(live.get(keys.key("alice")).items) == {2}


def test_user_keys_need_a_real_secret(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("SHOPSERVE_USER_KEY", raising=False)
    monkeypatch.delenv("SHOPSERVE_USER_KEY_FILE", raising=False)
    with pytest.raises(MissingUserKeyError, match="shopserve keys create"):
        UserKeys.from_environment()
    with pytest.raises(MissingUserKeyError, match="at least 16 bytes"):
        UserKeys(b"short")
    secret = tmp_path / "user.key"
    secret.write_text("s" * 32 + "\n")
    monkeypatch.setenv("SHOPSERVE_USER_KEY_FILE", str(secret))
    key = UserKeys.from_environment().key("alice")
    assert len(key) == 64 and key != UserKeys(b"t" * 32).key("alice")


def test_a_secrets_fingerprint_tells_it_from_another_and_reveals_nothing() -> None:
    one, other = UserKeys(b"a" * 32), UserKeys(b"b" * 32)
    assert one.fingerprint() == UserKeys(b"a" * 32).fingerprint() != other.fingerprint()
    assert one.fingerprint().startswith("key-") and "a" * 8 not in one.fingerprint()
    assert one.fingerprint() not in (one.key(""), one.log_name())


def test_the_secret_is_checked_against_the_one_a_version_was_built_with(tmp_path) -> None:
    manifests = tmp_path / store.MANIFESTS_DIR
    manifests.mkdir()
    built = UserKeys(b"a" * 32)
    (manifests / "v1.json").write_text(
        json.dumps({"personalization": {store.USER_KEY_FINGERPRINT: built.fingerprint()}})
    )
    (manifests / "v2.json").write_text(json.dumps({"personalization": {}}))  # built before
    assert check_user_key(built, tmp_path, 1)
    with pytest.raises(WrongUserKeyError, match=r"SHOPSERVE_USER_KEY_FILE.*version 1"):
        check_user_key(UserKeys(b"b" * 32), tmp_path, 1)
    assert not check_user_key(UserKeys(b"b" * 32), tmp_path, 2)  # nothing to check


# What versions before 323ecb3 ran against users: they kept the taste vector in it.
_EARLIER_USERS_TABLE = (
    "CREATE TABLE users (user_key TEXT PRIMARY KEY, baskets INTEGER NOT NULL, basket_key TEXT "
    "NOT NULL, last_purchase_ts REAL NOT NULL, last_ts REAL NOT NULL, open_basket TEXT NOT "
    "NULL, taste_sum BLOB, taste_weight REAL NOT NULL) WITHOUT ROWID;"
)
_EARLIER_READ = (
    "SELECT baskets, basket_key, last_purchase_ts, last_ts, open_basket, taste_sum, taste_weight "
    "FROM users WHERE user_key = ?"
)
_EARLIER_WRITE = "INSERT OR REPLACE INTO users VALUES (?, 3, 'b3', 8.0, 8.0, '[]', x'0000', 2.0)"


def test_a_store_written_before_the_taste_vector_was_computed_opens_and_takes_events(
    tmp_path,
) -> None:
    """Earlier stores kept each shopper's taste vector in users (a blob and a weight, NOT NULL):
    their profiles read and take events as before, and a profile written now has none for them."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(_EARLIER_USERS_TABLE)
    db.execute("INSERT INTO users VALUES ('k', 1, 'b1', 5.0, 6.0, '[2]', x'00', 1.0)")
    db.commit()
    db.close()
    store = SqliteProfileStore(path)
    assert store.get("k").open_basket == [2]
    assert store.apply([StoredEvent("k", "e1", 2, PURCHASE, 7.0, "b2")]) == {"e1"}
    back = store.get("k")
    assert back.baskets == 2 and back.open_basket == [] and back.items[2].purchases == 1
    assert store._db.execute(_EARLIER_READ, ("k",)).fetchone()[5:] == (None, 0.0)
    store.close()
    assert SqliteProfileStore(path).get("k").baskets == 2  # and again


def test_the_version_before_can_still_read_and_write_a_store_written_now(tmp_path) -> None:
    """A downgrade: a server of the version before 323ecb3 runs its own statements against a store
    this version created; what it writes reads here too."""
    store = SqliteProfileStore(tmp_path / "new.sqlite")
    store.apply([StoredEvent("k", "e1", 2, PURCHASE, 7.0, "b1")])
    earlier = sqlite3.connect(tmp_path / "new.sqlite")
    assert earlier.execute(_EARLIER_READ, ("k",)).fetchone() == (1, "b1", 7.0, 7.0, "[]", None, 0.0)
    earlier.execute(_EARLIER_WRITE, ("k",))
    earlier.commit()
    earlier.close()
    assert store.get("k").baskets == 3 and store.get("k").items[2].purchases == 1
    store.close()


_FILL_UNTIL_FULL = """
import json, resource, sys
from shopserve.ensemble.profile_store import STORE_ERRORS, SqliteProfileStore, StoredEvent
from shopserve.ensemble.profiles import PURCHASE

def batch(n):
    return [StoredEvent(f"u{n}", f"e{n}-{j}", j + 1, PURCHASE, float(n), "b") for j in range(32)]

store = SqliteProfileStore(sys.argv[1])
store.apply(batch(0))
# Writes past the limit fail with EFBIG, as on a full disk (Python ignores SIGXFSZ)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
acknowledged, refused = [0], None
for n in range(1, 10_000):
    try:
        store.apply(batch(n))
    except STORE_ERRORS as exc:
        refused = (n, type(exc).__name__)
        break
    acknowledged.append(n)
try:
    store.apply(batch(10_000))
    still_full = False
except STORE_ERRORS:
    still_full = True
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
retried = len(store.apply(batch(refused[0])))  # the client's retry, once there is room again
again = len(store.apply(batch(refused[0])))
print(json.dumps({"acknowledged": acknowledged, "refused": refused, "still_full": still_full,
                  "retried": retried, "again": again}))
"""


def test_a_full_disk_refuses_a_batch_whole_and_takes_it_again_when_there_is_room(tmp_path) -> None:
    """A real write failure (the process's file-size limit, as a full disk fails a write): the batch
    that meets it is refused whole, every batch acknowledged before stays, and the same store takes
    the client's retry once there is room, without reopening, counting it once."""
    import subprocess
    import sys

    path = tmp_path / "profiles.sqlite"
    run = subprocess.run(
        [sys.executable, "-c", _FILL_UNTIL_FULL, str(path), str(256 * 1024)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(run.stdout)
    refused, kind = result["refused"]
    assert refused > 2 and result["acknowledged"] == list(range(refused)), result
    assert kind in ("OperationalError", "OSError") and result["still_full"]
    assert result["retried"] == 32 and result["again"] == 0
    store = SqliteProfileStore(path)
    logged = [record.event.user_key for record in store.log()]
    assert logged == [f"u{n}" for n in [*range(refused), refused] for _ in range(32)]
    assert store.get(f"u{refused}").items[32].purchases == 1
    store.close()


def test_ids_the_server_would_refuse_stop_the_build_without_being_shown(tmp_path) -> None:
    long_user, long_basket = "u" * 257, "b" * 129
    write(
        tmp_path / "events.csv",
        [f"{long_user},1,100,purchase,b1", f"ok,1,100,purchase,{long_basket}"],
    )
    with pytest.raises(DataError) as error:
        load_events(tmp_path / "events.csv", CATALOGUE)
    assert "1 rows with a user_id over 256 bytes (first: row 2: '257 bytes')" in str(error.value)
    assert "1 rows with a basket_id or event_id over 128 bytes (first: row 3: '129 bytes')" in (
        str(error.value)
    )
    assert long_user not in str(error.value)


def test_forget_also_erases_what_servers_before_stripping_ids_stored(tmp_path) -> None:
    """Servers before 2026-12-06 hashed an id as sent: " alice "'s live events sit under the hash
    of " alice ". Forgetting " alice " erases them and alice's own."""
    from types import SimpleNamespace

    from shopserve.ensemble.personal import LiveEvents

    keys = UserKeys(b"0123456789abcdef0123456789abcdef")
    legacy = hmac.new(b"0123456789abcdef0123456789abcdef", b" alice ", hashlib.sha256).hexdigest()
    assert keys.keys_to_erase(" alice ") == [keys.key("alice"), legacy]
    assert keys.keys_to_erase("alice") == [keys.key("alice")]
    live = open_store(f"sqlite://{tmp_path / 'live.sqlite'}")
    profile = Profile()
    profile.apply(1, PURCHASE, 5.0, "b1")
    live.put([(legacy, profile), (keys.key("alice"), profile)])
    events = LiveEvents(SimpleNamespace(profiles=live, keys=keys))
    assert events.forget(" alice ", "operator-key-0123", "operator-key-0123")
    assert live.get(legacy) is None and live.get(keys.key("alice")) is None
