"""Micro-batches: bounded offset ranges from the job's position to the current end, as Ray Datasets.

Both sources, the broker (`kafka://`) and a recorded log (`log://`), are planned the same way:
every partition's end is read once, and the batch takes each partition from the job's position
toward that end, capped at `max_events` in total (shared fairly among the partitions that have
events, so one busy partition cannot starve the others). `read` returns the batch as a Ray Dataset
of RECORD_SCHEMA blocks, one per partition.

    >>> rng = plan_range({0: 0, 1: 0}, {0: 500, 1: 20}, max_events=100)
    >>> rng.start, rng.end, rng.num_offsets
    ({0: 0, 1: 0}, {0: 80, 1: 20}, 100)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from streaming.config import StreamJobConfig
from streaming.kafka_source import RECORD_SCHEMA, KafkaSource
from streaming.log_source import LogPartition, LogSource
from streaming.offsets import Offsets


@dataclass(frozen=True)
class BatchRange:
    """Offsets [start[p], end[p]) of every partition p in the batch."""

    start: Offsets
    end: Offsets

    @property
    def num_offsets(self) -> int:
        return sum(self.end[p] - self.start[p] for p in self.start)

    def describe(self) -> str:
        return " ".join(
            f"p{p}:{self.start[p]}-{self.end[p]}" for p in sorted(self.start) if self.end[p] > self.start[p]
        )


def plan_range(position: Offsets, ends: Offsets, *, max_events: int) -> BatchRange | None:
    """The next batch from `position` toward `ends`, at most `max_events` offsets; None when caught up.

    The cap is water-filled: partitions with fewer events than an equal share take all of theirs,
    the rest split what is left.
    """
    avail = {p: max(0, ends.get(p, 0) - position.get(p, 0)) for p in ends}
    if sum(avail.values()) == 0:
        return None
    take = dict.fromkeys(avail, 0)
    budget = max_events
    todo = sorted((p for p in avail if avail[p] > 0), key=lambda p: avail[p])
    while todo and budget > 0:
        share = max(1, budget // len(todo))
        p = todo.pop(0)
        n = min(avail[p], share, budget)
        take[p] = n
        budget -= n
    start = {p: position.get(p, 0) for p in ends}
    return BatchRange(start=start, end={p: start[p] + take[p] for p in ends})


class MicroBatchSource(Protocol):
    """What the job needs of a source (both implementations below)."""

    topic: str
    description: str

    def list_parts(self) -> list[int]: ...

    def beginning_offsets(self) -> Offsets: ...

    def end_offsets(self) -> Offsets: ...

    def read(self, rng: BatchRange, transform=None): ...

    def check_complete(self, rng: BatchRange, records: pa.Table) -> None: ...

    def close(self) -> None: ...


class KafkaMicroBatches:
    """Micro-batches from a broker: one Ray read task per partition (streaming/kafka_source.py)."""

    def __init__(self, source: KafkaSource) -> None:
        self.source = source
        self.topic = source.topic
        self.description = f"kafka://{source.bootstrap}/{source.topic}"

    def list_parts(self) -> list[int]:
        return self.source.list_parts()

    def beginning_offsets(self) -> Offsets:
        return self.source.beginning_offsets()

    def end_offsets(self) -> Offsets:
        return self.source.end_offsets()

    def read(self, rng: BatchRange, transform=None):
        """The batch's records; `transform` (e.g. the decoder) runs inside the read tasks."""
        return self.source.read_ranges({p: (rng.start[p], rng.end[p]) for p in rng.start}, transform)

    def check_complete(self, rng: BatchRange, records: pa.Table) -> None:
        self.source.check_complete({p: (rng.start[p], rng.end[p]) for p in rng.start}, records)

    def close(self) -> None:
        self.source.close()


