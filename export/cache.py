"""Where the build keeps work it can reuse: results keyed by every input that shapes them, so a
rebuild of the same inputs skips the work (fine-tuning, the Q/DQ encoder graph)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CACHE_ENV = "SHOPSERVE_CACHE"


def cache_root(kind: str) -> Path:
    """$SHOPSERVE_CACHE/KIND, else ~/.cache/shopserve/KIND (XDG_CACHE_HOME honoured)."""
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shopserve"
    )
    return Path(base) / kind


def cache_key(*parts: object) -> str:
    """A short key over JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
