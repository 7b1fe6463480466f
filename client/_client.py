"""Blocking and asyncio clients for the Triton ``search`` ensemble.

Request building and response parsing are module functions shared by both clients. Query and
TOP_K values are deliberately not range-checked here: the server is the authority on what is
valid and answers bad values with INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aio_grpcclient
from tritonclient.utils import InferenceServerException

from ._errors import RequestTimeoutError, SearchError, ServerUnavailableError, map_error
from ._replicas import channel as replica_channel

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_MODEL_NAME = "search"
RECOMMEND_MODEL_NAME = "recommend"
OUTPUT_NAMES = ("PRODUCT_IDS", "SCORES", "TITLES")
PERSONALISED_OUTPUT = "PERSONALISED"  # search with a USER_ID: whether the history was used
EXPLANATIONS_OUTPUT = "EXPLANATIONS"  # with EXPLAIN: a JSON document per hit

_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class Reason:
    """One signal's part in a hit's score: ``contribution`` in logit units, ``text`` in words."""

    signal: str
    contribution: float
    text: str


@dataclass(frozen=True)
class Explanation:
    """Why a hit scored as it did (asked with ``explain=True``): ``logit == reference + sum of
    the reasons' contributions``, the reasons largest first (docs/explanations.md)."""

    logit: float
    reference: float
    reasons: tuple[Reason, ...]

    @classmethod
    def from_json(cls, text: bytes) -> Explanation:
        document = json.loads(text)
        reasons = tuple(Reason(**reason) for reason in document["reasons"])
        return cls(float(document["logit"]), float(document["reference"]), reasons)


@dataclass(frozen=True)
class Hit:
    """One search result; ``rank`` is 1-based and ``score`` is a softmax probability;
    ``explanation`` when the request asked for one."""

    rank: int
    product_id: int
    score: float
    title: str
    explanation: Explanation | None = None


class Hits(list):
    """A ranked list of :class:`Hit`; for a personalised search, ``personalised`` says whether the
    shopper's history shaped it (False: the anonymous answer, for a shopper the store does not know
    or while its profile store cannot be read). None where the endpoint does not say."""

    personalised: bool | None = None


class TensorResult(Protocol):
    """What :func:`parse_hits` needs from a tritonclient ``InferResult``."""

    def as_numpy(self, name: str) -> np.ndarray | None: ...


