"""Unit tests for shopserve.client that need no server (round trips are in test_server.py)."""

from __future__ import annotations

import asyncio
import json
import socket

import numpy as np
import pytest
from shopserve.client import (
    AsyncSearchClient,
    Event,
    Explanation,
    Hit,
    InvalidRequestError,
    ModelNotServedError,
    OverloadedError,
    PermissionDeniedError,
    Reason,
    RequestTimeoutError,
    SearchClient,
    SearchError,
    Security,
    ServerUnavailableError,
    map_error,
)
from shopserve.client._cli import format_json_lines, format_table, main, read_events
from shopserve.client._client import build_inputs, parse_hits
from tritonclient.utils import (
    InferenceServerException,
    deserialize_bytes_tensor,
)

# --- error mapping ------------------------------------------------------------------------


def test_overload_and_key_refusals_are_typed() -> None:
    full = map_error(
        InferenceServerException("Exceeds maximum queue size", "StatusCode.UNAVAILABLE")
    )
    late = map_error(InferenceServerException("Request timeout expired", "StatusCode.UNAVAILABLE"))
    down = map_error(InferenceServerException("model not ready", "StatusCode.UNAVAILABLE"))
    assert type(full) is OverloadedError and full.retryable
    assert type(late) is RequestTimeoutError and late.retryable
    assert type(down) is ServerUnavailableError and down.retryable
    restricted = map_error(
        InferenceServerException(
            "This protocol is restricted, expecting header 'shopserve-admin-key'",
            "StatusCode.UNAVAILABLE",
        )
    )
    assert type(restricted) is PermissionDeniedError and not restricted.retryable
    unknown = map_error(
        InferenceServerException(
            "Request for unknown model: 'recommend' is not found", "StatusCode.UNAVAILABLE"
        )
    )
    assert type(unknown) is ModelNotServedError and not unknown.retryable
    assert isinstance(unknown, ServerUnavailableError)  # what code written before catches
    assert unknown.message.startswith("Request for unknown model: 'recommend' is not found (")
    assert "built without --events" in unknown.message
    assert not map_error(InferenceServerException("bad", "StatusCode.INVALID_ARGUMENT")).retryable


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("StatusCode.INVALID_ARGUMENT", InvalidRequestError),
        ("StatusCode.UNAVAILABLE", ServerUnavailableError),
        ("StatusCode.NOT_FOUND", ServerUnavailableError),
        ("StatusCode.DEADLINE_EXCEEDED", RequestTimeoutError),
        ("StatusCode.INTERNAL", SearchError),
        ("StatusCode.CANCELLED", SearchError),
        (None, SearchError),
    ],
)
def test_map_error(status: str | None, expected: type[SearchError]) -> None:
    error = map_error(InferenceServerException("server said no", status=status))
    assert type(error) is expected
    assert isinstance(error, SearchError)
    assert error.message == "server said no"
    assert error.status == status
    assert str(error) == "server said no"


def test_map_error_without_message_falls_back_to_status() -> None:
    error = map_error(InferenceServerException("", status="StatusCode.INTERNAL"))
    assert error.message == "StatusCode.INTERNAL"


# --- request building ---------------------------------------------------------------------


def _tensor(inp) -> tuple[str, str, list[int], bytes]:
    tensor = inp._get_tensor()
    return tensor.name, tensor.datatype, list(tensor.shape), inp._get_content()


def test_build_inputs_names_dtypes_shapes() -> None:
    query, top_k = build_inputs("cordless drill", 7)
    q_name, q_dtype, q_shape, q_raw = _tensor(query)
    k_name, k_dtype, k_shape, k_raw = _tensor(top_k)
    assert (q_name, q_dtype, q_shape) == ("QUERY", "BYTES", [1])
    assert (k_name, k_dtype, k_shape) == ("TOP_K", "INT32", [1])
    assert deserialize_bytes_tensor(q_raw).tolist() == [b"cordless drill"]
    assert np.frombuffer(k_raw, dtype=np.int32).tolist() == [7]


def test_build_inputs_encodes_str_as_utf8() -> None:
    query, _ = build_inputs("café ☕", 1)
    assert deserialize_bytes_tensor(_tensor(query)[3]).tolist() == ["café ☕".encode()]


@pytest.mark.parametrize("raw", [b"\xff\xfe not utf-8", b"", b"caf\xc3\xa9"])
def test_build_inputs_passes_bytes_through(raw: bytes) -> None:
    query, _ = build_inputs(raw, 1)
    assert deserialize_bytes_tensor(_tensor(query)[3]).tolist() == [raw]


@pytest.mark.parametrize("top_k", [0, -5, 101, 10_000])
def test_build_inputs_does_not_range_check(top_k: int) -> None:
    _, k = build_inputs("", top_k)
    assert np.frombuffer(_tensor(k)[3], dtype=np.int32).tolist() == [top_k]


