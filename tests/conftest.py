"""Fixtures shared by every test package: the real Kafka broker and throwaway topics.

Broker tests need `python -m infra.kafka start` (`.ci/run` and `infra/test.sh` do it); without a
broker they fail with that instruction rather than skip, so a green run always means the broker
tests ran.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator

import pytest


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
