"""Fuzzing the real server: random input names, dtypes, shapes, sizes and bytes sent to every
endpoint. Every reply is a result or INVALID_ARGUMENT, the server never goes down, and a valid query
right after each case gets the same answer as before. Bounded in count (Hypothesis examples)."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shopserve.client import SearchClient
from shopserve.ensemble import store
from tritonclient.utils import InferenceServerException

pytestmark = [pytest.mark.slow, pytest.mark.server]

NAMES = ["QUERY", "TOP_K", "USER_ID", "NEW_ONLY", "USER_IDS", "PRODUCT_IDS", "EVENT_TYPES",
         "TIMESTAMPS", "EVENT_IDS", "BASKET_IDS"]  # fmt: skip
DTYPES = {
    "BYTES": np.object_,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP32": np.float32,
    "FP64": np.float64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}
EXAMPLES = 40
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def tensors(draw) -> tuple[str, str, np.ndarray]:
    name = draw(st.one_of(st.sampled_from(NAMES), st.text(min_size=1, max_size=12)))
    datatype = draw(st.sampled_from(sorted(DTYPES)))
    shape = draw(st.lists(st.integers(0, 3), min_size=0, max_size=3))
    count = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        values = draw(st.lists(st.binary(max_size=300), min_size=count, max_size=count))
        array = np.empty(count, dtype=np.object_)
        array[:] = values  # bytes objects as they are, whatever their length
    elif datatype == "BOOL":
        values = draw(st.lists(st.booleans(), min_size=count, max_size=count))
        array = np.array(values, dtype=np.bool_)
    else:
        dtype = DTYPES[datatype]
        info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
        values = draw(
            st.lists(
                st.integers(int(info.min), int(info.max))
                if info
                else st.floats(allow_nan=True, allow_infinity=True, width=32),
                min_size=count,
                max_size=count,
            )
        )
        array = np.array(values, dtype=dtype)
    return name, datatype, array.reshape(shape)


requests = st.lists(tensors(), min_size=0, max_size=5, unique_by=lambda t: t[0])


def _send(url: str, model: str, spec: list[tuple[str, str, np.ndarray]]) -> None:
    inputs = []
    for name, datatype, array in spec:
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client = grpcclient.InferenceServerClient(url)
    try:
        client.infer(model, inputs, client_timeout=30)
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.INVALID_ARGUMENT", (model, exc.status(), exc.message())
    finally:
        client.close()


def _answer(url: str) -> list[int]:
    with SearchClient(url, timeout=30) as client:
        return [hit.product_id for hit in client.search("cordless drill", top_k=5)]


@pytest.mark.parametrize("model", [store.SEARCH, store.ENSEMBLE])
def test_search_endpoints_survive_random_requests(server, model) -> None:
    before = _answer(server.grpc_url)

    @FUZZ
    @given(spec=requests)
    def case(spec) -> None:
        _send(server.grpc_url, model, spec)
        assert _answer(server.grpc_url) == before

    case()
    assert server.process.poll() is None


@pytest.mark.parametrize("model", [store.RECOMMEND, store.EVENTS])
def test_personal_endpoints_survive_random_requests(personal_server, model) -> None:
    with SearchClient(personal_server.grpc_url, timeout=30) as client:
        before = [h.product_id for h in client.recommend("fuzz-never-seen", top_k=5)]

    @FUZZ
    @given(spec=requests)
    def case(spec) -> None:
        _send(personal_server.grpc_url, model, spec)
        with SearchClient(personal_server.grpc_url, timeout=30) as client:
            assert [h.product_id for h in client.recommend("fuzz-never-seen", top_k=5)] == before

    case()
    assert personal_server.process.poll() is None