def test_build_inputs_accepts_numpy_int() -> None:
    _, k = build_inputs("x", np.int64(3))
    assert np.frombuffer(_tensor(k)[3], dtype=np.int32).tolist() == [3]


@pytest.mark.parametrize("top_k", [True, False, 5.0, "5", None])
def test_top_k_must_be_int(top_k: object) -> None:
    with pytest.raises(TypeError, match="top_k"):
        build_inputs("drill", top_k)  # type: ignore[arg-type]


def test_top_k_must_fit_int32() -> None:
    with pytest.raises(OverflowError):
        build_inputs("drill", 2**31)


def test_the_cli_refuses_a_top_k_beyond_int32(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["drill", "-k", "3000000000"])
    assert exit.value.code == 2
    assert "-k/--top-k: 3000000000 does not fit in a 32-bit integer" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"user_id": 42}, "user_id must be a str, not int"),
        ({"product_id": "196"}, "product_id must be an int, not str"),
        ({"product_id": True}, "product_id must be an int, not bool"),
        ({"timestamp": "2026-12-03T10:00:00Z"}, "timestamp must be a number of epoch seconds"),
        ({"event": None}, "event must be a str, not NoneType"),
    ],
)
def test_an_event_of_the_wrong_types_names_the_field(fields: dict, problem: str) -> None:
    event = {"user_id": "u1", "product_id": 196, "event": "click", "timestamp": 1.7e9}
    with pytest.raises(TypeError, match=problem):
        Event(**(event | fields))


def test_an_events_import_reads_a_spreadsheets_file_and_names_a_bad_line(tmp_path) -> None:
    path = tmp_path / "events.csv"
    rows = "user_id,product_id,timestamp,event\nu1,196,1700000000,click\nu1,196,yesterday,click\n"
    path.write_bytes(("\ufeff" + rows).encode())  # a byte-order mark, as spreadsheets write
    events = read_events(path)
    line, first = next(events)
    assert line == 2
    assert (first.user_id, first.product_id, first.timestamp, first.basket_id) == (
        "u1",
        196,
        1.7e9,
        "",
    )
    with pytest.raises(ValueError, match=f"{path}: line 3: Invalid isoformat string: 'yesterday'"):
        next(events)
    path.write_text("user_id,product_id,timestamp,event\nu1,196,1700000000,click\nu1,196\n")
    with pytest.raises(ValueError, match=f"{path}: line 3: expected 4 fields, got 2"):
        list(read_events(path))
    path.write_text("user,product_id,timestamp,event\n")
    with pytest.raises(ValueError, match=r"missing columns \['user_id'\]"):
        next(read_events(path))


def test_an_events_import_reads_other_systems_names_as_the_build_does(tmp_path) -> None:
    """One reading of the events format: REES46's "cart" and BigQuery's "... UTC" times."""
    path = tmp_path / "events.csv"
    path.write_text(
        "user_id,product_id,timestamp,event\n"
        "u1,196,2023-11-14 22:13:20 UTC,cart\nu1,196,1700000000,Transaction\nu1,196,1,like\n"
    )
    events = (event for _, event in read_events(path))
    assert [(e.event, e.timestamp) for e in (next(events), next(events))] == [
        ("add_to_cart", 1.7e9),
        ("purchase", 1.7e9),
    ]
    with pytest.raises(ValueError, match=f"{path}: line 4: 'like': unknown event types"):
        next(events)


def test_query_must_be_str_or_bytes() -> None:
    with pytest.raises(TypeError, match="query"):
        build_inputs(42, 5)  # type: ignore[arg-type]


def test_every_call_carries_its_deadline_to_the_server() -> None:
    client = SearchClient("127.0.0.1:1", timeout=0.05)
    options = client._infer_options(None)
    assert [out._get_tensor().name for out in options["outputs"]] == [
        "PRODUCT_IDS",
        "SCORES",
        "TITLES",
    ]
    assert options["client_timeout"] == 0.05 and options["timeout"] == 50_000
    assert "headers" not in options and client._infer_options(2.0)["timeout"] == 2_000_000
    keyed = SearchClient("127.0.0.1:1", security=Security(inference_key="k", admin_key="a"))
    options = keyed._infer_options(None, ["FORGOTTEN"], admin=True)
    assert options["headers"] == {"triton-grpc-protocol-shopserve-inference-key": "k"}
    assert options["parameters"] == {"admin_key": "a"}
    with pytest.raises(ValueError, match="operator's key"):
        client._infer_options(None, admin=True)


# --- response parsing ---------------------------------------------------------------------


class FakeResult:
    def __init__(self, **arrays: np.ndarray) -> None:
        self._arrays = arrays

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self._arrays.get(name)


