"""Input files and options a user gets wrong: each is refused with one ``error:`` line that names
the file (and the line), never read silently and never answered with a traceback. No server: the
command-line tests stop before any request, or stand the server's own checks in for it."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
from shopserve.client import InvalidRequestError, SearchClient
from shopserve.client._cli import (
    _parser,
    _security,
    catalogue_main,
    events_main,
    forget_main,
    main,
)
from shopserve.ensemble.catalogue import parse_update
from shopserve.ensemble.events import parse_events
from shopserve.ensemble.validation import InvalidRequest
from shopserve.export import cli as export_cli
from shopserve.export.data import (
    CatalogueData,
    DataError,
    fold_catalogue_updates,
    load_catalogue,
    load_event_log,
    load_events,
    load_judgments,
)
from shopserve.export.monotone import ModelExportError
from shopserve.export.ranker import check_reusable

from shopserve.formats import CsvFormatError, read_csv

NOWHERE = "127.0.0.1:1"  # no server: these commands stop before their first request
CATALOGUE = CatalogueData(np.array([1, 2, 3], dtype=np.int64), ["Milk", "Bread", "Eggs"])
EVENTS_HEADER = "user_id,product_id,timestamp,event\n"


def one_error_line(stderr: str, *parts: str) -> None:
    """``stderr`` holds one error line (``error: ...``, ``error after N events: ...``, or
    argparse's ``PROG: error: ...`` after its usage), holding every one of ``parts``."""
    assert "Traceback" not in stderr
    errors = [
        line for line in stderr.splitlines() if line.startswith("error") or ": error: " in line
    ]
    assert len(errors) == 1, stderr
    assert all(part in errors[0] for part in parts), stderr


MALFORMED = {
    "a row with more fields": (
        "1,Milk\n2,Bread,extra,fields\n3,Eggs\n",
        "line 4: expected 2 fields, got 4",
    ),
    "a row with fewer fields": ("1,Milk\n2\n3,Eggs\n", "line 4: expected 2 fields, got 1"),
    "a quote never closed": (
        '1,Milk\n2,"Bread, unclosed\n3,Eggs\n',
        "line 4: a quote in this row is never closed",
    ),
    "a stray quote": ('1,Milk\n2,"Bread" rolls\n', "line 4: ',' expected after '\"'"),
}


@pytest.mark.parametrize(("rows", "problem"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_csv_is_refused_naming_the_file_and_line(tmp_path, rows, problem) -> None:
    path = tmp_path / "items.csv"
    path.write_text("product_id,title\n\n" + rows)  # the blank line 2 counts as a line
    with pytest.raises(CsvFormatError) as error:
        list(read_csv(path)[1])
    assert str(error.value) == f"{path}: {problem}"


def test_rows_are_numbered_by_the_line_they_start_on(tmp_path) -> None:
    path = tmp_path / "items.csv"
    text = 'product_id,title\n1,"Milk\nin two lines"\n\n2,"Bread, ""sliced"""\n'
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # a spreadsheet's byte-order mark
    columns, rows = read_csv(path)
    assert columns == ["product_id", "title"]
    assert list(rows) == [
        (2, {"product_id": "1", "title": "Milk\nin two lines"}),
        (5, {"product_id": "2", "title": 'Bread, "sliced"'}),
    ]


def test_a_file_that_is_not_utf8_is_refused_naming_the_line(tmp_path) -> None:
    path = tmp_path / "items.csv"
    path.write_bytes("product_id,title\n1,Milk\n2,Crème brûlée\n".encode("latin-1"))
    with pytest.raises(CsvFormatError) as error:
        list(read_csv(path)[1])
    assert str(error.value).startswith(
        f"{path}: line 3: byte 0xe8 (at offset 28) is not UTF-8; the file must be UTF-8"
    )
    # Far into a large file, where it is decoded a block at a time (a 2-byte é across blocks)
    head = "product_id,title\n" + "".join(f"{n},Café\n" for n in range(20_000))
    path.write_bytes(head.encode() + "20000,Crème\n".encode("latin-1"))
    with pytest.raises(CsvFormatError) as error:
        list(read_csv(path)[1])
    offset = len(head.encode()) + len("20000,Cr")
    assert f"line 20002: byte 0xe8 (at offset {offset})" in str(error.value)


def test_a_quote_left_open_in_a_large_file_is_named_as_one(tmp_path) -> None:
    path = tmp_path / "items.csv"
    rows = "".join(f"{n},Milk {n}\n" for n in range(30_000))
    path.write_text(f'product_id,title\n1,"Open quote\n{rows}')
    with pytest.raises(CsvFormatError) as error:
        list(read_csv(path)[1])
    assert str(error.value) == (
        f"{path}: line 2: a field runs past 131,072 characters: is a quote never closed?"
    )


def _bad_rows(path, header: str, good: str) -> None:
    path.write_text(f"{header}\n{good}\n{good},extra\n")


READERS = {
    "catalogue": (load_catalogue, "product_id,title", "4,Tea"),
    "judgments": (
        lambda path: load_judgments(path, CATALOGUE),
        "query,product_id,relevance",
        "milk,1,3",
    ),
    "events": (
        lambda path: load_events(path, CATALOGUE),
        EVENTS_HEADER.strip(),
        "u1,1,1700000000,view",
    ),
    "event log": (
        lambda path: load_event_log(path, CATALOGUE),
        "user_key,product_id,timestamp,event,event_key",
        "k1,1,1700000000,view,e1",
    ),
    "catalogue log": (
        lambda path: fold_catalogue_updates(CATALOGUE, path),
        "product_id,title,operation,logged_at",
        "4,Tea,upsert,1700000000",
    ),
}


@pytest.mark.parametrize(("read", "header", "good"), READERS.values(), ids=READERS.keys())
def test_every_build_reader_refuses_a_malformed_csv(tmp_path, read, header, good) -> None:
    path = tmp_path / "input.csv"
    _bad_rows(path, header, good)
    fields = header.count(",") + 1
    problem = f"{path}: line 3: expected {fields} fields, got {fields + 1}"
    with pytest.raises(DataError, match=re.escape(problem)):
        read(path)


def test_a_build_names_a_bad_row_by_its_line_after_a_quoted_newline(tmp_path) -> None:
    path = tmp_path / "items.csv"
    path.write_text('product_id,title\n1,"Milk\nsemi-skimmed"\n2,Bread\n2,Rolls\n')
    with pytest.raises(DataError, match=r"a product_id already given \(on row 4\) \(first: row 5"):
        load_catalogue(path)


def test_a_build_refuses_an_unclosed_quote_and_a_latin1_catalogue(tmp_path, capsys) -> None:
    unclosed, latin1 = tmp_path / "unclosed.csv", tmp_path / "latin1.csv"
    unclosed.write_text('product_id,title\n1,Milk\n2,"Bread, unclosed\n3,Eggs\n')
    latin1.write_bytes("product_id,title\n1,Crème\n".encode("latin-1"))
    for path, problem in ((unclosed, "line 3: a quote"), (latin1, "line 2: byte 0xe8")):
        repository = tmp_path / f"shop-{path.stem}"
        arguments = ["build", "--catalogue", str(path), "--repository", str(repository)]
        assert export_cli.main(arguments) == 1
        one_error_line(capsys.readouterr().err, f"error: {path}: {problem}")
        assert not repository.exists()


def test_a_ranker_that_is_not_onnx_is_refused(tmp_path) -> None:
    path = tmp_path / "items.csv"
    path.write_text("product_id,title\n1,Milk\n")
    with pytest.raises(ModelExportError, match=f"--ranker {path} is not an ONNX model"):
        check_reusable(path)


@pytest.mark.parametrize("command", ["instacart", "cut"])
def test_a_conversion_without_its_data_folder_says_which_file_is_missing(
    tmp_path, capsys, command
) -> None:
    arguments = [command, "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]
    arguments += ["--queries", "1", "--products", "1"] if command == "cut" else []
    assert export_cli.main(arguments) == 1
    one_error_line(capsys.readouterr().err, f"error: {tmp_path / 'missing'}/", "does not exist")


def test_evaluating_a_missing_repository_says_it_is_not_built(tmp_path, capsys) -> None:
    judgments = tmp_path / "judged.csv"
    judgments.write_text("query,product_id,relevance\nmilk,1,3\n")
    missing = tmp_path / "nothing"
    arguments = ["evaluate", "--repository", str(missing), "--judgments", str(judgments)]
    assert export_cli.main(arguments) == 1
    one_error_line(capsys.readouterr().err, f"error: {missing} is not a built store")


# --- shopserve events import, catalogue apply ---------------------------------------------


def test_events_import_refuses_a_malformed_file_before_sending(tmp_path, capsys) -> None:
    path = tmp_path / "events.csv"
    path.write_text(EVENTS_HEADER + "u1,1,1700000000,view\nu1,1,1700000000,view,x,y\n")
    assert events_main(["import", str(path), "--url", NOWHERE]) == 1
    one_error_line(capsys.readouterr().err, f"error after 0 events: {path}: line 3: expected 4")


def test_catalogue_apply_refuses_malformed_files_and_rows(tmp_path, capsys) -> None:
    path = tmp_path / "updates.csv"
    for text, problem in (
        ('product_id,title\n1,"Milk\n', "line 2: a quote in this row is never closed"),
        (
            "product_id,title\n99999999999999999999999,Milk\n",
            "line 2: product_id 99999999999999999999999 does not fit in a 64-bit integer",
        ),
        ("product_id,title\n", "has no rows"),
        ("id,title\n1,Milk\n", "missing columns ['product_id'] (it has ['id', 'title'])"),
        ("product_id,title,price\n1,Milk,cheap\n", "line 2: price 'cheap' is not a number"),
    ):
        path.write_text(text)
        assert catalogue_main(["apply", str(path), "--url", NOWHERE]) == 2
        one_error_line(capsys.readouterr().err, f"error after 0 products: {path}", problem)


@pytest.fixture
def serverless(monkeypatch):
    """record_many and update_catalogue answered by the server's own checks of a request (a
    catalogue of products 1 to 3), without a server."""

    def texts(values) -> np.ndarray:
        return np.array([v.encode() for v in values], dtype=np.object_)

    def record_many(self, events, timeout=None) -> int:
        check(
            parse_events,
            texts(e.user_id for e in events),
            np.array([e.product_id for e in events], dtype=np.int64),
            texts(e.event for e in events),
            np.array([e.timestamp for e in events]),
            texts(e.event_id for e in events),
            None,
            lambda ids: np.isin(ids, CATALOGUE.product_ids),
        )
        return len(events)

    def update_catalogue(self, changes, update_id=None, timeout=None):
        check(
            parse_update,
            update_id.encode(),
            texts("delete" if c.delete else "upsert" for c in changes),
            np.array([c.product_id for c in changes], dtype=np.int64),
            texts(c.title for c in changes),
        )
        return argparse.Namespace(applied=len(changes))

    def check(parse, *inputs) -> None:
        try:
            parse(*inputs)
        except InvalidRequest as exc:
            raise InvalidRequestError(str(exc), "StatusCode.INVALID_ARGUMENT") from None

    monkeypatch.setattr(SearchClient, "record_many", record_many)
    monkeypatch.setattr(SearchClient, "update_catalogue", update_catalogue)


def test_a_refused_event_is_named_by_its_file_line(tmp_path, capsys, serverless) -> None:
    path = tmp_path / "events.csv"
    rows = [f"u{i},{1 + i % 3},1700000000,view" for i in range(7)]
    rows[5] = "u5,999999999,1700000000,view"  # line 7 of the file; row 1 of the third batch
    path.write_text(EVENTS_HEADER + "\n".join(rows) + "\n")
    assert events_main(["import", str(path), "--url", NOWHERE, "--batch-size", "2"]) == 1
    one_error_line(
        capsys.readouterr().err,
        f"error after 4 events: {path} line 7: PRODUCT_IDS[1] = 999999999 is not in the catalogue",
    )


def test_refused_products_are_named_by_their_file_lines(tmp_path, capsys, serverless) -> None:
    path = tmp_path / "updates.csv"
    path.write_text(
        'product_id,title\n1,"Milk\nsemi-skimmed"\n2,Bread\n3,\n4,Tea\n4,Tea again\n'
    )  # the second update (lines 5 and 6) has an upsert without a title on line 5
    assert catalogue_main(["apply", str(path), "--url", NOWHERE, "--batch-size", "2"]) == 2
    one_error_line(
        capsys.readouterr().err,
        f"error after 2 products: {path}: nothing applied; bad rows: upsert without a title: "
        "lines 5",
    )
    path.write_text("product_id,title\n1,Milk\n4,Tea\n2,Bread\n4,Tea again\n")
    assert catalogue_main(["apply", str(path), "--url", NOWHERE]) == 2
    one_error_line(capsys.readouterr().err, "product id repeated in the update: lines 3, 5")


# --- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option", ["--tls-ca", "--tls-cert", "--tls-key", "--inference-key-file", "--admin-key-file"]
)
@pytest.mark.parametrize("command", ["search", "forget"])
def test_a_missing_file_option_is_an_argument_error(tmp_path, capsys, option, command) -> None:
    missing = tmp_path / "none.pem"
    run = main if command == "search" else forget_main
    with pytest.raises(SystemExit) as exit_:
        run(["tea", "--url", NOWHERE, option, str(missing)])
    assert exit_.value.code == 2
    one_error_line(capsys.readouterr().err, f"{option}: cannot read {missing}: No such file")


def test_a_client_certificate_means_tls_with_the_systems_cas(tmp_path, capsys) -> None:
    pem = tmp_path / "client.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    args = _parser().parse_args(["tea", "--tls-cert", str(pem), "--tls-key", str(pem)])
    assert _security(args).channel() == {
        "ssl": True,
        "root_certificates": None,
        "private_key": str(pem),
        "certificate_chain": str(pem),
    }
    for option in ("--tls-cert", "--tls-key"):
        with pytest.raises(SystemExit) as exit_:
            main(["tea", "--url", NOWHERE, option, str(pem)])
        assert exit_.value.code == 2
        one_error_line(capsys.readouterr().err, "error: --tls-cert and --tls-key go together")


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        (["--batch-size", "0"], "--batch-size: expected a whole number from 1 to 1,024"),
        (["--batch-size", "-5"], "--batch-size: expected a whole number from 1 to 1,024"),
        (["--batch-size", "1025"], "--batch-size: expected a whole number from 1 to 1,024"),
        (["--timeout", "0"], "--timeout: expected a number of seconds above 0, got '0'"),
        (["--timeout", "-1"], "--timeout: expected a number of seconds above 0, got '-1'"),
        (["--timeout", "nan"], "--timeout: expected a number of seconds above 0, got 'nan'"),
    ],
)
@pytest.mark.parametrize("command", [events_main, catalogue_main], ids=["events", "catalogue"])
def test_batch_sizes_and_deadlines_must_be_positive(
    tmp_path, capsys, command, arguments, problem
) -> None:
    action = "import" if command is events_main else "apply"
    with pytest.raises(SystemExit) as exit_:
        command([action, str(tmp_path / "any.csv"), *arguments])
    assert exit_.value.code == 2
    one_error_line(capsys.readouterr().err, problem)
