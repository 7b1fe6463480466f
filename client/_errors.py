"""Typed errors raised by the search clients, and the mapping from tritonclient errors."""

from __future__ import annotations

from tritonclient.utils import InferenceServerException


class SearchError(Exception):
    """Base class of every error the search clients raise.

    ``message`` is the server's (or gRPC's) text; ``status`` is the gRPC status string such as
    ``"StatusCode.INVALID_ARGUMENT"``, or None when the error did not come from an RPC.
    """

    retryable = False  # whether sending the same request again later may succeed
    hint = ""  # what the server's message leaves out, added to it

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class InvalidRequestError(SearchError):
    """The server rejected the request (gRPC INVALID_ARGUMENT)."""


class ServerUnavailableError(SearchError):
    """The server cannot be reached, or the model is missing or not ready."""

    retryable = True


class ModelNotServedError(ServerUnavailableError):
    """The server does not serve the model asked for: its store was built without it. Asking this
    server again does not help."""

    retryable = False
    hint = (
        "this server's store has no such model: one built without --events serves no recommend, "
        "events or forget"
    )


class OverloadedError(ServerUnavailableError):
    """The server is past its capacity and refused the request at once (its queue was full):
    retry after a pause, or elsewhere."""


class RequestTimeoutError(SearchError):
    """The request did not complete within the client timeout (gRPC DEADLINE_EXCEEDED, or the
    server dropped it when that deadline passed while it waited)."""

    retryable = True


class PermissionDeniedError(SearchError):
    """The server requires a key this client did not send, or sent wrong."""


_ERROR_BY_STATUS: dict[str, type[SearchError]] = {
    "StatusCode.INVALID_ARGUMENT": InvalidRequestError,
    "StatusCode.UNAVAILABLE": ServerUnavailableError,
    "StatusCode.NOT_FOUND": ServerUnavailableError,
    "StatusCode.DEADLINE_EXCEEDED": RequestTimeoutError,
    "StatusCode.RESOURCE_EXHAUSTED": OverloadedError,
    "StatusCode.PERMISSION_DENIED": PermissionDeniedError,
    "StatusCode.UNAUTHENTICATED": PermissionDeniedError,
}


def map_error(exc: InferenceServerException) -> SearchError:
    """Translate a tritonclient exception into the matching :class:`SearchError` subclass."""
    status = exc.status()
    message = exc.message() or status or "search request failed"
    error_type = _ERROR_BY_STATUS.get(status or "", SearchError)
    # Where no status code tells them apart, the message does: Triton answers UNAVAILABLE when a
    # model is down, when it sheds load, when a request's deadline passed in its queue and when a
    # restricted protocol's key is missing; a model cannot answer PERMISSION_DENIED, so forget
    # refuses a missing or wrong operator's key with INVALID_ARGUMENT naming it.
    lowered = message.lower()
    for text, specific in _BY_MESSAGE:
        if text in lowered:
            error_type = specific
    return error_type(f"{message} ({error_type.hint})" if error_type.hint else message, status)


_BY_MESSAGE: tuple[tuple[str, type[SearchError]], ...] = (
    ("exceeds maximum queue size", OverloadedError),
    # "Request for unknown model: 'recommend' is not found": the launcher loads a store's models
    # once, at start, so the model will not appear later
    ("' is not found", ModelNotServedError),
    ("request timeout expired", RequestTimeoutError),
    ("this protocol is restricted", PermissionDeniedError),
    ("operator's key", PermissionDeniedError),
)
