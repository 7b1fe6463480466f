"""Client for the shopserve product search served by Triton (the ``search`` ensemble).

Only numpy and tritonclient are needed; the public API is re-exported here from private modules.
"""

from ._client import AsyncSearchClient, Hit, SearchClient
from ._errors import (
    InvalidRequestError,
    RequestTimeoutError,
    SearchError,
    ServerUnavailableError,
    map_error,
)

__all__ = [
    "AsyncSearchClient",
    "Hit",
    "InvalidRequestError",
    "RequestTimeoutError",
    "SearchClient",
    "SearchError",
    "ServerUnavailableError",
    "map_error",
]
