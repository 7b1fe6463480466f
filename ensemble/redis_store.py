"""The Redis profile store: one Redis shared by several Triton servers (the scale-out path), through
redis-py (:mod:`.redis_link`). Imported only when a Redis location is opened, so that a server on
SQLite never loads redis-py or :mod:`ssl`."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import redis

from .profile_store import (
    _LOG_COLUMNS,
    _LOG_FIELDS,
    _USER_COLUMNS,
    ERASED,
    LiveState,
    LogRecord,
    ProfileStore,
    ProfileStoreUnavailable,
    SqliteProfileStore,
    StoredEvent,
    _by_user,
    _fresh,
    _profile,
    _user_row,
    already_folded,
    erasure,
    fold,
    in_fold_order,
)
from .profiles import ItemStats, Profile
from .redis_link import connect, public_location

# Seeding a Redis namespace: a seeder's lock expires after SEED_LOCK_S (a killed server's lock
# frees itself); the other servers poll every SEED_POLL_S for up to SEED_WAIT_S.
SEED_LOCK_S, SEED_POLL_S, SEED_WAIT_S = 300.0, 0.2, 900.0
_RELEASE_LOCK = (  # delete the lock only if it is still this seeder's
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)
# What folding events needs of each of their shoppers, read in one round trip (the reads are
# inside the WATCH that guards the write): KEYS are (user hash, items hash, seen set) per shopper;
# ARGV per shopper is the number of event keys, the keys, the number of products, the products.
# Replies per shopper: which keys were seen (0/1), each product's stats (nil if none), HGETALL.
_FOLD_READS = """
local out, at = {}, 1
for u = 1, #KEYS, 3 do
  local hits, stats = {}, {}
  local count = tonumber(ARGV[at])
  for i = 1, count do hits[i] = redis.call('SISMEMBER', KEYS[u + 2], ARGV[at + i]) end
  at = at + count + 1
  count = tonumber(ARGV[at])
  for i = 1, count do stats[i] = redis.call('HGET', KEYS[u + 1], ARGV[at + i]) end
  at = at + count + 1
  out[#out + 1] = {hits, stats, redis.call('HGETALL', KEYS[u])}
end
return out
"""
_FOLD_READS_SHA = hashlib.sha1(_FOLD_READS.encode()).hexdigest()  # EVALSHA: the body sent once


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def require_fsync(client: redis.Redis, url: str) -> None:
    """Refuse a Redis that does not fsync every write: an acknowledged write must survive a crash."""
    settings = {}
    for name in ("appendonly", "appendfsync"):
        reply = {_text(k): _text(v) for k, v in client.config_get(name).items()}
        settings[name] = reply.get(name, "unknown")
    if settings != {"appendonly": "yes", "appendfsync": "always"}:
        raise ValueError(
            f"{public_location(url)}: Redis must fsync every write to keep acknowledged writes "
            f"(appendonly yes, appendfsync always); it has {settings}"
        )


def _entry_id(position: str | bytes) -> tuple[int, int]:
    """A Redis Stream entry id (``milliseconds-sequence``) as a comparable pair."""
    text = position.decode() if isinstance(position, bytes) else position
    milliseconds, sequence = text.split("-")
    return int(milliseconds), int(sequence)


class RedisProfileStore(ProfileStore):
    """Profiles in Redis: ``<prefix>u:<key>`` (a hash of the profile's fields), ``<prefix>i:<key>``
    (product id -> its stats as JSON) and ``<prefix>e:<key>`` (the event keys seen), under one
    prefix per build; the event log is the Stream ``shopserve:<log_name>``, one per shop, shared by
    every build's namespace."""

    FAILURES = (redis.RedisError, ProfileStoreUnavailable)
    RETRIES = 20
    LOG_PAGE = 10000
    CATCH_UP_BATCH = 1000  # events a catch-up transaction folds at most

    def __init__(
        self,
        url: str,
        namespace: str,
        password: str | None = None,
        log_name: str = "log",
        ca_file: str | None = None,
    ) -> None:
        self.client = connect(url, password=password, ca_file=ca_file)
        self.prefix = f"shopserve:{namespace}:"
        self.log_key = f"shopserve:{log_name}"
        require_fsync(self.client, url)

    def _keys(self, user_key: str) -> tuple[str, str, str]:
        return tuple(f"{self.prefix}{kind}:{user_key}" for kind in "uie")

    @staticmethod
    def _profile(stored: dict[bytes, bytes], items: dict[int, ItemStats]) -> Profile:
        row = [stored.get(c.encode()) for c in _USER_COLUMNS]
        row[_USER_COLUMNS.index("basket_key")] = row[_USER_COLUMNS.index("basket_key")].decode()
        return _profile(row, items)

    def _transaction(
        self, commands: Sequence[tuple], pipe: redis.client.Pipeline | None = None
    ) -> list | None:
        """``commands`` in one MULTI/EXEC (on ``pipe``, which may WATCH keys); None when a
        watched key changed (nothing was applied). An error Redis reports for any command inside
        the EXEC reply (WRONGTYPE, OOM ...) is raised: nothing is acknowledged then."""
        with pipe if pipe is not None else self.client.pipeline() as transaction:
            transaction.multi()
            for command in commands:
                transaction.execute_command(*command)
            try:
                return transaction.execute()
            except redis.WatchError:
                return None

    def get(self, user_key: str) -> Profile | None:
        user, items, _ = self._keys(user_key)
        try:
            stored, stats = self._transaction([("HGETALL", user), ("HGETALL", items)])
        except redis.RedisError as exc:  # down, full, paused past the timeout: may come back
            raise ProfileStoreUnavailable(
                f"the profile store could not be read (Redis: {type(exc).__name__})"
            ) from exc
        if not stored:
            return None
        return self._profile(stored, {int(p): ItemStats(*json.loads(v)) for p, v in stats.items()})

    def _writes(self, user_key: str, profile: Profile, products: Iterable[int]) -> list[tuple]:
        user, items, _ = self._keys(user_key)
        fields = dict(zip(_USER_COLUMNS, _user_row(profile), strict=True))
        # Versions before 323ecb3 kept a taste vector in the profile (taste_sum, taste_weight):
        # weight 0 and no sum tell them there is none (their next purchase starts one), so that
        # replicas of both can share a namespace during a rolling upgrade, or after a downgrade.
        # A later release drops both.
        fields["taste_weight"] = 0
        commands: list[tuple] = [
            ("HSET", user, *(x for kv in fields.items() for x in kv)),
            ("HDEL", user, "taste_sum"),
        ]
        stats = [(p, json.dumps(profile.items[p].row())) for p in products]
        if stats:
            commands.append(("HSET", items, *(x for kv in stats for x in kv)))
        return commands

    def _put_commands(self, profiles: Iterable[tuple[str, Profile]]) -> tuple[list[tuple], int]:
        count = 0
        commands: list[tuple] = []
        for user_key, profile in profiles:
            commands.append(("DEL", *self._keys(user_key)[:2]))
            commands += self._writes(user_key, profile, profile.items)
            count += 1
        return commands, count

    def put(self, profiles: Iterable[tuple[str, Profile]]) -> int:
        commands, count = self._put_commands(profiles)
        if commands:
            self._transaction(commands)
        return count

    def apply(self, events: Sequence[StoredEvent], log: bool = True) -> set[str]:
        groups = _by_user(events)
        watched = [key for user_key in groups for key in self._keys(user_key)]
        for _ in range(self.RETRIES):
            with self.client.pipeline() as pipe:  # its connection goes back to the pool at the end
                pipe.watch(*watched)  # the reads below see a state EXEC checks
                commands, applied = self._fold_commands(pipe, groups, log)
                if not commands or self._transaction(commands, pipe) is not None:
                    return applied
        raise ProfileStoreUnavailable(
            f"events for {len(groups)} users kept conflicting with other writers; not applied"
        )

    def _fold_commands(
        self,
        pipe: redis.client.Pipeline,
        groups: dict[str, list[StoredEvent]],
        log: bool,
    ) -> tuple[list[tuple], set[str]]:
        """The writes that fold each user's new events into their stored profile (read through
        the watching ``pipe``), and the event keys they apply."""
        commands: list[tuple] = []
        applied: set[str] = set()
        for (user_key, group), (keys, products, (hits, found, stored)) in zip(
            groups.items(), self._read_for_fold(pipe, groups), strict=True
        ):
            seen_key = self._keys(user_key)[2]
            fresh = _fresh(group, {k for k, hit in zip(keys, hits, strict=True) if hit})
            if not fresh:
                continue
            touched = {e.product_id for e in fresh}
            stats = {
                p: ItemStats(*json.loads(v))
                for p, v in zip(products, found, strict=True)
                if v is not None and p in touched
            }
            stored = dict(zip(stored[::2], stored[1::2], strict=True))
            profile = self._profile(stored, stats) if stored else Profile(items=stats)
            commands += self._writes(user_key, profile, fold(profile, fresh, log))
            commands.append(("SADD", seen_key, *(e.event_key for e in fresh)))
            if log:
                commands += [self._append(e) for e in in_fold_order(fresh)]
            applied.update(e.event_key for e in fresh)
        return commands, applied

    def _read_for_fold(
        self, pipe: redis.client.Pipeline, groups: dict[str, list[StoredEvent]]
    ) -> list[tuple[list[str], list[int], list]]:
        """Each shopper's event keys and products, with _FOLD_READS' replies for them: one round
        trip for the whole request, not three a shopper."""
        keys_of, arguments, asked = [], [], []
        for user_key, group in groups.items():
            keys = sorted({e.event_key for e in group})
            products = sorted({e.product_id for e in group})
            keys_of += self._keys(user_key)
            arguments += [len(keys), *keys, len(products), *products]
            asked.append((keys, products))
        try:
            replies = pipe.evalsha(_FOLD_READS_SHA, len(keys_of), *keys_of, *arguments)
        except redis.exceptions.NoScriptError:  # a restarted or another Redis: load it (once)
            pipe.script_load(_FOLD_READS)
            replies = pipe.evalsha(_FOLD_READS_SHA, len(keys_of), *keys_of, *arguments)
        return [(*pair, reply) for pair, reply in zip(asked, replies, strict=True)]

    def _append(self, event: StoredEvent) -> tuple:
        """The XADD of one log record: the Stream's entry id orders it, its fields hold the event
        and when it was accepted."""
        fields = (*(getattr(event, c) for c in _LOG_COLUMNS), time.time())
        return (
            "XADD",
            self.log_key,
            "*",
            *(x for kv in zip(_LOG_FIELDS, fields, strict=True) for x in kv),
        )

    def log(self, after: str = "") -> Iterator[LogRecord]:
        start = f"({after}" if after else "-"
        while True:
            entries = self.client.xrange(self.log_key, start, "+", count=self.LOG_PAGE)
            for entry_id, fields in entries:
                values = [fields[name.encode()].decode() for name in _LOG_FIELDS]
                user_key, event_key, product, kind, timestamp, basket_key, logged_at = values
                event = StoredEvent(
                    user_key, event_key, int(product), int(kind), float(timestamp), basket_key
                )
                yield LogRecord(entry_id.decode(), float(logged_at), event)
            if len(entries) < self.LOG_PAGE:
                return
            start = f"({entries[-1][0].decode()}"

    def forget(self, user_key: str) -> bool:
        logged, scanned = [], ""
        for record in self.log():
            scanned = record.position
            if record.event.user_key == user_key:
                logged.append(record)
        commands: list[tuple] = [("DEL", *self._keys(user_key))]
        if logged:  # its events, and any earlier erasure record the new one supersedes
            commands.append(("XDEL", self.log_key, *(r.position for r in logged)))
        commands.append(self._append(erasure(user_key)))
        removed = self._transaction(commands)
        # Another server may have logged an event of the shopper between the scan and the
        # transaction: its profile writes were deleted with the keys, its log record goes now
        # (only the entries after the scan are read again).
        erased_at = _entry_id(removed[-1])
        late = [
            r.position
            for r in self.log(scanned)
            if r.event.user_key == user_key
            and r.event.kind != ERASED
            and _entry_id(r.position) < erased_at
        ]
        if late:
            self.client.xdel(self.log_key, *late)
        return bool(removed[0]) or bool(late) or any(r.event.kind != ERASED for r in logged)

    def compact(self, before: float) -> int:
        old = [r.position for r in self.log() if r.logged_at < before and r.event.kind != ERASED]
        for start in range(0, len(old), self.LOG_PAGE):
            self.client.xdel(self.log_key, *old[start : start + self.LOG_PAGE])
        return len(old)

    def catch_up(self, known: Container[int], snapshot: Path) -> int:
        """Fold the log records after this namespace's last replayed position (events logged
        through another build's namespace since this one last started) by the rules of
        :func:`replay` over the build's ``snapshot``; return how many events were new here.
        Idempotent: folded event keys are skipped."""
        replayed = f"{self.prefix}replayed"
        position = (self.client.get(replayed) or b"").decode()
        build = SqliteProfileStore(snapshot, readonly=True)
        try:
            applied, erased_here = build.applied_erasures(), set()
            folded, pending = 0, []
            for record in self.log(position):
                position, event = record.position, record.event
                erasure = event.kind == ERASED
                if erasure or len(pending) == self.CATCH_UP_BATCH:  # log order, bounded batches
                    folded += len(self.apply(pending, log=False)) if pending else 0
                    pending = []
                if erasure:
                    if not already_folded(event, applied):
                        self.client.delete(*self._keys(event.user_key))
                        erased_here.add(event.user_key)
                    continue
                erased = event.user_key in erased_here
                watermark = -np.inf if erased else build.last_event_time(event.user_key)
                if event.product_id in known and event.timestamp > watermark:
                    pending.append(event)
        finally:
            build.close()
        if pending:
            folded += len(self.apply(pending, log=False))
        self.client.set(replayed, position)
        return folded

    def users(self) -> int:
        return sum(1 for _ in self.client.scan_iter(match=f"{self.prefix}u:*", count=1000))

    def seed_once(
        self,
        state: Callable[[], LiveState],
        marker: str,
        lock_s: float = SEED_LOCK_S,
        wait_s: float = SEED_WAIT_S,
    ) -> int | None:
        """Write ``state()`` (the build's snapshot with the log replayed over it) into this
        namespace unless it was seeded before; return how many profiles, or None when it already
        was.

        The profiles, their event keys, the last log position folded and the ``seeded`` marker are
        written in one transaction, so the namespace
        is either untouched or complete: a crash mid-seeding leaves nothing. One server at a time
        seeds, under a lock that expires after ``lock_s`` (a server killed while seeding holds it
        no longer); the others wait for the marker, up to ``wait_s``. The transaction WATCHes the
        lock and the marker, so a seeding that outlived its lock never overwrites another's."""
        seeded, lock = f"{self.prefix}seeded", f"{self.prefix}seeding"
        token = secrets.token_hex(16)
        deadline = time.monotonic() + wait_s
        while not self.client.set(lock, token, nx=True, px=int(lock_s * 1000)):
            if self.client.exists(seeded):
                return None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"namespace {self.prefix!r} is being seeded by another server and did not "
                    f"finish in {wait_s:.0f} s"
                )
            time.sleep(SEED_POLL_S)
        try:
            with self.client.pipeline() as pipe:
                pipe.watch(lock, seeded)
                if pipe.exists(seeded) or pipe.get(lock) != token.encode():
                    return None
                written = self._seed_writes(pipe, state(), marker)
            if written is not None:
                return written
            if self.client.exists(seeded):
                return None  # the lock expired and another server seeded meanwhile
            raise RuntimeError(f"seeding namespace {self.prefix!r} was interrupted; start again")
        finally:
            self.client.eval(_RELEASE_LOCK, 1, lock, token)

    def _seed_writes(self, pipe: redis.client.Pipeline, live: LiveState, marker: str) -> int | None:
        """Write ``live`` and the ``seeded`` marker in one transaction on the watching ``pipe``;
        how many profiles, or None when a watched key changed."""
        commands, count = self._put_commands(live.profiles.items())
        commands += [("SADD", self._keys(u)[2], *keys) for u, keys in live.seen.items() if keys]
        commands.append(("SET", f"{self.prefix}replayed", live.position))
        commands.append(("SET", f"{self.prefix}seeded", marker))
        return None if self._transaction(commands, pipe) is None else count

    def close(self) -> None:
        self.client.close()
