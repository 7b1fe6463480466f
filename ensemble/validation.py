"""Request validation shared by the Triton adapters and the in-process pipeline."""

from __future__ import annotations

import numpy as np

MAX_QUERY_BYTES = 1024
"""Longest accepted query, in UTF-8 bytes. Longer text is rejected; accepted text that tokenizes past
the encoder's maximum length is truncated, never rejected."""

MIN_TOP_K = 1
MAX_TOP_K = 100


class InvalidRequest(ValueError):
    """The request is malformed; the message names the problem (served as INVALID_ARGUMENT)."""


def decode_query(raw: object) -> str:
    """Return the query text from one BYTES element, or raise InvalidRequest."""
    if isinstance(raw, np.ndarray):
        if raw.size != 1:
            raise InvalidRequest(f"QUERY must hold exactly one string, got {raw.size}")
        raw = raw.reshape(-1)[0]
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    if not isinstance(raw, bytes):
        raise InvalidRequest(f"QUERY must be a UTF-8 string, got {type(raw).__name__}")
    if len(raw) > MAX_QUERY_BYTES:
        raise InvalidRequest(
            f"QUERY is {len(raw)} bytes long; the limit is {MAX_QUERY_BYTES} bytes of UTF-8"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"QUERY is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from exc
    if not text.strip():
        raise InvalidRequest("QUERY is empty or whitespace only")
    return text


def check_top_k(raw: object) -> int:
    """Return TOP_K as an int in [MIN_TOP_K, MAX_TOP_K], or raise InvalidRequest."""
    if isinstance(raw, np.ndarray):
        if raw.size != 1:
            raise InvalidRequest(f"TOP_K must hold exactly one integer, got {raw.size}")
        if not np.issubdtype(raw.dtype, np.integer):
            raise InvalidRequest(f"TOP_K must be an integer, got {raw.dtype}")
        raw = raw.reshape(-1)[0].item()
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise InvalidRequest(f"TOP_K must be an integer, got {type(raw).__name__}")
    if not MIN_TOP_K <= raw <= MAX_TOP_K:
        raise InvalidRequest(f"TOP_K must be between {MIN_TOP_K} and {MAX_TOP_K}, got {raw}")
    return raw
