"""The Kafka source: bounded reads of offset ranges, per partition, as Ray Datasets.

It keeps the recorded-log source's contract (streaming/log_source.py), so the job and the tests
treat both alike:

    source.list_parts()                         the topic's partitions
    part = source.build_part(p, resume_offset)  resume state = next offset (None: earliest)
    batch = part.next_batch(max_events)         up to max_events records, in offset order
    part.snapshot()                             the next offset

and adds what a micro-batch needs: `end_offsets()` (the current end of every partition) and
`read_ranges({p: (start, end)})`, a Ray Dataset with one read task per partition that fetches
exactly the offsets [start, end) of each.

Three readers, chosen by `KafkaReadConfig.reader`, all one Ray Data read task per partition:

- "confluent-kafka" (default): `kafka_range_datasource` reading with confluent-kafka
  (`read_partition_range_confluent`): librdkafka parses the record batches in C. Bounded by the
  end offsets, a typed error when a partition makes no progress for `read_timeout_s`.
- "kafka-python": the same datasource on kafka-python (`read_partition_range`), whose
  pure-Python record parsing made it ~5x slower than confluent-kafka on the 2-core box
  (57k vs 300k records/s for one partition).
- "ray-read-kafka": Ray Data's own `ray.data.read_kafka`, given per-partition start and end
  offsets. It is built on confluent-kafka too, but builds a Python dict per record and adds a
  `map_batches` stage to reach RECORD_SCHEMA, so it measured slower than both. Two things it
  does differently are handled here: partitions missing from the offset dicts would be read
  from "earliest" to "latest", so every partition is listed; and with a timeout a read task
  returns what it got so far with only a warning, so `check_complete` refuses a batch whose
  partitions did not reach their end offsets (the batch is then retried) instead of committing
  past events never read.

Both yield RECORD_SCHEMA blocks (the recorded-log columns without the topic).

    >>> src = KafkaSource("127.0.0.1:9092", "engagements")
    >>> ends = src.end_offsets()
    >>> ds = src.read_ranges({p: (0, end) for p, end in ends.items()})
    >>> ds.count() == sum(ends.values())
    True
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from streaming.config import KafkaReadConfig
from streaming.kafka_security import KafkaAuthenticationError, confluent_config, kafka_python_kwargs

log = logging.getLogger(__name__)

# What every micro-batch source yields: the recorded-log columns without the (constant) topic.
RECORD_SCHEMA = pa.schema(
    [
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("timestamp_ms", pa.int64()),
        ("key", pa.binary()),
        ("value", pa.binary()),
    ]
)


class KafkaSourceError(RuntimeError):
    """A partition could not be read (no progress within the timeout, unknown topic or partition)."""


def _consumer(bootstrap: str, config: KafkaReadConfig):
    from kafka import KafkaConsumer

    return KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        check_crcs=config.check_crcs,
        max_partition_fetch_bytes=config.max_partition_fetch_bytes,
        fetch_max_bytes=max(64 * 1024 * 1024, config.max_partition_fetch_bytes),
        request_timeout_ms=max(config.request_timeout_ms, 11_000),
        reconnect_backoff_max_ms=1000,
        **kafka_python_kwargs(config.security),
    )


def records_table(partition: int, offsets: list[int], timestamps: list[int], keys: list, values: list) -> pa.Table:
    """The records of one partition, as parallel columns, as a RECORD_SCHEMA table."""
    return pa.Table.from_arrays(
        [
            pa.array(np.full(len(offsets), partition, dtype=np.int32)),
            pa.array(np.array(offsets, dtype=np.int64)),
            pa.array(np.array(timestamps, dtype=np.int64)),
            pa.array(keys, type=pa.binary()),
            pa.array(values, type=pa.binary()),
        ],
        schema=RECORD_SCHEMA,
    )


def read_partition_range(
    bootstrap: str, topic: str, partition: int, start: int, end: int, config: KafkaReadConfig
) -> pa.Table:
    """The records of offsets [start, end) of one partition, in offset order (RECORD_SCHEMA).

    Offsets without a record (transaction markers, compaction) are skipped. Raises
    KafkaSourceError when the partition makes no progress for `config.read_timeout_s`.
    """
    from kafka.structs import TopicPartition

    if start >= end:
        return RECORD_SCHEMA.empty_table()
    consumer = _consumer(bootstrap, config)
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        got: list = []
        position = start
        last_progress = time.monotonic()
        while position < end:
            polled = consumer.poll(timeout_ms=200, max_records=end - position).get(tp, [])
            if polled:
                last_progress = time.monotonic()
                if polled[-1].offset >= end:
                    polled = [r for r in polled if r.offset < end]
                    got.extend(polled)
                    break
                got.extend(polled)
                position = polled[-1].offset + 1
                continue
            # No record: either the range ends in offsets that hold none, or the broker is slow/away.
            position = max(position, consumer.position(tp, timeout_ms=config.request_timeout_ms) or position)
            if position < end and time.monotonic() - last_progress > config.read_timeout_s:
                raise KafkaSourceError(
                    f"{topic}[{partition}]: no record for {config.read_timeout_s:.0f} s at offset {position} "
                    f"(reading up to {end}); is the broker at {bootstrap} up?"
                )
        return records_table(
            partition, [r.offset for r in got], [r.timestamp for r in got], [r.key for r in got], [r.value for r in got]
        )
    finally:
        consumer.close(autocommit=False)


def _confluent_consumer(bootstrap: str, config: KafkaReadConfig, errors: list | None = None):
    """errors: gets the client's errors (error_cb), for the reader to see a refused login."""
    from confluent_kafka import Consumer

    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            # Required by the client even for assign(); never used: nothing is committed from here.
            "group.id": "hstu-range-reader",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "check.crcs": config.check_crcs,
            "max.partition.fetch.bytes": config.max_partition_fetch_bytes,
            "fetch.max.bytes": max(64 * 1024 * 1024, config.max_partition_fetch_bytes),
            "socket.timeout.ms": max(config.request_timeout_ms, 10_000),
            "reconnect.backoff.max.ms": 1000,
            "log_level": 3,  # errors only: a restarting broker is reported by our own timeout
            **({"error_cb": errors.append} if errors is not None else {}),
            **confluent_config(config.security),
        }
    )


