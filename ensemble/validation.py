"""Request validation shared by the Triton adapters and the in-process pipeline."""

from __future__ import annotations

import html
import re

import numpy as np

MAX_QUERY_BYTES = 1024
"""Longest accepted query, in UTF-8 bytes. Longer text is rejected; accepted text that tokenizes past
the encoder's maximum length is truncated, never rejected."""

MIN_TOP_K = 1
MAX_TOP_K = 100


class InvalidRequest(ValueError):
    """The request is malformed; the message names the problem (served as INVALID_ARGUMENT)."""


def decode_text(raw: object, name: str, limit: int) -> str:
    """Return the text of one BYTES element of input ``name``, or raise InvalidRequest naming the
    problem (the messages never echo the text: it may be personal)."""
    if isinstance(raw, np.ndarray):
        if raw.size != 1:
            raise InvalidRequest(f"{name} must hold exactly one string, got {raw.size}")
        raw = raw.reshape(-1)[0]
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    if not isinstance(raw, bytes):
        raise InvalidRequest(f"{name} must be a UTF-8 string, got {type(raw).__name__}")
    if len(raw) > limit:
        raise InvalidRequest(
            f"{name} is {len(raw)} bytes long; the limit is {limit} bytes of UTF-8"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from exc
    if not text.strip():
        raise InvalidRequest(f"{name} is empty or whitespace only")
    return text


def has_word(text: str) -> bool:
    """Whether ``text`` holds a letter or a digit (of any script): a query or title of symbols and
    emoji alone has nothing the encoder or the BM25 index can read, and would match arbitrary
    titles (its every token unknown to the encoder)."""
    return any(char.isalnum() for char in text)


_CHARACTER_REFERENCE = re.compile(
    r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});"
)


def plain_text(text: str) -> str:
    """``text`` with its HTML character references ("&amp;", "&#39;", "&quot;") decoded.
    Catalogues exported from a web shop's pages often hold them (1,240 Home Depot titles do): a
    shopper should read "Lil' Doll", not "Lil&#39; Doll", and BM25 should not read "&amp;" as the
    word "amp" that "15 amp" asks for. Only complete references, ending in ';', are decoded
    ("AT&T" and "R&D" are left alone), and only once."""
    if "&" not in text:
        return text
    return _CHARACTER_REFERENCE.sub(lambda match: html.unescape(match.group()), text)


def decode_query(raw: object) -> str:
    query = decode_text(raw, "QUERY", MAX_QUERY_BYTES)
    if not has_word(query):
        raise InvalidRequest("QUERY has no letter or digit: nothing to search for")
    return query


def decode_number(raw: object, name: str, integer: bool) -> int | float:
    """The one number of a [1] input, as a Python int (``integer``) or float, or raise
    InvalidRequest naming the problem."""
    noun, kind = ("integer", "an integer") if integer else ("number", "a float")
    if isinstance(raw, np.ndarray):
        if raw.size != 1:
            raise InvalidRequest(f"{name} must hold exactly one {noun}, got {raw.size}")
        if not np.issubdtype(raw.dtype, np.integer if integer else np.floating):
            raise InvalidRequest(f"{name} must be {kind}, got {raw.dtype}")
        raw = raw.reshape(-1)[0].item()
    if isinstance(raw, bool) or not isinstance(raw, int if integer else int | float):
        raise InvalidRequest(
            f"{name} must be {'an integer' if integer else 'a number'}, got {type(raw).__name__}"
        )
    return raw


def check_top_k(raw: object) -> int:
    """Return TOP_K as an int in [MIN_TOP_K, MAX_TOP_K], or raise InvalidRequest."""
    top_k = decode_number(raw, "TOP_K", integer=True)
    if not MIN_TOP_K <= top_k <= MAX_TOP_K:
        raise InvalidRequest(f"TOP_K must be between {MIN_TOP_K} and {MAX_TOP_K}, got {top_k}")
    return top_k


MAX_USER_ID_BYTES = 256


def decode_user_id(raw: object) -> str:
    return decode_text(raw, "USER_ID", MAX_USER_ID_BYTES)


def check_flag(raw: object, name: str) -> bool:
    """An optional BOOL [1] input: False when absent."""
    if raw is None:
        return False
    if isinstance(raw, np.ndarray):
        if raw.size != 1:
            raise InvalidRequest(f"{name} must hold exactly one boolean, got {raw.size}")
        if raw.dtype != np.bool_:
            raise InvalidRequest(f"{name} must be a boolean, got {raw.dtype}")
        raw = bool(raw.reshape(-1)[0])
    if not isinstance(raw, bool):
        raise InvalidRequest(f"{name} must be a boolean, got {type(raw).__name__}")
    return raw