def test_parse_hits() -> None:
    result = FakeResult(
        PRODUCT_IDS=np.array([42, 7], dtype=np.int64),
        SCORES=np.array([0.75, 0.25], dtype=np.float32),
        TITLES=np.array(["Bohrschrauber äöü".encode(), b"Drill"], dtype=np.object_),
    )
    hits = parse_hits(result)
    assert hits == [
        Hit(rank=1, product_id=42, score=0.75, title="Bohrschrauber äöü"),
        Hit(rank=2, product_id=7, score=0.25, title="Drill"),
    ]
    assert all(type(h.product_id) is int and type(h.score) is float for h in hits)


def test_parse_hits_reads_each_hits_explanation() -> None:
    document = {
        "logit": 2.5,
        "reference": 0.5,
        "reasons": [
            {"signal": "meaning", "contribution": 1.5, "text": "cosine 0.8"},
            {"signal": "bm25", "contribution": 0.5, "text": "BM25 90 %"},
        ],
    }
    result = FakeResult(
        PRODUCT_IDS=np.array([42], dtype=np.int64),
        SCORES=np.array([1.0], dtype=np.float32),
        TITLES=np.array([b"Drill"], dtype=np.object_),
        EXPLANATIONS=np.array([json.dumps(document).encode()], dtype=np.object_),
    )
    (hit,) = parse_hits(result)
    assert hit.explanation == Explanation(
        2.5, 0.5, (Reason("meaning", 1.5, "cosine 0.8"), Reason("bm25", 0.5, "BM25 90 %"))
    )
    table = format_table([hit]).splitlines()
    assert table[2].split() == ["+1.50", "meaning:", "cosine", "0.8"]
    assert table[2].index("+1.50") == table[1].index("Drill")
    assert json.loads(format_json_lines([hit]))["explanation"] == document
    with pytest.raises(SearchError, match="2 explanations for 1 hits"):
        parse_hits(
            FakeResult(
                **{**result._arrays, "EXPLANATIONS": np.repeat(result._arrays["EXPLANATIONS"], 2)}
            )
        )


def test_parse_hits_empty() -> None:
    result = FakeResult(
        PRODUCT_IDS=np.zeros(0, dtype=np.int64),
        SCORES=np.zeros(0, dtype=np.float32),
        TITLES=np.zeros(0, dtype=np.object_),
    )
    assert parse_hits(result) == []


def test_parse_hits_missing_output() -> None:
    result = FakeResult(PRODUCT_IDS=np.array([1]), SCORES=np.array([1.0]))
    with pytest.raises(SearchError, match="TITLES"):
        parse_hits(result)


def test_parse_hits_length_mismatch() -> None:
    result = FakeResult(
        PRODUCT_IDS=np.array([1, 2]),
        SCORES=np.array([1.0]),
        TITLES=np.array([b"a", b"b"], dtype=np.object_),
    )
    with pytest.raises(SearchError, match="length"):
        parse_hits(result)


def test_hit_is_frozen() -> None:
    hit = Hit(rank=1, product_id=1, score=1.0, title="x")
    with pytest.raises(AttributeError):
        hit.rank = 2  # type: ignore[misc]


# --- CLI formatting -----------------------------------------------------------------------

HITS = [
    Hit(rank=1, product_id=123456, score=0.912345, title="Cordless drill 18V"),
    Hit(rank=2, product_id=7, score=0.05, title="x" * 100),
    Hit(rank=10, product_id=42, score=0.0001234, title="Multi\nline\ttitle"),
]


def test_format_table() -> None:
    lines = format_table(HITS).splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["rank", "score", "product_id", "title"]
    assert lines[1].split()[:3] == ["1", "0.9123", "123456"]
    assert lines[3].split()[:3] == ["10", "0.0001", "42"]
    # every title starts in the same column
    column = lines[0].index("title")
    assert lines[1][column:] == "Cordless drill 18V"
    assert lines[2][column:] == "x" * 67 + "..."
    assert lines[3][column:] == "Multi line title"
    # numbers are right-aligned
    assert lines[1].index("0.9123") == lines[3].index("0.0001")
    assert (
        len(
            {
                line.index(str(hit.product_id)) + len(str(hit.product_id))
                for line, hit in zip(lines[1:], HITS, strict=True)
            }
        )
        == 1
    )


def test_format_table_no_hits() -> None:
    assert format_table([]).split() == ["rank", "score", "product_id", "title"]


def test_format_json_lines() -> None:
    rows = [json.loads(line) for line in format_json_lines(HITS).splitlines()]
    assert rows[0] == {
        "rank": 1,
        "product_id": 123456,
        "score": 0.912345,
        "title": "Cordless drill 18V",
    }
    assert [row["rank"] for row in rows] == [1, 2, 10]


# --- against nothing listening ------------------------------------------------------------


@pytest.fixture
def closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


