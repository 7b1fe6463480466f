"""Client for shopserve served by Triton: search, recommendations, live events,
forget and catalogue updates.

Only numpy and tritonclient are needed; the public API is re-exported here from private modules.
"""

from shopserve.formats import EVENT_TYPES

from ._client import (
    AsyncSearchClient,
    CatalogueApplied,
    Event,
    Explanation,
    Exposure,
    Filters,
    Hit,
    Hits,
    ProductChange,
    Reason,
    SearchClient,
    Security,
)
from ._errors import (
    InvalidRequestError,
    ModelNotServedError,
    OverloadedError,
    PermissionDeniedError,
    RequestTimeoutError,
    SearchError,
    ServerUnavailableError,
    map_error,
)

__all__ = [
    "EVENT_TYPES",
    "AsyncSearchClient",
    "CatalogueApplied",
    "Event",
    "Explanation",
    "Exposure",
    "Filters",
    "Hit",
    "Hits",
    "InvalidRequestError",
    "ModelNotServedError",
    "OverloadedError",
    "PermissionDeniedError",
    "ProductChange",
    "Reason",
    "RequestTimeoutError",
    "SearchClient",
    "SearchError",
    "Security",
    "ServerUnavailableError",
    "map_error",
]
