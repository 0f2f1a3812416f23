"""Secured servers for tests: a Kafka broker with a SASL_SSL listener and a Redis server with a
password and TLS, both on free ports of 127.0.0.1, with a throwaway CA made at test time
(infra/kafka/tls.py). Nothing here is a fixture: tests/infra/test_kafka_sasl.py and
tests/features/test_redis_security.py build their fixtures from it."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from config.paths import REPO_ROOT


def new_password() -> str:
    """A random password the local broker accepts (no JAAS or --add-scram syntax characters)."""
    return "pw" + secrets.token_hex(12)


@contextmanager
def _state_dir(path: Path) -> Iterator[None]:
    """HSTU_STATE_DIR moved for the duration: the broker module keeps its files there."""
    before = os.environ.get("HSTU_STATE_DIR")
    os.environ["HSTU_STATE_DIR"] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HSTU_STATE_DIR", None)
        else:
            os.environ["HSTU_STATE_DIR"] = before


@contextmanager
def sasl_broker(folder: Path, users: dict[str, str], certs) -> Iterator:
    """A second broker (its own state folder, the session broker untouched) whose client listener
    is SASL_SSL for `users` ({name: password}). Yields its BrokerInfo; stops it on exit."""
    from config.secrets import Secret
    from infra.kafka import broker

    state = folder / "state"
    # The resolved jar list is cached per state folder: reuse the checkout's instead of asking Maven.
    default = Path(os.environ.get("HSTU_STATE_DIR", REPO_ROOT / ".state")) / "kafka"
    (state / "kafka").mkdir(parents=True, exist_ok=True)
    for cached in default.glob("classpath-*.txt"):
        shutil.copy(cached, state / "kafka" / cached.name)
    security = broker.ListenerSecurity(
        users=tuple(broker.SaslUser(name=n, password=Secret(p)) for n, p in users.items()),
        tls_cert_file=certs.cert_file,
        tls_key_file=certs.key_file,
        tls_ca_file=certs.ca_file,
    )
    with _state_dir(state):
        info = broker.start(broker.BrokerConfig(port=0, security=security, heap_mb=384))
    try:
        yield info
    finally:
        with _state_dir(state):
            broker.stop()


@contextmanager
def serving_redis(server: subprocess.Popen, port: int, what: str = "redis-server") -> Iterator[str]:
    """Wait (20 s at most) until the started `server` accepts connections on `port`; yield its
    address; terminate it on exit."""
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"{what} on port {port} did not start") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=20)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def secured_redis(folder: Path, password: str, certs) -> Iterator[str]:
    """A redis-server that requires `password` and speaks only TLS (no client certificate asked);
    yields "127.0.0.1:PORT". The password reaches it through a config file of mode 0600."""
    binary = shutil.which("redis-server")
    if binary is None:
        import pytest

        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    port = _free_port()
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "redis.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(
            "\n".join(
                [
                    "port 0",
                    f"tls-port {port}",
                    "bind 127.0.0.1",
                    f"tls-cert-file {certs.cert_file}",
                    f"tls-key-file {certs.key_file}",
                    f"tls-ca-cert-file {certs.ca_file}",
                    "tls-auth-clients no",
                    f"requirepass {password}",
                    'save ""',
                    "appendonly no",
                    f"dir {folder}",
                    "",
                ]
            )
        )
    server = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with serving_redis(server, port, "redis-server (TLS)") as address:
        yield address
