"""The search graph's step logic, in plain Python and numpy.

Each step (tokenize, encode, retrieve + fuse, rank, post-process) is a small class that the Triton
``model.py`` adapters wrap and that :class:`SearchPipeline` composes in-process, so the same graph runs
locally (for tests, evaluation and as the reference for the server) and inside Triton.
"""

from .features import FEATURE_NAMES
from .pipeline import SearchPipeline, SearchResult
from .validation import MAX_QUERY_BYTES, MAX_TOP_K, InvalidRequest

__all__ = [
    "FEATURE_NAMES",
    "MAX_QUERY_BYTES",
    "MAX_TOP_K",
    "InvalidRequest",
    "SearchPipeline",
    "SearchResult",
]