def test_ready_false_when_nothing_listens(closed_url: str) -> None:
    with SearchClient(closed_url, timeout=1.0) as client:
        assert client.ready() is False


def test_search_closed_port_raises_unavailable(closed_url: str) -> None:
    with (
        SearchClient(closed_url, timeout=1.0) as client,
        pytest.raises(ServerUnavailableError) as info,
    ):
        client.search("drill")
    assert info.value.status == "StatusCode.UNAVAILABLE"


def test_search_many_closed_port_raises_unavailable(closed_url: str) -> None:
    with SearchClient(closed_url, timeout=1.0) as client, pytest.raises(ServerUnavailableError):
        client.search_many(["a", "b", "c"], max_in_flight=2)


def test_async_closed_port(closed_url: str) -> None:
    async def scenario() -> None:
        async with AsyncSearchClient(closed_url, timeout=1.0) as client:
            assert await client.ready() is False
            with pytest.raises(ServerUnavailableError):
                await client.search("drill")

    asyncio.run(scenario())


@pytest.fixture
def silent_url():
    """A port that takes connections and never answers: every call runs into its deadline."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def test_a_call_past_its_deadline_is_a_timeout(silent_url: str) -> None:
    """Sync and async alike. (Against Triton 2.51 itself, a request cancelled by its deadline
    can crash the server, upstream's gRPC cancellation race: docs/serving.md#deadlines, so the
    tests that send past-deadline requests to a real server start their own.)"""
    with SearchClient(silent_url, timeout=0.2) as client, pytest.raises(RequestTimeoutError):
        client.search("drill")

    async def scenario() -> None:
        async with AsyncSearchClient(silent_url, timeout=0.2) as client:
            with pytest.raises(RequestTimeoutError):
                await client.search("drill")

    asyncio.run(scenario())


def test_cli_closed_port(closed_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["drill", "--url", closed_url, "--timeout", "1"]) == 1
    assert capsys.readouterr().err.startswith("error: ")


class _FlakyEvents:
    """A stand-in for the server's answers: ``failures`` transient errors, then success."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures

    def answer(self, call):
        if self.failures:
            raise self.failures.pop(0)
        return 1


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_record_many_retries_transient_failures_with_the_same_events(kind, monkeypatch) -> None:
    import asyncio

    from shopserve.client import (
        AsyncSearchClient,
        Event,
        InvalidRequestError,
        OverloadedError,
        RequestTimeoutError,
    )
    from shopserve.client._client import SearchClient

    events = [Event("u", 1, "click"), Event("u", 2, "view")]
    flaky = _FlakyEvents([OverloadedError("queue full"), RequestTimeoutError("late")])
    calls = []

    def record(client) -> int:
        if kind == "sync":
            return client.record_many(events)
        return asyncio.run(client.record_many(events))

    if kind == "sync":
        client = SearchClient("127.0.0.1:1")
        monkeypatch.setattr(client, "_send", lambda call: calls.append(call) or flaky.answer(call))
    else:
        client = AsyncSearchClient("127.0.0.1:1")

        async def send(call):
            calls.append(call)
            return flaky.answer(call)

        monkeypatch.setattr(client, "_send", send)
    assert record(client) == 1
    assert len(calls) == 3 and all(c is calls[0] for c in calls)  # the same request, same ids
    flaky.failures = [InvalidRequestError("bad"), OverloadedError("never reached")]
    with pytest.raises(InvalidRequestError):
        record(client)
    assert len(calls) == 4  # a request the server refused as invalid is never retried
    flaky.failures = [OverloadedError("full")] * 5
    with pytest.raises(OverloadedError):
        record(client)
    assert len(calls) == 8  # bounded: four attempts


@pytest.mark.parametrize("url", ["not a url::", "127.0.0.1:notaport", "8001", "", " , "])
def test_an_address_that_is_not_host_and_port_is_a_value_error(url) -> None:
    with pytest.raises(ValueError, match=r"host:port|no server address"):
        SearchClient(url)
    with pytest.raises(ValueError, match=r"host:port|no server address"):
        AsyncSearchClient(url)


def test_the_cli_refuses_an_address_that_is_not_host_and_port(capsys) -> None:
    with pytest.raises(SystemExit) as exit_status:
        main(["tea", "--url", "127.0.0.1:notaport"])
    assert exit_status.value.code == 2
    assert "argument --url: server address '127.0.0.1:notaport' is not host:port" in (
        capsys.readouterr().err
    )


def test_certificates_without_tls_are_refused_not_ignored() -> None:
    with pytest.raises(ValueError, match="give ssl=True"):
        Security(root_certificates="ca.crt")
    with pytest.raises(ValueError, match="both private_key and certificate_chain"):
        Security(ssl=True, private_key="client.key")
    assert Security(ssl=True, private_key="k", certificate_chain="c").channel()["ssl"] is True
    assert Security().channel() == {}