def read_partition_range_confluent(
    bootstrap: str, topic: str, partition: int, start: int, end: int, config: KafkaReadConfig
) -> pa.Table:
    """`read_partition_range` on confluent-kafka (librdkafka parses the record batches in C,
    ~5x the kafka-python rate on the 2-core box); same contract, same errors."""
    from confluent_kafka import KafkaError, TopicPartition

    if start >= end:
        return RECORD_SCHEMA.empty_table()
    client_errors: list = []
    consumer = _confluent_consumer(bootstrap, config, client_errors)
    try:
        consumer.assign([TopicPartition(topic, partition, start)])
        offsets: list[int] = []
        stamps: list[int] = []
        keys: list = []
        values: list = []
        position = start
        last_progress = time.monotonic()
        while position < end:
            messages = consumer.consume(num_messages=min(end - position, 100_000), timeout=0.2)
            got = [m for m in messages if m.error() is None]
            for err in (m.error() for m in messages if m.error() is not None):
                # End of partition and transport errors are retried by the client (and bounded
                # by our timeout below); a missing topic or a fatal error is not.
                if err.fatal() or err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise KafkaSourceError(f"{topic}[{partition}]: {err.str()}")
            for err in client_errors:
                if err.code() == KafkaError._AUTHENTICATION:
                    raise KafkaAuthenticationError(
                        f"authentication failed reading {topic}[{partition}] from {bootstrap}: {err.str()}"
                    )
            if got:
                last_progress = time.monotonic()
                if got[-1].offset() >= end:
                    got = [m for m in got if m.offset() < end]
                offsets.extend([m.offset() for m in got])
                stamps.extend([m.timestamp()[1] for m in got])
                keys.extend([m.key() for m in got])
                values.extend([m.value() for m in got])
                position = max(position, offsets[-1] + 1) if got else end
                continue
            # No record: either the range ends in offsets that hold none, or the broker is slow/away.
            polled = consumer.position([TopicPartition(topic, partition)])[0].offset
            position = max(position, polled if polled >= 0 else position)
            if position < end and time.monotonic() - last_progress > config.read_timeout_s:
                raise KafkaSourceError(
                    f"{topic}[{partition}]: no record for {config.read_timeout_s:.0f} s at offset {position} "
                    f"(reading up to {end}); is the broker at {bootstrap} up?"
                )
        return records_table(partition, offsets, stamps, keys, values)
    finally:
        consumer.close()


