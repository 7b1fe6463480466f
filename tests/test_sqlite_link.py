"""The SQLite files a server's models share, opened by many processes at once as Triton loads
them in parallel on a new work folder."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest
from shopserve.ensemble.catalogue_log import SqliteCatalogueLog
from shopserve.ensemble.profile_store import SqliteProfileStore
from shopserve.ensemble.sqlite_link import connect_wal

PROCESSES = 6
ROUNDS = 40  # before the retry, 4 to 11 of 360 such opens failed


def _open(kind: type, path: Path, start: multiprocessing.Barrier, failures) -> None:
    start.wait()
    try:
        kind(path)
    except sqlite3.Error as exc:
        failures.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.parametrize("kind", [SqliteProfileStore, SqliteCatalogueLog])
def test_processes_that_make_one_new_file_at_once_all_open_it(kind, tmp_path) -> None:
    context = multiprocessing.get_context("fork")
    failures = context.Queue()
    for round_ in range(ROUNDS):
        start = context.Barrier(PROCESSES)
        path = tmp_path / str(round_) / "shared.sqlite"
        openers = [
            context.Process(target=_open, args=(kind, path, start, failures))
            for _ in range(PROCESSES)
        ]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join(60)
            assert opener.exitcode == 0
    failed = [failures.get() for _ in range(failures.qsize())]
    assert failed == []
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_file_that_cannot_be_made_is_refused_at_once(tmp_path) -> None:
    (tmp_path / "catalogue").write_text("a file where the folder goes")
    with pytest.raises(FileExistsError):
        connect_wal(tmp_path / "catalogue" / "catalogue.sqlite")
