"""Fixtures shared by every test package: the real Kafka broker and throwaway topics, a private
redis-server, one local Ray instance.

Broker tests need `python -m infra.kafka start` (`.ci/run` and `infra/test.sh` do it); without a
broker they fail with that instruction rather than skip, so a green run always means the broker
tests ran.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.secured_servers import serving_redis


def _reachable(bootstrap: str) -> bool:
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """`host:port` of the running broker: `HSTU_KAFKA_BOOTSTRAP`, else the checkout's own broker."""
    from infra.kafka.broker import read_info

    bootstrap = os.environ.get("HSTU_KAFKA_BOOTSTRAP")
    if not bootstrap:
        info = read_info()
        bootstrap = info.bootstrap if info is not None else None
    if not bootstrap or not _reachable(bootstrap):
        pytest.fail(
            f"no Kafka broker answers ({bootstrap or 'none started'}): run `python -m infra.kafka start` "
            "first, or set HSTU_KAFKA_BOOTSTRAP=host:port"
        )
    return bootstrap


@pytest.fixture
def new_topic(kafka_bootstrap: str) -> Iterator[Callable[..., str]]:
    """Factory for uniquely named topics, deleted after the test: `name = new_topic(partitions=4)`."""
    from kafka import KafkaAdminClient

    from infra.kafka.broker import TopicSpec, ensure_topics

    created: list[str] = []

    def make(partitions: int = 1, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        ensure_topics(kafka_bootstrap, (TopicSpec(name=name, partitions=partitions),))
        created.append(name)
        return name

    yield make
    if created:
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            admin.delete_topics(created, timeout_ms=15000)
        finally:
            admin.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def redis_address(tmp_path) -> Iterator[str]:
    """`host:port` of a private redis-server on a free port (skips when redis-server is not installed)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    server = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with serving_redis(server, port) as address:
        yield address


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """The GCS address of one local Ray instance for the whole session (it takes seconds to start on
    a small machine), sized for two cores with more logical CPUs than cores; subprocess jobs join it."""
    import ray

    ray.init(
        num_cpus=4, object_store_memory=512 * 2**20, include_dashboard=False, namespace="hstu", log_to_driver=False
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