def range_reader(config: KafkaReadConfig):
    """The function that reads one partition's range for `config.reader` (a range reader)."""
    return read_partition_range_confluent if config.reader == "confluent-kafka" else read_partition_range


def kafka_range_datasource(
    bootstrap: str, topic: str, ranges: dict[int, tuple[int, int]], config: KafkaReadConfig, transform=None
):
    """A Ray Data datasource reading offsets [start, end) of the given partitions, one task each
    (the class is defined here so that importing this module does not import Ray).

    transform: applied to each block inside the read task (the job decodes there: a separate
    `map_batches` stage costs seconds of scheduling per micro-batch on a small machine)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    read_range = range_reader(config)

    class _KafkaRangeDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_name(self) -> str:
            return "KafkaRange"

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list:
            tasks = []
            for partition, (start, end) in sorted(ranges.items()):
                if start >= end:
                    continue

                def read_fn(partition=partition, start=start, end=end) -> Iterable[pa.Table]:
                    block = read_range(bootstrap, topic, partition, start, end, config)
                    return [block if transform is None else transform(block)]

                meta = BlockMetadata(
                    num_rows=None, size_bytes=None, exec_stats=None, input_files=(f"kafka://{topic}/{partition}",)
                )
                tasks.append(
                    ReadTask(
                        read_fn,
                        meta,
                        schema=RECORD_SCHEMA if transform is None else None,
                        per_task_row_limit=per_task_row_limit,
                    )
                )
            return tasks

    return _KafkaRangeDatasource()


def from_read_kafka(block: pa.Table) -> pa.Table:
    """A `ray.data.read_kafka` block (offset, key, value, topic, partition, timestamp, ...) as RECORD_SCHEMA."""
    return pa.Table.from_arrays(
        [
            block.column("partition").cast(pa.int32()),
            block.column("offset").cast(pa.int64()),
            block.column("timestamp").cast(pa.int64()),
            block.column("key").cast(pa.binary()),
            block.column("value").cast(pa.binary()),
        ],
        schema=RECORD_SCHEMA,
    )


class KafkaPartition:
    """One partition of a topic, positioned at its next offset (LogPartition's broker twin)."""

    def __init__(self, source: KafkaSource, partition: int, resume_offset: int | None) -> None:
        self.source = source
        self.topic = source.topic
        self.partition = partition
        low = source.beginning_offsets()[partition]
        self._next_offset = low if resume_offset is None else max(int(resume_offset), low)

    def next_batch(self, max_events: int):
        """Up to `max_events` records from the next offset, as far as the partition's end now
        (a streaming.log_source.KafkaBatch, empty when the partition is caught up)."""
        from streaming.log_source import KafkaBatch, empty_batch

        end = min(self.source.end_offsets()[self.partition], self._next_offset + max_events)
        if end <= self._next_offset:
            return empty_batch(self.topic, self.partition)
        table = range_reader(self.source.config)(
            self.source.bootstrap, self.topic, self.partition, self._next_offset, end, self.source.config
        )
        self._next_offset = end
        return KafkaBatch(
            topic=self.topic,
            partition=self.partition,
            offsets=table.column("offset").to_numpy(),
            timestamps_ms=table.column("timestamp_ms").to_numpy(),
            keys=table.column("key").combine_chunks(),
            values=table.column("value").combine_chunks(),
        )

    def snapshot(self) -> int:
        return self._next_offset


class KafkaSource:
    """A topic on a broker, read in bounded offset ranges."""

    def __init__(self, bootstrap: str, topic: str, config: KafkaReadConfig = KafkaReadConfig()) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.config = config
        self._meta = None

    def _metadata_consumer(self):
        if self._meta is None:
            self._meta = _consumer(self.bootstrap, self.config)
        return self._meta

    def list_parts(self) -> list[int]:
        consumer = self._metadata_consumer()
        deadline = time.monotonic() + self.config.read_timeout_s
        while True:
            parts = consumer.partitions_for_topic(self.topic)
            if parts:
                return sorted(parts)
            if time.monotonic() > deadline:
                raise KafkaSourceError(
                    f"topic {self.topic!r} does not exist on {self.bootstrap}: create it "
                    "(python -m infra.kafka start creates `engagements`) or fix the source URL"
                )
            consumer.topics()  # refresh metadata
            time.sleep(0.2)

    def _tps(self) -> list:
        from kafka.structs import TopicPartition

        return [TopicPartition(self.topic, p) for p in self.list_parts()]

    def end_offsets(self) -> dict[int, int]:
        """Each partition's end (the offset the next produced record gets)."""
        ends = self._metadata_consumer().end_offsets(self._tps(), timeout_ms=self.config.request_timeout_ms)
        return {tp.partition: int(o) for tp, o in ends.items()}

    def beginning_offsets(self) -> dict[int, int]:
        begins = self._metadata_consumer().beginning_offsets(self._tps(), timeout_ms=self.config.request_timeout_ms)
        return {tp.partition: int(o) for tp, o in begins.items()}

    def build_part(self, partition: int, resume_offset: int | None = None) -> KafkaPartition:
        if partition not in self.list_parts():
            raise KafkaSourceError(f"topic {self.topic!r} has no partition {partition}; it has {self.list_parts()}")
        return KafkaPartition(self, partition, resume_offset)

    def read_ranges(self, ranges: dict[int, tuple[int, int]], transform=None):
        """A Ray Dataset of the records in [start, end) of each partition (RECORD_SCHEMA blocks),
        each block passed through `transform` (a picklable function of a table) when given."""
        import ray.data

        if self.config.reader in ("confluent-kafka", "kafka-python"):
            # One block per partition: left to itself, Ray Data splits a read into at least
            # `read_op_min_num_blocks` (200) blocks, which cost ~1 s per micro-batch here.
            tasks = max(1, sum(1 for start, end in ranges.values() if end > start))
            return ray.data.read_datasource(
                kafka_range_datasource(self.bootstrap, self.topic, dict(ranges), self.config, transform),
                override_num_blocks=tasks,
            )
        # read_kafka reads unlisted partitions from earliest to latest: list every one.
        ends = self.end_offsets() if set(ranges) != set(self.list_parts()) else {}
        full = {p: ranges.get(p, (ends.get(p, 0), ends.get(p, 0))) for p in self.list_parts()}
        ds = ray.data.read_kafka(
            topics=[self.topic],
            bootstrap_servers=self.bootstrap,
            start_offset={self.topic: {p: s for p, (s, _) in full.items()}},
            end_offset={self.topic: {p: e for p, (_, e) in full.items()}},
            timeout_ms=int(self.config.read_timeout_s * 1000),
            override_num_blocks=len(full),
        )
        ds = ds.map_batches(from_read_kafka, batch_format="pyarrow", batch_size=None)
        return ds if transform is None else ds.map_batches(transform, batch_format="pyarrow", batch_size=None)

    def check_complete(self, ranges: dict[int, tuple[int, int]], records: pa.Table) -> None:
        """Raise KafkaSourceError when a partition's records stop short of its end offset.

        Only for the "ray-read-kafka" reader, which returns partial ranges on timeout; the
        kafka-python reader raises itself. Assumes no offset gap at a range's end (a topic
        without transactions or compaction, like `engagements`).
        """
        if self.config.reader != "ray-read-kafka":
            return
        part = records.column("partition").to_numpy()
        off = records.column("offset").to_numpy()
        for p, (start, end) in ranges.items():
            if end <= start:
                continue
            last = int(off[part == p].max()) if np.any(part == p) else start - 1
            if last != end - 1:
                raise KafkaSourceError(
                    f"{self.topic}[{p}]: read_kafka stopped at offset {last + 1} of [{start}, {end}) "
                    f"(read_timeout_s {self.config.read_timeout_s}); the batch is retried"
                )

    def close(self) -> None:
        if self._meta is not None:
            self._meta.close(autocommit=False)
            self._meta = None
