"""A source over a recorded Kafka log that reads like the topic it was recorded from.

The contract (after bytewax's partitioned input) is small, and a Kafka source keeps the same one:

    source.list_parts()                        the partitions, 0..num_partitions-1
    part = source.build_part(p, resume_offset)  resume state = the next offset to read (None: earliest)
    batch = part.next_batch(max_events)         up to max_events records, in offset order
    part.snapshot()                             the next offset: store it, resume from it

A batch holds the partition's next `max_events` records (fewer only at the end of the log), with
the offsets, timestamps, keys and values a broker read of the same topic gives, so code under
test cannot tell the two apart. An empty batch means the partition is caught up.

    >>> from streaming.log_source import LogSource
    >>> src = LogSource(".state/logs/ml-100k.parquet")
    >>> part = src.build_part(0, resume_offset=None)
    >>> batch = part.next_batch(1000)
    >>> batch.offsets[:3].tolist(), part.snapshot()
    ([0, 1, 2], 1000)

Resume semantics follow a Kafka consumer with `auto_offset_reset="earliest"`: an offset below the
partition's first offset starts at the first one, an offset inside a gap starts at the next record.
An offset past the partition's end (its high watermark) is refused: that resume state belongs to
a different log.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from streaming.events import ActionVocab, DecodeConfig, decode_values
from streaming.recorded_log import LOG_SCHEMA, RecordedLog, read_log


class LogSourceError(ValueError):
    """A partition or resume offset that the log cannot serve."""


@dataclass(frozen=True)
class KafkaBatch:
    """Consecutive records of one partition: what one poll of one partition returns.

    offsets and timestamps_ms are int64 numpy arrays; keys and values are binary Arrow arrays.
    """

    topic: str
    partition: int
    offsets: np.ndarray
    timestamps_ms: np.ndarray
    keys: pa.Array
    values: pa.Array

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def next_offset(self) -> int | None:
        """The offset after the last record (None for an empty batch)."""
        return int(self.offsets[-1]) + 1 if len(self.offsets) else None

    def to_table(self) -> pa.Table:
        """The batch as rows of the recorded-log schema."""
        n = len(self)
        return pa.Table.from_arrays(
            [
                pa.array([self.topic] * n, type=pa.string()),
                pa.array(np.full(n, self.partition, dtype=np.int32)),
                pa.array(self.offsets, type=pa.int64()),
                pa.array(self.timestamps_ms, type=pa.int64()),
                self.keys.cast(pa.binary()),
                self.values.cast(pa.binary()),
            ],
            schema=LOG_SCHEMA,
        )

    def decode(
        self, *, vocab: ActionVocab, now_ms: int | None = None, config: DecodeConfig = DecodeConfig()
    ) -> tuple[pa.Table, pa.Table]:
        """decode_values on this batch's values (see streaming/events.py)."""
        return decode_values(self.values, self.partition, self.offsets, vocab=vocab, now_ms=now_ms, config=config)


def empty_batch(topic: str, partition: int) -> KafkaBatch:
    return KafkaBatch(
        topic=topic,
        partition=partition,
        offsets=np.zeros(0, dtype=np.int64),
        timestamps_ms=np.zeros(0, dtype=np.int64),
        keys=pa.array([], type=pa.binary()),
        values=pa.array([], type=pa.binary()),
    )


class LogPartition:
    """One partition of a log, positioned at its next offset. Build it with LogSource.build_part."""

    def __init__(self, topic: str, partition: int, rows: pa.Table, resume_offset: int | None) -> None:
        self.topic = topic
        self.partition = partition
        self._table = rows
        self._offsets = rows.column("offset").to_numpy()
        self._timestamps = rows.column("timestamp_ms").to_numpy()
        self.low_watermark = int(self._offsets[0]) if len(self._offsets) else 0
        self.high_watermark = int(self._offsets[-1]) + 1 if len(self._offsets) else 0
        if resume_offset is None:
            resume_offset = self.low_watermark
        if isinstance(resume_offset, bool) or not isinstance(resume_offset, (int, np.integer)):
            raise LogSourceError(f"resume offset {resume_offset!r} must be an integer offset or None")
        if resume_offset > self.high_watermark:
            raise LogSourceError(
                f"resume offset {resume_offset} is past the end of {self.topic}[{partition}] "
                f"(high watermark {self.high_watermark}): the resume state belongs to another log; "
                "start from None (earliest) or an offset of this log"
            )
        self._next_offset = max(int(resume_offset), self.low_watermark)
        self._pos = int(np.searchsorted(self._offsets, self._next_offset, side="left"))

    def next_batch(self, max_events: int) -> KafkaBatch:
        """The next up to `max_events` records; empty when the partition is caught up."""
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
            raise LogSourceError(f"max_events ({max_events!r}) must be an integer >= 1")
        lo, hi = self._pos, min(self._pos + max_events, len(self._offsets))
        if lo >= hi:
            return empty_batch(self.topic, self.partition)
        part = self._table.slice(lo, hi - lo)
        batch = KafkaBatch(
            topic=self.topic,
            partition=self.partition,
            offsets=self._offsets[lo:hi].copy(),
            timestamps_ms=self._timestamps[lo:hi].copy(),
            keys=part.column("key").combine_chunks(),
            values=part.column("value").combine_chunks(),
        )
        self._pos = hi
        self._next_offset = int(self._offsets[hi - 1]) + 1
        return batch

    def snapshot(self) -> int:
        """The resume state: the next offset to read."""
        return self._next_offset

    def lag(self) -> int:
        """Records left to read."""
        return len(self._offsets) - self._pos


class LogSource:
    """A recorded log (file path or RecordedLog) served partition by partition."""

    def __init__(self, log: RecordedLog | str | Path) -> None:
        self.log = log if isinstance(log, RecordedLog) else read_log(log)
        self.topic = self.log.topic
        self.num_partitions = self.log.num_partitions
        self._rows: dict[int, pa.Table] = {}

    def list_parts(self) -> list[int]:
        return list(range(self.num_partitions))

    def build_part(self, partition: int, resume_offset: int | None = None) -> LogPartition:
        if partition not in range(self.num_partitions):
            raise LogSourceError(
                f"partition {partition!r} does not exist in {self.topic!r}: it has partitions "
                f"0..{self.num_partitions - 1}"
            )
        if partition not in self._rows:  # split once; every later build of the partition shares it
            rows = self.log.partition_rows(partition)
            table = self.log.table if len(rows) == len(self.log) else self.log.table.take(pa.array(rows))
            self._rows[partition] = table.combine_chunks()
        return LogPartition(self.topic, partition, self._rows[partition], resume_offset)

    def end_offsets(self) -> dict[int, int]:
        """Each partition's high watermark (last offset + 1; 0 when empty), like KafkaConsumer.end_offsets."""
        part = self.log.table.column("partition").to_numpy()
        offs = self.log.table.column("offset").to_numpy()
        high = np.zeros(self.num_partitions, dtype=np.int64)
        np.maximum.at(high, part, offs + 1)
        return {p: int(h) for p, h in enumerate(high)}
