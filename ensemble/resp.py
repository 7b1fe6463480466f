"""A small blocking Redis client (RESP2 over TCP or a Unix socket): the commands the profile store
needs, pipelines and WATCH/MULTI/EXEC transactions.

Why not redis-py: it imports :mod:`ssl` unconditionally, and the Python that Triton's backend stub
embeds cannot load this machine's ``_ssl`` extension, so every model importing it failed to load.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from urllib.parse import urlparse, urlsplit, urlunsplit

Reply = bytes | int | list | str | None


class RespError(RuntimeError):
    """Redis answered a command with an error."""


def public_location(location: str) -> str:
    """``location`` as it may be logged: a URL's password replaced by ``***``."""
    parts = urlsplit(str(location))
    if not parts.password:
        return str(location)
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RespClient:
    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parsed = urlparse(url)
        self.url = public_location(url)  # for messages: never the password
        if parsed.scheme == "unix":
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._socket.settimeout(timeout)
            self._socket.connect(parsed.path)
            database = 0
        elif parsed.scheme == "redis":
            self._socket = socket.create_connection(
                (parsed.hostname or "127.0.0.1", parsed.port or 6379), timeout=timeout
            )
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            database = int(parsed.path.strip("/") or 0)
        else:
            raise ValueError(f"{self.url}: expected redis://host:port/db or unix:///path")
        self._buffer = self._socket.makefile("rb")
        if parsed.password:
            self.call("AUTH", parsed.password)
        if database:
            self.call("SELECT", database)

    @staticmethod
    def _encode(command: Sequence[object]) -> bytes:
        parts = [b"*%d\r\n" % len(command)]
        for argument in command:
            if isinstance(argument, bytes):
                data = argument
            elif isinstance(argument, str):
                data = argument.encode("utf-8")
            else:
                data = repr(argument).encode("ascii")
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(parts)

    def _read(self) -> Reply:
        line = self._buffer.readline()
        if not line:
            raise ConnectionError(f"{self.url} closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self._buffer.read(size + 2)
            return data[:-2]
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self._read() for _ in range(size)]
        raise ConnectionError(f"{self.url}: unexpected reply {line[:40]!r}")

    def pipeline(self, commands: Sequence[Sequence[object]]) -> list[Reply]:
        """Send every command, then read every reply; raise the first error."""
        self._socket.sendall(b"".join(self._encode(c) for c in commands))
        replies = [self._read() for _ in commands]
        for reply in replies:
            if isinstance(reply, RespError):
                raise reply
        return replies

    def call(self, *command: object) -> Reply:
        return self.pipeline([command])[0]

    def transaction(self, commands: Sequence[Sequence[object]]) -> list[Reply] | None:
        """MULTI ... EXEC; None when a WATCHed key changed (nothing was applied)."""
        replies = self.pipeline([("MULTI",), *commands, ("EXEC",)])
        return replies[-1]

    def close(self) -> None:
        self._buffer.close()
        self._socket.close()


def hash_reply(reply: Reply) -> dict[bytes, bytes]:
    """An HGETALL reply as a dict."""
    items = reply or []
    return dict(zip(items[::2], items[1::2], strict=True))
