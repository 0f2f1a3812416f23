"""Offsets: where the job resumes, and when it may say so.

Streaming state is offsets and watermarks (STYLE.md): a partition's only state is the next offset
to read. Two stores keep the committed offsets:

- `KafkaGroupOffsets` commits to the broker's consumer group (`group_id`), as any Kafka consumer
  does, so `kafka-consumer-groups --describe` shows the job's lag;
- `FileOffsets` keeps them in a JSON file (written to a temporary file, fsynced, renamed) for
  recorded-log sources, which have no broker.

`CommitFrontier` decides what may be committed. Micro-batches are registered in order with the
offsets they end at; each is marked durable (sequences in Feast, events in the offline store,
dead letters flushed). The frontier is the end of the longest prefix of durable batches, so a
commit never runs ahead of anything derived from the events, and a crash at any point replays
from the frontier:

    >>> f = CommitFrontier({0: 0, 1: 0})
    >>> f.add_batch(1, {0: 10, 1: 7}); f.add_batch(2, {0: 20, 1: 9})
    >>> f.mark_durable(2); f.committable() is None        # batch 1 first
    True
    >>> f.mark_durable(1); f.committable()
    {0: 20, 1: 9}
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from streaming.kafka_security import KafkaSecurityConfig, kafka_python_kwargs

log = logging.getLogger(__name__)

Offsets = dict[int, int]  # partition -> next offset to read


class OffsetStoreError(RuntimeError):
    """Committed offsets could not be read or written, or belong to another source."""


class OffsetStore(Protocol):
    """Where committed offsets live. `committed` returns only partitions that have an offset."""

    def committed(self, partitions: list[int]) -> Offsets: ...

    def commit(self, offsets: Offsets) -> None: ...

    def close(self) -> None: ...


class FileOffsets:
    """Committed offsets of one (source, group) in a JSON file, replaced atomically on commit.

    >>> import tempfile, pathlib
    >>> store = FileOffsets(pathlib.Path(tempfile.mkdtemp()) / "offsets.json", topic="engagements")
    >>> store.commit({0: 5, 1: 3}); store.committed([0, 1, 2])
    {0: 5, 1: 3}
    """

    def __init__(self, path: Path, *, topic: str) -> None:
        self.path = Path(path)
        self.topic = topic

    def _read(self) -> Offsets:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if data["topic"] != self.topic:
                raise OffsetStoreError(
                    f"{self.path} holds offsets of topic {data['topic']!r}, not {self.topic!r}: "
                    "use another group_id or state_dir for this source, or delete the file to start over"
                )
            return {int(p): int(o) for p, o in data["offsets"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise OffsetStoreError(f"{self.path} is not an offsets file ({exc!r}): delete it to start over") from None

    def committed(self, partitions: list[int]) -> Offsets:
        stored = self._read()
        return {p: stored[p] for p in partitions if p in stored}

    def commit(self, offsets: Offsets) -> None:
        merged = {**self._read(), **{int(p): int(o) for p, o in offsets.items()}}
        text = json.dumps(
            {
                "topic": self.topic,
                "offsets": {str(p): o for p, o in sorted(merged.items())},
                "committed_at": time.time(),
            }
        )
        write_atomic(self.path, text.encode())

    def close(self) -> None:
        pass


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a crash) sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class KafkaGroupOffsets:
    """Committed offsets of `topic` in the broker's consumer group `group_id`.

    The job assigns partitions itself (no group membership, no rebalances), so commits go to the
    group as a "simple consumer" commit, which the broker accepts while the group has no members.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group_id: str,
        *,
        request_timeout_ms: int = 15_000,
        security: KafkaSecurityConfig | None = None,
    ) -> None:
        from kafka import KafkaConsumer

        self.topic = topic
        self.group_id = group_id
        self.timeout_ms = request_timeout_ms
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            request_timeout_ms=max(request_timeout_ms, 11_000),
            reconnect_backoff_max_ms=1000,
            **kafka_python_kwargs(security),
        )

    def committed(self, partitions: list[int]) -> Offsets:
        from kafka.structs import TopicPartition

        out: Offsets = {}
        for p in partitions:
            value = self._consumer.committed(TopicPartition(self.topic, p), timeout_ms=self.timeout_ms)
            if value is not None and value >= 0:
                out[p] = int(value)
        return out

    def commit(self, offsets: Offsets) -> None:
        from kafka.structs import OffsetAndMetadata, TopicPartition

        if not offsets:
            return
        self._consumer.commit(
            {TopicPartition(self.topic, p): OffsetAndMetadata(int(o), "", -1) for p, o in offsets.items()},
            timeout_ms=self.timeout_ms,
        )

    def close(self) -> None:
        self._consumer.close(autocommit=False)


@dataclass
class _Pending:
    end: Offsets
    durable: bool = False


class CommitFrontier:
    """The offsets that may be committed: the end of the longest prefix of registered batches that
    are durable. (Training never holds a commit back: the trainer keeps its own offsets in its
    checkpoints, streaming/training_feed.py.)"""

    def __init__(self, start: Offsets) -> None:
        self._committed = dict(start)
        self._frontier = dict(start)
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._last_batch = -1

    def add_batch(self, batch_id: int, end: Offsets) -> None:
        if batch_id <= self._last_batch:
            raise ValueError(f"batch ids must increase: {batch_id} after {self._last_batch}")
        self._last_batch = batch_id
        self._pending[batch_id] = _Pending(end=dict(end))

    def mark_durable(self, batch_id: int) -> None:
        self._pending[batch_id].durable = True
        self._advance()

    def _advance(self) -> None:
        while self._pending:
            batch_id, pending = next(iter(self._pending.items()))
            if not pending.durable:
                return
            self._frontier.update(pending.end)
            self._pending.popitem(last=False)

    def committable(self) -> Offsets | None:
        """Offsets to commit now (only partitions that moved), or None when nothing moved."""
        moved = {p: o for p, o in self._frontier.items() if self._committed.get(p) != o}
        return moved or None

    def committed(self, offsets: Offsets) -> None:
        """Record a successful commit."""
        self._committed.update(offsets)

    @property
    def frontier(self) -> Offsets:
        return dict(self._frontier)

    @property
    def pending(self) -> int:
        """Batches applied but not yet committable."""
        return len(self._pending)
