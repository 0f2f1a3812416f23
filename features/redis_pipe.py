"""A raw, pipelined connection to Redis for bulk commands: send many, read every reply.

`features/online_rows.py` writes and reads a micro-batch's users as one native command each
(tens of thousands per call). redis-py reads each reply through several layers of Python calls;
here the replies of a round trip go through one hiredis reader, fed at most 1 KiB at a time and
drained after every feed. The feed size matters: hiredis drops consumed input by moving the
unconsumed rest to the front of its buffer, so one feed of a whole multi-MB reply stream costs a
copy of the rest per reply (50k HMGET replies, 11 MB: ~2 s, against ~0.03-0.08 s for feeds of
256 B to 64 KiB, on the 2-core box).

    >>> pipe = RedisPipe("127.0.0.1", 6379)
    >>> pipe.round_trip(resp_command([b"SET", b"k", b"v"]) + resp_command([b"GET", b"k"]), 2)
    [b'OK', b'v']
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable

_FEED = 1024  # bytes handed to hiredis per feed (see the module docstring)
_RECV = 1 << 20


class RedisReplyError(RuntimeError):
    """A command of a pipelined round trip got an error reply (all its replies were read)."""


class RedisAuthError(RedisReplyError):
    """The server refused the AUTH command (wrong password or user): never retried."""


class RedisBusyError(RedisReplyError, ConnectionError):
    """Error replies that say "not now" (a server loading its data after a restart, a failover):
    a ConnectionError, so callers that retry connection failures retry these too."""


_TRANSIENT = ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN")


def resp_bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def resp_command(args: list[bytes]) -> bytes:
    """One Redis command in RESP, every argument a bulk string: what redis-py's `pack_command`
    sends for bytes arguments."""
    return b"*%d\r\n" % len(args) + b"".join([resp_bulk(a) for a in args])


class RedisPipe:
    """One TCP connection to a Redis server, opened on first use and reopened after a failure.

    tls: wrap the connection in this TLS context (features/redis_security.py `ssl_context`).
    auth: returns the AUTH command to send first on every new connection, or None; called at
      connect time, so the password is read then and kept nowhere here.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout_s: float = 60.0,
        tls: ssl.SSLContext | None = None,
        auth: Callable[[], list[bytes] | None] | None = None,
    ) -> None:
        self.address = (host, port)
        self.timeout_s = timeout_s
        self._tls = tls
        self._auth = auth
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection(self.address, timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                if self._tls is not None:
                    sock = self._tls.wrap_socket(sock, server_hostname=self.address[0])
                command = self._auth() if self._auth is not None else None
                if command is not None:
                    self._authenticate(sock, command)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def _authenticate(self, sock: socket.socket, command: list[bytes]) -> None:
        import hiredis

        sock.sendall(resp_command(command))
        reader = hiredis.Reader()
        while (reply := reader.gets()) is False:
            data = sock.recv(_RECV)
            if not data:
                raise ConnectionError(f"redis at {self.address[0]}:{self.address[1]} closed the connection on AUTH")
            reader.feed(data)
        if isinstance(reply, hiredis.ReplyError):
            # The reply names the problem (WRONGPASS, or AUTH without a password configured), never the password.
            raise RedisAuthError(f"redis at {self.address[0]}:{self.address[1]} refused AUTH: {reply}")

    def round_trip(self, payload: bytes, num_replies: int) -> list:
        """Send `payload` (pipelined commands in RESP, any bytes-like object) and return its `num_replies` replies in
        order. Raises RedisReplyError, after reading every reply, when any is an error; on a
        connection failure the socket is dropped and a ConnectionError (or TimeoutError) raised,
        so the next call starts on a fresh connection rather than on a reply stream out of step.
        Error replies that mean "not now" (LOADING, BUSY, ...) raise RedisBusyError, also a
        ConnectionError."""
        import hiredis

        try:
            sock = self._connect()
            sock.sendall(payload)
            reader = hiredis.Reader()
            replies: list = []
            while len(replies) < num_replies:
                data = sock.recv(_RECV)
                if not data:
                    raise ConnectionError(f"redis at {self.address[0]}:{self.address[1]} closed the connection")
                view = memoryview(data)
                for start in range(0, len(view), _FEED):
                    reader.feed(view[start : start + _FEED])
                    while (reply := reader.gets()) is not False:
                        replies.append(reply)
            if len(replies) > num_replies or reader.has_data():
                raise ConnectionError(f"more than {num_replies} replies to {num_replies} commands: out of step")
        except (ConnectionError, TimeoutError):
            self.close()
            raise
        except ssl.SSLCertVerificationError:  # an OSError, but no retry fixes it
            self.close()
            raise
        except OSError as exc:  # unreachable host, name lookup, ...: a connection failure too
            self.close()
            raise ConnectionError(f"redis at {self.address[0]}:{self.address[1]}: {exc}") from exc
        except BaseException:
            self.close()
            raise
        errors = [r for r in replies if isinstance(r, hiredis.ReplyError)]
        if errors:
            kind = RedisBusyError if str(errors[0]).startswith(_TRANSIENT) else RedisReplyError
            raise kind(f"{len(errors)} of {num_replies} commands failed; the first: {errors[0]}")
        return replies

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
