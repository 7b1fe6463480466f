"""Connections to Redis through redis-py: ``redis://``, ``rediss://`` (TLS) and ``unix://``
locations, a password from the URL or a file, one bounded retry on a lost connection, and a
location as it may be logged (never the password).

redis-py imports :mod:`ssl`. Triton's Python backend stub embeds the system's ``libpython3.11``
and takes its standard library from the environment's ``python3``: an environment made from
another 3.11 build (pyenv's 3.11.7 here) fails inside the stub with ``_ssl...so: undefined
symbol: _PyModule_Add``. ``make install`` therefore makes the environment from the interpreter
the stub links (README, Installing pieces).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import redis

SCHEMES = ("redis", "rediss", "unix")


def is_redis(location: str) -> bool:
    """Whether a profile store's location names a Redis server."""
    return str(location).startswith(tuple(f"{scheme}://" for scheme in SCHEMES))


def public_location(location: str) -> str:
    """``location`` as it may be logged: a URL's password replaced by ``***``."""
    parts = urlsplit(str(location))
    if not parts.password:
        return str(location)
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(
    url: str, password: str | None = None, timeout: float = 10.0, ca_file: str | None = None
) -> redis.Redis:
    """A client for ``url`` (bytes replies). A command whose connection was lost (the server
    restarted, or dropped an idle client) is sent once more on a new connection; a timeout is
    not retried, and its connection is dropped so that no later command reads its late reply.
    ``ca_file`` verifies a ``rediss://`` server's certificate against that CA."""
    import redis  # here: a server on SQLite never loads redis-py (nor ssl)
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(
            f"{public_location(url)}: expected redis://host:port/db, rediss://host:port/db "
            "or unix:///path"
        )
    options: dict[str, object] = {}
    if password is not None:
        options["password"] = password
    if ca_file is not None:
        if scheme != "rediss":
            raise ValueError(f"{public_location(url)}: a CA file needs a rediss:// location")
        options["ssl_ca_certs"] = ca_file
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        **options,
    )
