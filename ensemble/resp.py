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
    """One connection, opened on first use and opened again after any failed exchange: a reply cut
    short (a timeout, a closed socket) would otherwise leave the next command reading the previous
    command's reply."""

    def __init__(self, url: str, timeout: float = 10.0, password: str | None = None) -> None:
        self._parsed = urlparse(url)
        self._password = password if password is not None else self._parsed.password
        self.url = public_location(url)  # for messages: never the password
        self.timeout = timeout
        if self._parsed.scheme not in ("unix", "redis"):
            raise ValueError(f"{self.url}: expected redis://host:port/db or unix:///path")
        self._socket: socket.socket | None = None
        self._buffer = None
        self._connect()

    def _connect(self) -> None:
        parsed = self._parsed
        if parsed.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(parsed.path)
        else:
            sock = socket.create_connection(
                (parsed.hostname or "127.0.0.1", parsed.port or 6379), timeout=self.timeout
            )
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket, self._buffer = sock, sock.makefile("rb")
        database = int(parsed.path.strip("/") or 0) if parsed.scheme == "redis" else 0
        if self._password:
            self.call("AUTH", self._password)
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
        """Send every command, then read every reply; raise the first error. A connection that
        failed is dropped and the error raised; one opened before that dies at once (the server
        restarted) is replaced and the commands sent once more (the profile store's writes are
        idempotent by event key)."""
        reused = self._socket is not None
        try:
            replies = self._exchange(commands)
        except TimeoutError:
            self.close()
            raise
        except OSError:
            self.close()
            if not reused:
                raise
            replies = self._exchange(commands)
        for reply in replies:
            if isinstance(reply, RespError):
                raise reply
        return replies

    def _exchange(self, commands: Sequence[Sequence[object]]) -> list[Reply]:
        try:
            if self._socket is None:
                self._connect()
            self._socket.sendall(b"".join(self._encode(c) for c in commands))
            return [self._read() for _ in commands]
        except OSError:
            self.close()
            raise

    def call(self, *command: object) -> Reply:
        return self.pipeline([command])[0]

    def transaction(self, commands: Sequence[Sequence[object]]) -> list[Reply] | None:
        """MULTI ... EXEC; None when a WATCHed key changed (nothing was applied). An error that
        Redis reports for any command inside the EXEC reply (WRONGTYPE, OOM ...) is raised."""
        replies = self.pipeline([("MULTI",), *commands, ("EXEC",)])
        for reply in replies[-1] or []:
            if isinstance(reply, RespError):
                raise reply
        return replies[-1]

    def close(self) -> None:
        if self._socket is not None:
            self._buffer.close()
            self._socket.close()
        self._socket = self._buffer = None


def hash_reply(reply: Reply) -> dict[bytes, bytes]:
    """An HGETALL reply as a dict."""
    items = reply or []
    return dict(zip(items[::2], items[1::2], strict=True))
