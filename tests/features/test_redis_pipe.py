"""features/redis_pipe.py against a private redis-server: RESP packing, pipelined replies in order
(across many 1 KiB feeds), error replies raised only after every reply is read, and a dropped
connection that is reopened."""

from __future__ import annotations

import socket
import threading

import pytest
import redis

from features.redis_pipe import RedisBusyError, RedisPipe, RedisReplyError, resp_bulk, resp_command


def _pipe(address: str) -> RedisPipe:
    host, _, port = address.rpartition(":")
    return RedisPipe(host, int(port), timeout_s=10)


def test_resp_packing_matches_redis_py():
    args = [b"HSET", b"k\r\n%", b"", bytes(range(256))]
    assert resp_command(args) == b"".join(redis.connection.Connection().pack_command(*args))
    assert resp_bulk(b"ab") == b"$2\r\nab\r\n"


def test_many_pipelined_replies_come_back_in_order(redis_address):
    pipe = _pipe(redis_address)
    n = 3_000
    big = bytes(range(256)) * 20  # 5 KiB values: each reply spans several feeds
    sets = b"".join(resp_command([b"SET", b"key%d" % i, b"%d:" % i + big]) for i in range(n))
    assert pipe.round_trip(sets, n) == [b"OK"] * n
    gets = b"".join(resp_command([b"GET", b"key%d" % i]) for i in range(n))
    replies = pipe.round_trip(gets, n)
    assert replies == [b"%d:" % i + big for i in range(n)]
    hm = pipe.round_trip(resp_command([b"HSET", b"h", b"a", b"1"]) + resp_command([b"HMGET", b"h", b"a", b"b"]), 2)
    assert hm == [1, [b"1", None]]  # a missing field is None
    pipe.close()


def test_an_error_reply_is_raised_after_every_reply_is_read(redis_address):
    pipe = _pipe(redis_address)
    payload = (
        resp_command([b"SET", b"s", b"x"])
        + resp_command([b"HSET", b"s", b"f", b"v"])  # WRONGTYPE
        + resp_command([b"SET", b"after", b"y"])
    )
    with pytest.raises(RedisReplyError, match="1 of 3 commands failed.*WRONGTYPE"):
        pipe.round_trip(payload, 3)
    # The commands around the error ran, and the connection is still in step.
    assert pipe.round_trip(resp_command([b"GET", b"after"]), 1) == [b"y"]


def test_a_dropped_connection_raises_then_reconnects(redis_address):
    pipe = _pipe(redis_address)
    assert pipe.round_trip(resp_command([b"CLIENT", b"SETNAME", b"bulk"]), 1) == [b"OK"]
    host, _, port = redis_address.rpartition(":")
    admin = redis.Redis(host=host, port=int(port))
    admin.client_kill_filter(_type="normal", skipme=True)
    with pytest.raises(ConnectionError):  # what the streaming job retries
        pipe.round_trip(resp_command([b"PING"]), 1)
    assert pipe.round_trip(resp_command([b"PING"]), 1) == [b"PONG"]  # a fresh connection


def test_a_loading_server_is_a_retryable_connection_error():
    """A restarted Redis answers -LOADING while it reads its data back: the job must retry that
    (RedisBusyError is a ConnectionError), not fail as it does on a real error reply."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(1 << 16)
            conn.sendall(b"-LOADING Redis is loading the dataset in memory\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(RedisBusyError, match="LOADING") as exc:
            RedisPipe("127.0.0.1", port, timeout_s=10).round_trip(resp_command([b"PING"]), 1)
        assert isinstance(exc.value, ConnectionError)
    finally:
        thread.join(timeout=10)
        server.close()


def test_an_unreachable_server_is_a_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(ConnectionError):
        RedisPipe("127.0.0.1", port, timeout_s=5).round_trip(resp_command([b"PING"]), 1)