def _bytes_tensor(name: str, value: str | bytes, batched: bool = False) -> grpcclient.InferInput:
    """A BYTES [1] tensor ([1, 1] for a batching model); str is UTF-8 encoded, bytes are sent
    unchanged (raw bytes may be sent)."""
    if isinstance(value, str):
        data = value.encode("utf-8")
    elif isinstance(value, bytes):
        data = value
    else:
        raise TypeError(f"{name.lower()} must be str or bytes, not {type(value).__name__}")
    shape = [1, 1] if batched else [1]
    tensor = grpcclient.InferInput(name, shape, "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_).reshape(shape))
    return tensor


def _top_k_tensor(top_k: int, batched: bool = False) -> grpcclient.InferInput:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise TypeError(f"top_k must be an int, not {type(top_k).__name__}")
    if not _INT32.min <= top_k <= _INT32.max:
        # Not a range check on the value's meaning: numpy would silently wrap it around.
        raise OverflowError(f"top_k={top_k} does not fit in INT32")
    return _value_tensor("TOP_K", top_k, "INT32", np.int32, batched)


@dataclass(frozen=True)
class Filters:
    """What a search or recommendation may return: only products in stock, within a price range
    (leave either end None), in a category path (``"Tools"``, ``"Tools / Power Tools"``) or below
    it. The store's catalogue must have the columns filtered on (``in_stock``, ``price``,
    ``category``). The default filters nothing (and sends no input)."""

    in_stock: bool = False
    price_min: float | None = None
    price_max: float | None = None
    category: str | None = None


@dataclass(frozen=True)
class Exposure:
    """An exposure-aware answer (docs/fairness.md): the top k drawn from the ranker's own
    probabilities (``"plackett-luce"``) at ``temperature`` (the store's default when None; lower
    stays closer to the ranker's order), reproducibly with ``seed``; ``"off"`` asks for the
    ranker's own order even where the store draws by default."""

    mode: str = "plackett-luce"
    temperature: float | None = None
    seed: int | None = None


def _value_tensor(
    name: str, value: object, datatype: str, dtype: type, batched: bool
) -> grpcclient.InferInput:
    shape = [1, 1] if batched else [1]
    tensor = grpcclient.InferInput(name, shape, datatype)
    tensor.set_data_from_numpy(np.array([value], dtype=dtype).reshape(shape))
    return tensor


def _filter_inputs(filters: Filters, batched: bool) -> list[grpcclient.InferInput]:
    inputs = []
    if filters.in_stock:
        inputs.append(_value_tensor("IN_STOCK", True, "BOOL", np.bool_, batched))
    for name, price in (("PRICE_MIN", filters.price_min), ("PRICE_MAX", filters.price_max)):
        if price is None:
            continue
        if isinstance(price, bool) or not isinstance(price, (int, float, np.number)):
            raise TypeError(f"{name.lower()} must be a number, not {type(price).__name__}")
        inputs.append(_value_tensor(name, price, "FP32", np.float32, batched))
    if filters.category is not None:
        inputs.append(_bytes_tensor("CATEGORY", filters.category, batched))
    return inputs


def _exposure_inputs(exposure: Exposure, batched: bool) -> list[grpcclient.InferInput]:
    inputs = [_bytes_tensor("EXPOSURE", exposure.mode, batched)]
    if exposure.temperature is not None:
        inputs.append(
            _value_tensor("TEMPERATURE", exposure.temperature, "FP32", np.float32, batched)
        )
    if exposure.seed is not None:
        inputs.append(_value_tensor("SEED", exposure.seed, "INT64", np.int64, batched))
    return inputs


def build_inputs(
    query: str | bytes,
    top_k: int,
    user_id: str | bytes | None = None,
    batched: bool = False,
    filters: Filters | None = None,
    exposure: Exposure | None = None,
    explain: bool = False,
) -> list[grpcclient.InferInput]:
    """The search request: QUERY and TOP_K (shape [1], or [1, 1] for a model that batches, like
    ``search``), USER_ID when personalised, the filters' and exposure's inputs, and EXPLAIN."""
    inputs = [_bytes_tensor("QUERY", query, batched), _top_k_tensor(top_k, batched)]
    if user_id is not None:
        inputs.append(_bytes_tensor("USER_ID", user_id, batched))
    if filters is not None:
        inputs.extend(_filter_inputs(filters, batched))
    if exposure is not None:
        inputs.extend(_exposure_inputs(exposure, batched))
    if explain:
        inputs.append(_value_tensor("EXPLAIN", True, "BOOL", np.bool_, batched))
    return inputs


def build_recommend_inputs(
    user_id: str | bytes,
    top_k: int,
    new_only: bool = False,
    filters: Filters | None = None,
    explain: bool = False,
) -> list[grpcclient.InferInput]:
    """The recommend request: USER_ID and TOP_K (shape [1]), NEW_ONLY for discovery, the
    filters' inputs, and EXPLAIN."""
    inputs = [_bytes_tensor("USER_ID", user_id), _top_k_tensor(top_k)]
    if new_only:
        inputs.append(_value_tensor("NEW_ONLY", True, "BOOL", np.bool_, batched=False))
    if filters is not None:
        inputs.extend(_filter_inputs(filters, batched=False))
    if explain:
        inputs.append(_value_tensor("EXPLAIN", True, "BOOL", np.bool_, batched=False))
    return inputs


EVENTS_MODEL_NAME = "events"
FORGET_MODEL_NAME = "forget"


@dataclass(frozen=True)
class Event:
    """One thing a shopper did. ``event_id`` makes a retry count once (a fresh UUID by default);
    ``timestamp`` is in epoch seconds (now by default)."""

    user_id: str
    product_id: int
    event: str
    timestamp: float = field(default_factory=time.time)
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    basket_id: str = ""

    def __post_init__(self) -> None:
        """A wrong type fails here, naming the field, rather than deep in request building."""
        for name in ("user_id", "event", "event_id", "basket_id"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, not {type(getattr(self, name)).__name__}")
        for name, kinds, noun in (
            ("product_id", (int, np.integer), "an int"),
            ("timestamp", (int, float, np.integer, np.floating), "a number of epoch seconds"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise TypeError(f"{name} must be {noun}, not {type(value).__name__}")


def _array_tensor(name: str, values: np.ndarray, datatype: str) -> grpcclient.InferInput:
    """A [1, n] tensor: the events model batches requests, so each carries a batch dimension."""
    tensor = grpcclient.InferInput(name, [1, len(values)], datatype)
    tensor.set_data_from_numpy(values.reshape(1, -1))
    return tensor


def _utf8(values: Sequence[str]) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_)


def build_event_inputs(events: Sequence[Event]) -> list[grpcclient.InferInput]:
    """The events request: the batch as parallel arrays (validated by the server, all or nothing)."""
    inputs = [
        _array_tensor("USER_IDS", _utf8([e.user_id for e in events]), "BYTES"),
        _array_tensor("PRODUCT_IDS", np.array([e.product_id for e in events], np.int64), "INT64"),
        _array_tensor("EVENT_TYPES", _utf8([e.event for e in events]), "BYTES"),
        _array_tensor("TIMESTAMPS", np.array([e.timestamp for e in events], np.float64), "FP64"),
        _array_tensor("EVENT_IDS", _utf8([e.event_id for e in events]), "BYTES"),
    ]
    if any(e.basket_id for e in events):
        inputs.append(_array_tensor("BASKET_IDS", _utf8([e.basket_id for e in events]), "BYTES"))
    return inputs


CATALOGUE_MODEL_NAME = "catalogue"


@dataclass(frozen=True)
class ProductChange:
    """One product of a catalogue update: its whole new state (an attribute left None is
    unknown), or its removal (``delete=True``, title unused)."""

    product_id: int
    title: str = ""
    price: float | None = None
    in_stock: bool | None = None
    category: str = ""
    delete: bool = False


@dataclass(frozen=True)
class CatalogueApplied:
    """The answer to a catalogue update: how many products it changed, and whether it was a
    retry of an update applied before (then nothing changed again)."""

    applied: int
    duplicate: bool


def build_catalogue_inputs(
    update_id: str, changes: Sequence[ProductChange]
) -> list[grpcclient.InferInput]:
    """The catalogue request: the update id and one row per product (validated by the server,
    all or nothing)."""
    return [
        _array_tensor("UPDATE_ID", _utf8([update_id]), "BYTES"),
        _array_tensor(
            "OPERATIONS", _utf8(["delete" if c.delete else "upsert" for c in changes]), "BYTES"
        ),
        _array_tensor("PRODUCT_IDS", np.array([c.product_id for c in changes], np.int64), "INT64"),
        _array_tensor("TITLES", _utf8([c.title for c in changes]), "BYTES"),
        _array_tensor(
            "PRICES",
            np.array([np.nan if c.price is None else c.price for c in changes], np.float64),
            "FP64",
        ),
        _array_tensor(
            "IN_STOCK",
            np.array([-1 if c.in_stock is None else int(c.in_stock) for c in changes], np.int32),
            "INT32",
        ),
        _array_tensor("CATEGORIES", _utf8([c.category for c in changes]), "BYTES"),
    ]


def _catalogue_applied(result: TensorResult) -> CatalogueApplied:
    applied, duplicate = result.as_numpy("APPLIED"), result.as_numpy("DUPLICATE")
    if applied is None or duplicate is None:
        raise SearchError("response is missing output APPLIED or DUPLICATE")
    return CatalogueApplied(int(applied.reshape(-1)[0]), bool(duplicate.reshape(-1)[0]))


def _accepted(result: TensorResult) -> int:
    accepted = result.as_numpy("ACCEPTED")
    if accepted is None:
        raise SearchError("response is missing output ACCEPTED")
    return int(accepted.reshape(-1)[0])


def _forgotten(result: TensorResult) -> bool:
    forgotten = result.as_numpy("FORGOTTEN")
    if forgotten is None:
        raise SearchError("response is missing output FORGOTTEN")
    return bool(forgotten.reshape(-1)[0])


def parse_hits(result: TensorResult) -> Hits:
    """Turn the PRODUCT_IDS / SCORES / TITLES outputs (and PERSONALISED, when asked) into ranked
    hits."""
    arrays = []
    for name in OUTPUT_NAMES:
        array = result.as_numpy(name)
        if array is None:
            raise SearchError(f"response is missing output {name}")
        arrays.append(array.reshape(-1))
    ids, scores, titles = arrays
    if not len(ids) == len(scores) == len(titles):
        raise SearchError(
            f"response outputs differ in length: {len(ids)} ids, {len(scores)} scores, "
            f"{len(titles)} titles"
        )
    explanations = result.as_numpy(EXPLANATIONS_OUTPUT)
    if explanations is None:
        explained: list[Explanation | None] = [None] * len(ids)
    else:
        explained = [Explanation.from_json(e) for e in explanations.reshape(-1)]
        if len(explained) != len(ids):
            raise SearchError(f"response has {len(explained)} explanations for {len(ids)} hits")
    hits = Hits(
        Hit(
            rank=rank,
            product_id=int(product_id),
            score=float(score),
            title=title.decode("utf-8", errors="replace"),
            explanation=explanation,
        )
        for rank, (product_id, score, title, explanation) in enumerate(
            zip(ids, scores, titles, explained, strict=True), start=1
        )
    )
    personalised = result.as_numpy(PERSONALISED_OUTPUT)
    if personalised is not None:
        hits.personalised = bool(personalised.reshape(-1)[0])
    return hits


def _event(
    user_id: str, product_id: int, event: str, timestamp: float | None, event_id: str | None
) -> Event:
    return Event(
        user_id,
        product_id,
        event,
        time.time() if timestamp is None else timestamp,
        event_id or uuid.uuid4().hex,
    )


def _not_ready(exc: InferenceServerException) -> bool:
    """Answer a failed readiness probe: False when the server can't be reached, else raise."""
    error = map_error(exc)
    if isinstance(error, (ServerUnavailableError, RequestTimeoutError)):
        return False
    raise error from exc


def _check_max_in_flight(max_in_flight: int) -> None:
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")


# The keys of Triton's restricted protocols, by name; gRPC carries each in a header of that name
# prefixed with "triton-grpc-protocol-".
INFERENCE_KEY_NAME = "shopserve-inference-key"  # when the server requires one for inference
ADMIN_KEY_NAME = "shopserve-admin-key"  # model control, repository index, logging, tracing
INFERENCE_KEY_HEADER = f"triton-grpc-protocol-{INFERENCE_KEY_NAME}"
ADMIN_KEY_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_NAME}"
ADMIN_KEY_PARAMETER = "admin_key"  # forget: the operator's key, checked by the model


@dataclass(frozen=True)
class Security:
    """TLS and keys of a connection. ``root_certificates``, ``private_key`` and
    ``certificate_chain`` are PEM file paths (the last two for servers that check client
    certificates); ``inference_key`` is sent with every request when the server requires it;
    ``admin_key`` authorises ``forget``."""

    ssl: bool = False
    root_certificates: str | None = None
    private_key: str | None = None
    certificate_chain: str | None = None
    inference_key: str | None = None
    admin_key: str | None = None

    def __post_init__(self) -> None:
        files = (self.root_certificates, self.private_key, self.certificate_chain)
        if not self.ssl and any(files):
            raise ValueError(
                "certificates are for TLS: give ssl=True (a plaintext channel would ignore them)"
            )
        if bool(self.private_key) != bool(self.certificate_chain):
            raise ValueError("a client certificate needs both private_key and certificate_chain")

    def channel(self) -> dict:
        """Keyword arguments of tritonclient's InferenceServerClient."""
        if not self.ssl:
            return {}
        return {
            "ssl": True,
            "root_certificates": self.root_certificates,
            "private_key": self.private_key,
            "certificate_chain": self.certificate_chain,
        }


# Events are idempotent by event id (an Event gets a fresh one when made, and keeps it), so sending the
# same events again after a transient failure counts them once: record and record_many retry those
# failures, with exponential backoff.
RECORD_ATTEMPTS = 4
RECORD_FIRST_BACKOFF_S = 0.05


def _retry_delays(attempts: int = RECORD_ATTEMPTS) -> list[float]:
    """The pauses between attempts: 0.05, 0.2, 0.8 s ..."""
    return [RECORD_FIRST_BACKOFF_S * 4**n for n in range(attempts - 1)]


def _retryable(error: SearchError, pauses_left: int) -> bool:
    return error.retryable and pauses_left > 0


class _ClientSettings:
    def __init__(
        self,
        url: str | Sequence[str],
        model_name: str,
        timeout: float,
        recommend_model: str,
        security: Security | None,
    ) -> None:
        self.url = url
        self.security = security or Security()
        # one address as given; several: one gRPC channel over the replicas (see _replicas)
        self._target, self._replica_options = replica_channel(url, self.security.ssl)
        self.model_name = model_name
        self.recommend_model = recommend_model
        self.timeout = timeout
        self._batching: dict[str, bool] = {}  # model -> whether its requests carry a batch dim

    def _channel_options(self) -> dict:
        """Keyword arguments of tritonclient's InferenceServerClient besides the target."""
        return {**self.security.channel(), **self._replica_options}

    def _infer_options(
        self,
        timeout: float | None,
        outputs: Sequence[str] | None = OUTPUT_NAMES,
        admin: bool = False,
    ) -> dict:
        """Keyword arguments of every infer call: the outputs (None: all the model has), the
        deadline in seconds, and the same deadline for the server (microseconds), which drops a
        request whose caller has given up before computing it."""
        seconds = self.timeout if timeout is None else timeout
        options = {
            "outputs": None
            if outputs is None
            else [grpcclient.InferRequestedOutput(name) for name in outputs],
            "client_timeout": seconds,
            "timeout": max(int(seconds * 1e6), 1),
        }
        if self.security.inference_key:
            options["headers"] = {INFERENCE_KEY_HEADER: self.security.inference_key}
        if admin:
            if not self.security.admin_key:
                raise ValueError("forget needs the operator's key: Security(admin_key=...)")
            options["parameters"] = {ADMIN_KEY_PARAMETER: self.security.admin_key}
        return options

    def _probe_options(self) -> dict:
        options: dict = {"client_timeout": self.timeout}
        if self.security.inference_key:
            options["headers"] = {INFERENCE_KEY_HEADER: self.security.inference_key}
        return options

    # Every request either client sends is built here, once: model, inputs, options, parser.
    def _search_call(
        self,
        query: str | bytes,
        top_k: int,
        timeout: float | None,
        user_id: str | bytes | None,
        batched: bool,
        filters: Filters | None = None,
        exposure: Exposure | None = None,
        explain: bool = False,
    ) -> _Call:
        inputs = build_inputs(query, top_k, user_id, batched, filters, exposure, explain)
        # Every output the endpoint has: PERSONALISED where it has one (stores built before it
        # have not, and asking for it by name would fail there).
        return _Call(self.model_name, inputs, self._infer_options(timeout, None), parse_hits)

    def _recommend_call(
        self,
        user_id: str | bytes,
        top_k: int,
        timeout: float | None,
        new_only: bool,
        filters: Filters | None = None,
        explain: bool = False,
    ) -> _Call:
        inputs = build_recommend_inputs(user_id, top_k, new_only, filters, explain)
        # Every output: EXPLANATIONS comes only when asked for (stores built before it have not).
        return _Call(self.recommend_model, inputs, self._infer_options(timeout, None), parse_hits)

    def _events_call(self, events: Sequence[Event], timeout: float | None) -> _Call:
        options = self._infer_options(timeout, ["ACCEPTED"])
        return _Call(EVENTS_MODEL_NAME, build_event_inputs(events), options, _accepted)

    def _catalogue_call(
        self, update_id: str, changes: Sequence[ProductChange], timeout: float | None
    ) -> _Call:
        options = self._infer_options(
            timeout, ["APPLIED", "DUPLICATE"], admin=bool(self.security.admin_key)
        )
        inputs = build_catalogue_inputs(update_id, changes)
        return _Call(CATALOGUE_MODEL_NAME, inputs, options, _catalogue_applied)

    def _forget_call(self, user_id: str | bytes, timeout: float | None) -> _Call:
        options = self._infer_options(timeout, ["FORGOTTEN"], admin=True)
        inputs = [_bytes_tensor("USER_ID", user_id)]
        return _Call(FORGET_MODEL_NAME, inputs, options, _forgotten)


@dataclass(frozen=True)
class _Call:
    """One request as both clients send it, and how its answer is read."""

    model: str
    inputs: list[grpcclient.InferInput]
    options: dict
    parse: Callable[[TensorResult], Any]


class SearchClient(_ClientSettings):
    """Blocking client over tritonclient.grpc; safe to share between threads.

    ``url`` is one server's ``host:port``, or several (a list, or commas between them): replicas
    of one store, balanced and failed over by gRPC (see _replicas). ``timeout`` (seconds) is the
    deadline of each request sent: ``record_many`` and ``update_catalogue`` may send one up to four
    times (retries of transient failures), so they can take about four times as long.
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        model_name: str = DEFAULT_MODEL_NAME,
        timeout: float = 5.0,
        recommend_model: str = RECOMMEND_MODEL_NAME,
        security: Security | None = None,
    ) -> None:
        super().__init__(url, model_name, timeout, recommend_model, security)
        self._client = grpcclient.InferenceServerClient(self._target, **self._channel_options())

    def ready(self) -> bool:
        """True when the server is live and ready and the model is ready."""
        try:
            return bool(
                self._client.is_server_live(**self._probe_options())
                and self._client.is_server_ready(**self._probe_options())
                and self._client.is_model_ready(self.model_name, **self._probe_options())
            )
        except InferenceServerException as exc:
            return _not_ready(exc)

    def search(
        self,
        query: str | bytes,
        top_k: int = 10,
        timeout: float | None = None,
        user_id: str | bytes | None = None,
        filters: Filters | None = None,
        exposure: Exposure | None = None,
        explain: bool = False,
    ) -> Hits:
        """Return the top_k hits; a str query is UTF-8 encoded, bytes are sent unchanged. With
        ``user_id`` the answer is personalised for that shopper; with ``filters``, only products
        that pass them (fewer than top_k only when fewer pass); with ``exposure``, the top k drawn
        from the ranker's probabilities; with ``explain``, each hit's ``explanation`` (the
        ``search`` endpoint only)."""
        batched = self._batched(self.model_name)
        call = self._search_call(
            query, top_k, timeout, user_id, batched, filters, exposure, explain
        )
        return self._send(call)

    def recommend(
        self,
        user_id: str | bytes,
        top_k: int = 10,
        timeout: float | None = None,
        new_only: bool = False,
        filters: Filters | None = None,
        explain: bool = False,
    ) -> Hits:
        """Return the shopper's top_k recommendations (popular items for an unknown shopper);
        with ``new_only``, only products they never bought; with ``filters``, only products
        that pass them; with ``explain``, each hit's ``explanation``."""
        call = self._recommend_call(user_id, top_k, timeout, new_only, filters, explain)
        return self._send(call)

    def record(
        self,
        user_id: str,
        product_id: int,
        event: str,
        timestamp: float | None = None,
        event_id: str | None = None,
        timeout: float | None = None,
    ) -> int:
        """Record one event; returns 1, or 0 when its ``event_id`` was recorded before. It is
        durable when this returns."""
        return self.record_many([_event(user_id, product_id, event, timestamp, event_id)], timeout)

    def record_many(self, events: Sequence[Event], timeout: float | None = None) -> int:
        """Record a batch (all or nothing); returns how many events were new. Transient failures
        (unreachable, overloaded, deadline) are retried with the same event ids, so they count
        once."""
        return self._send_with_retries(self._events_call(events, timeout))

    def forget(self, user_id: str | bytes, timeout: float | None = None) -> bool:
        """Erase everything stored about a shopper (needs the operator's key, ``admin_key``);
        returns whether there was anything."""
        return self._send(self._forget_call(user_id, timeout))

    def update_catalogue(
        self,
        changes: Sequence[ProductChange],
        update_id: str | None = None,
        timeout: float | None = None,
    ) -> CatalogueApplied:
        """Upsert and delete products (all or nothing), durable and visible to the next search
        when this returns. Transient failures are retried under the same ``update_id`` (a fresh
        UUID by default), so the update applies once."""
        call = self._catalogue_call(update_id or uuid.uuid4().hex, changes, timeout)
        return self._send_with_retries(call)

    def _batched(self, model: str) -> bool:
        """Whether ``model`` batches (its inputs then carry a batch dimension): asked once."""
        if model not in self._batching:
            try:
                config = self._client.get_model_config(model, **self._probe_options())
            except InferenceServerException as exc:
                raise map_error(exc) from exc
            self._batching[model] = config.config.max_batch_size > 0
        return self._batching[model]

    def _send(self, call: _Call) -> Any:
        try:
            return call.parse(self._client.infer(call.model, call.inputs, **call.options))
        except InferenceServerException as exc:
            raise map_error(exc) from exc

    def _send_with_retries(self, call: _Call) -> Any:
        """Send ``call``, again after each transient failure (its ids make a retry count once)."""
        pauses = _retry_delays()
        while True:
            try:
                return self._send(call)
            except SearchError as exc:
                if not _retryable(exc, len(pauses)):
                    raise
                time.sleep(pauses.pop(0))

    def search_many(
        self,
        queries: Sequence[str | bytes],
        top_k: int = 10,
        timeout: float | None = None,
        max_in_flight: int = 4,
    ) -> list[list[Hit]]:
        """Search all queries with up to ``max_in_flight`` requests outstanding at once.

        Results come back in input order. After the first failure no further requests are
        sent; the in-flight ones are awaited and then that first error is raised.
        """
        _check_max_in_flight(max_in_flight)
        batched = self._batched(self.model_name)
        requests = [self._search_call(q, top_k, timeout, None, batched) for q in queries]
        results: list[list[Hit]] = [[] for _ in requests]
        failures: list[Exception] = []
        slots = threading.Semaphore(max_in_flight)

        def on_done(
            index: int,
            result: grpcclient.InferResult | None,
            error: InferenceServerException | None,
        ) -> None:
            # Runs on a gRPC thread: record everything, the caller's thread raises it.
            try:
                if error is None:
                    results[index] = parse_hits(result)
                else:
                    failures.append(map_error(error))
            except Exception as exc:
                failures.append(exc)
            finally:
                slots.release()

        for index, call in enumerate(requests):
            slots.acquire()
            if failures:
                slots.release()
                break
            try:
                self._client.async_infer(
                    call.model, call.inputs, partial(on_done, index), **call.options
                )
            except InferenceServerException as exc:
                slots.release()
                failures.append(map_error(exc))
                break
        for _ in range(max_in_flight):  # wait until every request in flight has finished
            slots.acquire()
        if failures:
            raise failures[0]
        return results

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncSearchClient(_ClientSettings):
    """asyncio client over tritonclient.grpc.aio, for use from a single event loop.

    The gRPC channel is opened on first use rather than in the constructor, because grpc.aio
    channels are bound to the event loop that is running when they are created.
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        model_name: str = DEFAULT_MODEL_NAME,
        timeout: float = 5.0,
        recommend_model: str = RECOMMEND_MODEL_NAME,
        security: Security | None = None,
    ) -> None:
        super().__init__(url, model_name, timeout, recommend_model, security)
        self._client: aio_grpcclient.InferenceServerClient | None = None

    def _triton(self) -> aio_grpcclient.InferenceServerClient:
        if self._client is None:
            self._client = aio_grpcclient.InferenceServerClient(
                self._target, **self._channel_options()
            )
        return self._client

    async def ready(self) -> bool:
        """True when the server is live and ready and the model is ready."""
        client = self._triton()
        try:
            return bool(
                await client.is_server_live(**self._probe_options())
                and await client.is_server_ready(**self._probe_options())
                and await client.is_model_ready(self.model_name, **self._probe_options())
            )
        except InferenceServerException as exc:
            return _not_ready(exc)

    async def search(
        self,
        query: str | bytes,
        top_k: int = 10,
        timeout: float | None = None,
        user_id: str | bytes | None = None,
        filters: Filters | None = None,
        exposure: Exposure | None = None,
        explain: bool = False,
    ) -> Hits:
        """Return the top_k hits; a str query is UTF-8 encoded, bytes are sent unchanged. With
        ``user_id`` the answer is personalised for that shopper; with ``filters``, only products
        that pass them (fewer than top_k only when fewer pass); with ``exposure``, the top k drawn
        from the ranker's probabilities; with ``explain``, each hit's ``explanation`` (the
        ``search`` endpoint only)."""
        batched = await self._batched(self.model_name)
        call = self._search_call(
            query, top_k, timeout, user_id, batched, filters, exposure, explain
        )
        return await self._send(call)

    async def recommend(
        self,
        user_id: str | bytes,
        top_k: int = 10,
        timeout: float | None = None,
        new_only: bool = False,
        filters: Filters | None = None,
        explain: bool = False,
    ) -> Hits:
        """Return the shopper's top_k recommendations (popular items for an unknown shopper);
        with ``new_only``, only products they never bought; with ``filters``, only products
        that pass them; with ``explain``, each hit's ``explanation``."""
        call = self._recommend_call(user_id, top_k, timeout, new_only, filters, explain)
        return await self._send(call)

    async def search_many(
        self,
        queries: Sequence[str | bytes],
        top_k: int = 10,
        timeout: float | None = None,
        max_in_flight: int = 4,
    ) -> list[list[Hit]]:
        """Search all queries with up to ``max_in_flight`` requests outstanding at once.

        Results come back in input order; on the first failure the remaining requests are
        cancelled and that error is raised.
        """
        _check_max_in_flight(max_in_flight)
        batched = await self._batched(self.model_name)
        requests = [self._search_call(q, top_k, timeout, None, batched) for q in queries]
        slots = asyncio.Semaphore(max_in_flight)

        async def bounded(call: _Call) -> list[Hit]:
            async with slots:
                return await self._send(call)

        tasks = [asyncio.ensure_future(bounded(call)) for call in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except SearchError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def record(
        self,
        user_id: str,
        product_id: int,
        event: str,
        timestamp: float | None = None,
        event_id: str | None = None,
        timeout: float | None = None,
    ) -> int:
        """Record one event; returns 1, or 0 when its ``event_id`` was recorded before."""
        return await self.record_many(
            [_event(user_id, product_id, event, timestamp, event_id)], timeout
        )

    async def record_many(self, events: Sequence[Event], timeout: float | None = None) -> int:
        """Record a batch (all or nothing); returns how many events were new. Transient failures
        (unreachable, overloaded, deadline) are retried with the same event ids, so they count
        once."""
        return await self._send_with_retries(self._events_call(events, timeout))

    async def forget(self, user_id: str | bytes, timeout: float | None = None) -> bool:
        """Erase everything stored about a shopper (needs the operator's key, ``admin_key``);
        returns whether there was anything."""
        return await self._send(self._forget_call(user_id, timeout))

    async def update_catalogue(
        self,
        changes: Sequence[ProductChange],
        update_id: str | None = None,
        timeout: float | None = None,
    ) -> CatalogueApplied:
        """Upsert and delete products (all or nothing); see SearchClient.update_catalogue."""
        call = self._catalogue_call(update_id or uuid.uuid4().hex, changes, timeout)
        return await self._send_with_retries(call)

    async def _batched(self, model: str) -> bool:
        """Whether ``model`` batches (its inputs then carry a batch dimension): asked once."""
        if model not in self._batching:
            try:
                config = await self._triton().get_model_config(model, **self._probe_options())
            except InferenceServerException as exc:
                raise map_error(exc) from exc
            self._batching[model] = config.config.max_batch_size > 0
        return self._batching[model]

    async def _send(self, call: _Call) -> Any:
        try:
            return call.parse(await self._triton().infer(call.model, call.inputs, **call.options))
        except InferenceServerException as exc:
            raise map_error(exc) from exc

    async def _send_with_retries(self, call: _Call) -> Any:
        """Send ``call``, again after each transient failure (its ids make a retry count once)."""
        pauses = _retry_delays()
        while True:
            try:
                return await self._send(call)
            except SearchError as exc:
                if not _retryable(exc, len(pauses)):
                    raise
                await asyncio.sleep(pauses.pop(0))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> AsyncSearchClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