class LogMicroBatches:
    """Micro-batches from a recorded log: the partitions' slices put into Ray's object store."""

    def __init__(self, source: LogSource, description: str) -> None:
        self.source = source
        self.topic = source.topic
        self.description = description
        self._parts: dict[int, LogPartition] = {}

    def list_parts(self) -> list[int]:
        return self.source.list_parts()

    def beginning_offsets(self) -> Offsets:
        return {p: self.source.build_part(p, None).snapshot() for p in self.list_parts()}

    def end_offsets(self) -> Offsets:
        return self.source.end_offsets()

    def _slice(self, partition: int, start: int, end: int) -> pa.Table:
        part = self._parts.get(partition)
        if part is None or part.snapshot() != start:
            part = self._parts[partition] = self.source.build_part(partition, start)
        batch = part.next_batch(max(1, end - start))
        keep = int(np.searchsorted(batch.offsets, end, side="left"))  # offsets are increasing
        if keep < len(batch):  # a gap-free log never gets here; one with gaps may overshoot
            self._parts.pop(partition)
        n = keep
        return pa.Table.from_arrays(
            [
                pa.array(np.full(n, partition, dtype=np.int32)),
                pa.array(batch.offsets[:n]),
                pa.array(batch.timestamps_ms[:n]),
                batch.keys.slice(0, n).cast(pa.binary()),
                batch.values.slice(0, n).cast(pa.binary()),
            ],
            schema=RECORD_SCHEMA,
        )

    def read(self, rng: BatchRange, transform=None):
        """The batch's records, one block per partition; `transform` runs as a `map_batches` stage."""
        import ray.data

        tables = [self._slice(p, rng.start[p], rng.end[p]) for p in sorted(rng.start) if rng.end[p] > rng.start[p]]
        ds = ray.data.from_arrow(tables or [RECORD_SCHEMA.empty_table()])
        return ds if transform is None else ds.map_batches(transform, batch_format="pyarrow", batch_size=None)

    def check_complete(self, rng: BatchRange, records: pa.Table) -> None:
        pass  # slices of an in-memory log are complete by construction

    def close(self) -> None:
        self._parts.clear()


def collect(ds, schema: pa.Schema = RECORD_SCHEMA) -> pa.Table:
    """Execute a Ray Dataset and return its rows as one Arrow table (`schema` when it is empty)."""
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def open_source(config: StreamJobConfig) -> MicroBatchSource:
    """The micro-batch source that `config.source` names."""
    spec = config.source_spec()
    if spec.kind == "kafka":
        return KafkaMicroBatches(KafkaSource(spec.bootstrap, spec.topic, config.kafka))
    assert spec.path is not None
    return LogMicroBatches(LogSource(spec.path), description=config.source)


def source_end_offsets(config: StreamJobConfig) -> Offsets:
    """The current end of every partition of the job's source."""
    source = open_source(config)
    try:
        return dict(source.end_offsets())
    finally:
        source.close()


def read_valid_events(
    config: StreamJobConfig, start: Offsets, end: Offsets | None = None, *, max_events: int = 200_000
) -> pa.Table:
    """Every valid event at offsets [start[p], end[p]) of the job's source, decoded exactly as the
    job decodes them (EVENT_COLUMNS of streaming/decode.py, with partition and offset). `end`
    defaults to the partitions' current ends; partitions missing from `start` begin at their
    beginning. For a trainer re-reading what its checkpoint does not cover; dead letters are
    left out (they never reach a model). Reads `max_events` offsets per Ray Data pass."""
    import functools

    from streaming.decode import DECODED_SCHEMA, EVENT_COLUMNS, decode_block, split_decoded
    from streaming.events import DecodeConfig

    source = open_source(config)
    try:
        ends = source.end_offsets() if end is None else dict(end)
        begins = source.beginning_offsets()
        position = {p: max(int(start.get(p, begins[p])), begins[p]) for p in ends}
        decode = functools.partial(
            decode_block,
            actions=config.actions,
            decode=DecodeConfig(max_value_bytes=config.max_value_bytes, max_future_skew_ms=config.max_future_skew_ms),
        )
        parts = []
        while (rng := plan_range(position, ends, max_events=max_events)) is not None:
            decoded = collect(source.read(rng, decode), DECODED_SCHEMA)
            source.check_complete(rng, decoded)
            parts.append(split_decoded(decoded)[0])
            position = dict(rng.end)
    finally:
        source.close()
    empty = DECODED_SCHEMA.empty_table().select(EVENT_COLUMNS)
    return pa.concat_tables(parts) if parts else empty
