"""Typed errors raised by the search clients, and the mapping from tritonclient errors."""

from __future__ import annotations

from tritonclient.utils import InferenceServerException


class SearchError(Exception):
    """Base class of every error the search clients raise.

    ``message`` is the server's (or gRPC's) text; ``status`` is the gRPC status string such as
    ``"StatusCode.INVALID_ARGUMENT"``, or None when the error did not come from an RPC.
    """

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class InvalidRequestError(SearchError):
    """The server rejected the request (gRPC INVALID_ARGUMENT)."""


class ServerUnavailableError(SearchError):
    """The server cannot be reached, or the model is missing or not ready."""


class RequestTimeoutError(SearchError):
    """The request did not complete within the client timeout (gRPC DEADLINE_EXCEEDED)."""


_ERROR_BY_STATUS: dict[str, type[SearchError]] = {
    "StatusCode.INVALID_ARGUMENT": InvalidRequestError,
    "StatusCode.UNAVAILABLE": ServerUnavailableError,
    "StatusCode.NOT_FOUND": ServerUnavailableError,
    "StatusCode.DEADLINE_EXCEEDED": RequestTimeoutError,
}


def map_error(exc: InferenceServerException) -> SearchError:
    """Translate a tritonclient exception into the matching :class:`SearchError` subclass."""
    status = exc.status()
    error_type = _ERROR_BY_STATUS.get(status or "", SearchError)
    return error_type(exc.message() or status or "search request failed", status)
