"""Record a topic from a Kafka broker into a log file, and replay a log file into a broker.

    python -m infra.recorded_log record --topic engagements --out .state/logs/rec.parquet \\
        [--bootstrap 127.0.0.1:9092] [--partitions 0,1] [--from-offset 0] [--to-offset 5000]
    python -m infra.recorded_log replay --log .state/logs/ml-100k.parquet \\
        [--bootstrap 127.0.0.1:9092] [--topic engagements] [--speedup 3600]
    python -m infra.recorded_log info .state/logs/ml-100k.parquet

`--bootstrap` defaults to the broker started by `python -m infra.kafka start`. The file format is
in streaming/recorded_log.py.

record reads, for each partition, the offsets [from, to) (default: everything there is when it
starts) and writes them partition by partition. replay produces every record to the partition it
came from, with its key, value and timestamp, in the log's order within each partition, so
recording a replayed log gives back the same keys, values, partitions and order (and the same
offsets when the topic was empty). A topic that does not exist is created with the log's
partition count and unlimited retention (event times may be decades old). Without `--speedup`
replay goes as fast as the broker takes it; with it, the gaps between record timestamps are kept,
divided by the factor (3600: an hour of events per second).

From Python (these are what benchmarks/ingest_io.py times):

    >>> from infra.recorded_log import replay_log, read_topic, record_topic
    >>> replay_log(".state/logs/ml-100k.parquet", bootstrap="127.0.0.1:9092", topic="ml").count
    100000
    >>> read_topic("127.0.0.1:9092", "ml").num_rows   # consume into memory, no file
    100000
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from config.loader import ConfigError
from infra.kafka.client_args import add_security_arguments, security_from_args
from streaming.kafka_security import KafkaSecurityConfig, KafkaSecurityError, kafka_python_kwargs, raise_if_refused
from streaming.log_source import KafkaBatch
from streaming.recorded_log import LOG_SCHEMA, RecordedLog, RecordedLogError, read_log, write_log

log = logging.getLogger("infra.recorded_log")
_PROGRESS_EVERY_S = 2.0


@dataclass(frozen=True)
class TransferResult:
    """How many records moved, and how long it took."""

    count: int
    seconds: float
    topic: str

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("inf")


class _Progress:
    """A log line every couple of seconds: done/total, rate, ETA."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total = what, total
        self.t0 = self.last = time.monotonic()

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < _PROGRESS_EVERY_S:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        log.info("%s %d/%d records (%.0f/s, ETA %.0f s)", self.what, done, self.total, rate, eta)


def default_bootstrap() -> str:
    """The address of the broker started from this checkout by `python -m infra.kafka start`."""
    from infra.kafka.broker import is_running, read_info

    info = read_info()
    if info is None or not is_running(info):
        raise RecordedLogError("no --bootstrap given and no local broker running: run `python -m infra.kafka start`")
    return info.bootstrap


def _consumer(bootstrap: str, security: KafkaSecurityConfig | None = None):
    from kafka import KafkaConsumer

    return KafkaConsumer(
        **kafka_python_kwargs(security),
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        request_timeout_ms=30_000,
    )


def _topic_partitions(consumer, bootstrap: str, topic: str, security: KafkaSecurityConfig | None = None) -> list[int]:
    if _partition_count(bootstrap, topic, security) is None:
        raise RecordedLogError(f"topic {topic!r} does not exist on the broker at {bootstrap}")
    deadline = time.monotonic() + 15
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        if time.monotonic() > deadline:
            raise RecordedLogError(f"topic {topic!r} does not exist on the broker (or has no partitions)")
        time.sleep(0.2)


def _batch_from_records(topic: str, partition: int, records) -> KafkaBatch:
    return KafkaBatch(
        topic=topic,
        partition=partition,
        offsets=np.fromiter((r.offset for r in records), dtype=np.int64, count=len(records)),
        timestamps_ms=np.fromiter((r.timestamp for r in records), dtype=np.int64, count=len(records)),
        keys=pa.array([r.key for r in records], type=pa.binary()),
        values=pa.array([r.value for r in records], type=pa.binary()),
    )


def iter_partition_batches(
    bootstrap: str,
    topic: str,
    partition: int,
    *,
    max_events: int,
    start_offset: int | None = None,
    end_offset: int | None = None,
    timeout_s: float = 60.0,
    security: KafkaSecurityConfig | None = None,
) -> Iterator[KafkaBatch]:
    """Read partition `partition` of `topic` from the broker in batches of exactly `max_events`
    (the last may be shorter): the broker-side twin of LogPartition.next_batch.

    Reads offsets [start_offset, end_offset); defaults are the partition's beginning and its end
    offset when the call starts. Raises RecordedLogError when no new record arrives for timeout_s.
    """
    from kafka import TopicPartition

    if max_events < 1:
        raise RecordedLogError(f"max_events ({max_events}) must be >= 1")
    consumer = _consumer(bootstrap, security)
    try:
        if partition not in _topic_partitions(consumer, bootstrap, topic, security):
            raise RecordedLogError(f"topic {topic!r} has no partition {partition}")
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        low = consumer.beginning_offsets([tp])[tp]
        high = consumer.end_offsets([tp])[tp]
        start = low if start_offset is None else max(start_offset, low)
        end = high if end_offset is None else min(end_offset, high)
        consumer.seek(tp, start)
        pending: list = []
        position = start
        last_progress = time.monotonic()
        while position < end:
            records = consumer.poll(timeout_ms=500, max_records=max_events - len(pending)).get(tp, [])
            if records:
                last_progress = time.monotonic()
                for r in records:
                    if r.offset >= end:
                        break
                    pending.append(r)
                position = records[-1].offset + 1
            else:
                # Transaction markers and compacted gaps hold no record; the position moves past them.
                position = max(position, consumer.position(tp))
                if position < end and time.monotonic() - last_progress > timeout_s:
                    raise RecordedLogError(
                        f"{topic}[{partition}]: no record for {timeout_s:.0f} s at offset {position} (end {end})"
                    )
            if len(pending) >= max_events:
                yield _batch_from_records(topic, partition, pending)
                pending = []
        if pending:
            yield _batch_from_records(topic, partition, pending)
    finally:
        consumer.close()


def read_topic(
    bootstrap: str,
    topic: str,
    *,
    partitions: list[int] | None = None,
    from_offset: int | None = None,
    to_offset: int | None = None,
    progress: bool = True,
    timeout_s: float = 60.0,
    security: KafkaSecurityConfig | None = None,
) -> pa.Table:
    """Consume offsets [from_offset, to_offset) of each partition (default: all there is now) into
    a table in the recorded-log schema, partition by partition in offset order."""
    return _read_topic(
        bootstrap,
        topic,
        partitions=partitions,
        from_offset=from_offset,
        to_offset=to_offset,
        progress=progress,
        timeout_s=timeout_s,
        security=security,
    )[0]


def _read_topic(
    bootstrap: str,
    topic: str,
    *,
    partitions: list[int] | None,
    from_offset: int | None,
    to_offset: int | None,
    progress: bool,
    timeout_s: float,
    security: KafkaSecurityConfig | None = None,
) -> tuple[pa.Table, int]:
    from kafka import TopicPartition

    consumer = _consumer(bootstrap, security)
    try:
        all_parts = _topic_partitions(consumer, bootstrap, topic, security)
        parts = all_parts if partitions is None else list(partitions)
        unknown = sorted(set(parts) - set(all_parts))
        if unknown:
            raise RecordedLogError(f"topic {topic!r} has partitions {all_parts}; {unknown} do not exist")
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        lows, highs = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        start = {tp: lows[tp] if from_offset is None else max(from_offset, lows[tp]) for tp in tps}
        end = {tp: highs[tp] if to_offset is None else min(to_offset, highs[tp]) for tp in tps}
        todo = {tp for tp in tps if start[tp] < end[tp]}
        for tp in tps:
            consumer.seek(tp, start[tp])
        for tp in set(tps) - todo:
            consumer.pause(tp)
        got: dict = {tp: [] for tp in tps}
        total = sum(max(end[tp] - start[tp], 0) for tp in tps)
        meter = _Progress(f"record {topic}", total) if progress else None
        done, last_progress = 0, time.monotonic()
        while todo:
            polled = consumer.poll(timeout_ms=500, max_records=100_000)
            if not any(polled.values()):
                for tp in list(todo):  # gaps at the end (markers, compaction) hold no record
                    if consumer.position(tp) >= end[tp]:
                        todo.discard(tp)
                        consumer.pause(tp)
                if todo and time.monotonic() - last_progress > timeout_s:
                    raise RecordedLogError(
                        f"{topic}: no record for {timeout_s:.0f} s; "
                        f"still waiting for {sorted(t.partition for t in todo)}"
                    )
                continue
            last_progress = time.monotonic()
            for tp, records in polled.items():
                keep = [r for r in records if r.offset < end[tp]]
                got[tp].extend(keep)
                done += len(keep)
                if (keep and keep[-1].offset + 1 >= end[tp]) or len(keep) < len(records):
                    todo.discard(tp)
                    consumer.pause(tp)
            if meter:
                meter.update(done)
        if meter:
            meter.update(done, force=True)
    finally:
        consumer.close()
    tables = [_batch_from_records(topic, tp.partition, got[tp]).to_table() for tp in tps]
    return (pa.concat_tables(tables) if tables else LOG_SCHEMA.empty_table()), len(all_parts)


def record_topic(
    bootstrap: str,
    topic: str,
    out: str | Path,
    *,
    partitions: list[int] | None = None,
    from_offset: int | None = None,
    to_offset: int | None = None,
    progress: bool = True,
    security: KafkaSecurityConfig | None = None,
) -> TransferResult:
    """Dump offsets [from_offset, to_offset) of `topic` (all partitions unless given) to a log file."""
    t0 = time.monotonic()
    table, num_partitions = _read_topic(
        bootstrap,
        topic,
        partitions=partitions,
        from_offset=from_offset,
        to_offset=to_offset,
        progress=progress,
        timeout_s=60.0,
        security=security,
    )
    write_log(table, out, num_partitions=num_partitions)
    return TransferResult(count=table.num_rows, seconds=time.monotonic() - t0, topic=topic)


def _partition_count(bootstrap: str, topic: str, security: KafkaSecurityConfig | None = None) -> int | None:
    """The topic's partition count, None when it does not exist (asks the admin API, which
    unlike producer metadata never auto-creates a topic)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15_000, **kafka_python_kwargs(security))
    try:
        if topic not in set(admin.list_topics()):
            return None
        (meta,) = admin.describe_topics([topic])
        return len(meta["partitions"])
    finally:
        admin.close()


def _send_order(log_: RecordedLog, speedup: float | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Row order to send in, and each row's due time in seconds after the first (None: unpaced).

    Unpaced: file order. Paced: by timestamp, but a partition's records never overtake each other:
    a record's schedule time is the running max of timestamps within its partition.
    """
    n = len(log_)
    if speedup is None:
        return np.arange(n), None
    part = log_.table.column("partition").to_numpy()
    ts = log_.table.column("timestamp_ms").to_numpy().astype(np.float64)
    sched = np.empty(n)
    for p in np.unique(part):
        idx = np.flatnonzero(part == p)
        sched[idx] = np.maximum.accumulate(ts[idx])
    order = np.argsort(sched, kind="stable")
    due = (sched[order] - sched[order[0]]) / 1000.0 / speedup if n else sched[order]
    return order, due


def replay_log(
    log_or_path: RecordedLog | str | Path,
    *,
    bootstrap: str,
    topic: str | None = None,
    speedup: float | None = None,
    create_topic: bool = True,
    progress: bool = True,
    security: KafkaSecurityConfig | None = None,
) -> TransferResult:
    """Produce every record of the log into `topic` (default: the log's own topic), to the same
    partition, with the same key, value and timestamp, keeping each partition's order.

    speedup: None sends as fast as possible; a factor F > 0 keeps the original gaps divided by F.
    """
    from kafka import KafkaProducer

    from infra.kafka.broker import TopicSpec, ensure_topics

    if speedup is not None and not speedup > 0:
        raise RecordedLogError(f"speedup ({speedup!r}) must be > 0, or None for as fast as possible")
    log_ = log_or_path if isinstance(log_or_path, RecordedLog) else read_log(log_or_path)
    topic = topic or log_.topic
    if not topic:
        raise RecordedLogError("the log has no topic name (it is empty): pass topic=")
    raise_if_refused(bootstrap, security)
    existing = _partition_count(bootstrap, topic, security)
    if existing is None and create_topic:
        ensure_topics(bootstrap, (TopicSpec(name=topic, partitions=log_.num_partitions),), security=security)
        existing = _partition_count(bootstrap, topic, security)
    if existing is None:
        raise RecordedLogError(f"topic {topic!r} does not exist: create it, or let replay create it")
    if existing < log_.num_partitions:
        raise RecordedLogError(
            f"topic {topic!r} has {existing} partitions but the log has {log_.num_partitions}: "
            "replay into a new topic name, or add partitions to this one"
        )
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,  # retries can neither duplicate nor reorder a partition's records
        linger_ms=20,
        batch_size=1024 * 1024,
        max_request_size=16 * 1024 * 1024,
        request_timeout_ms=30_000,
        **kafka_python_kwargs(security),
    )
    try:
        order, due = _send_order(log_, speedup)
        t = log_.table
        part = t.column("partition").to_numpy()[order].tolist()
        ts = t.column("timestamp_ms").to_numpy()[order].tolist()
        keys = t.column("key").take(pa.array(order)).to_pylist()
        values = t.column("value").take(pa.array(order)).to_pylist()
        errors: list[BaseException] = []
        meter = _Progress(f"replay into {topic}", len(order)) if progress else None
        send = producer.send
        t0 = time.monotonic()
        for i in range(len(order)):
            if due is not None:
                wait = t0 + due[i] - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            send(
                topic, value=values[i], key=keys[i], partition=part[i], timestamp_ms=None if ts[i] < 0 else ts[i]
            ).add_errback(errors.append)
            if meter and i % 4096 == 0:
                meter.update(i)
        producer.flush(timeout=300)
        if meter:
            meter.update(len(order), force=True)
        seconds = time.monotonic() - t0
    finally:
        producer.close(timeout=30)
    if errors:
        raise RecordedLogError(f"replay into {topic!r}: {len(errors)} sends failed, first: {errors[0]!r}")
    return TransferResult(count=len(order), seconds=seconds, topic=topic)


def _offset_arg(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"offset {value} must be >= 0")
    return value


def main(argv: list[str] | None = None) -> int:
    from kafka.errors import KafkaError

    from infra.kafka.broker import BrokerError

    parser = argparse.ArgumentParser(
        prog="python -m infra.recorded_log", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_rec = sub.add_parser("record", help="dump a topic's offset range to a log file")
    p_rec.add_argument("--bootstrap")
    p_rec.add_argument("--topic", required=True)
    p_rec.add_argument("--out", required=True)
    p_rec.add_argument("--partitions", help="comma-separated partition numbers (default: all)")
    p_rec.add_argument("--from-offset", type=_offset_arg, help="first offset of each partition (default: earliest)")
    p_rec.add_argument("--to-offset", type=_offset_arg, help="stop before this offset (default: the end now)")
    p_rep = sub.add_parser("replay", help="produce a log file into a broker")
    p_rep.add_argument("--bootstrap")
    p_rep.add_argument("--log", required=True)
    p_rep.add_argument("--topic", help="target topic (default: the log's own)")
    p_rep.add_argument("--speedup", type=float, help="keep the original pacing, this many times faster")
    p_rep.add_argument("--no-create", action="store_true", help="fail instead of creating a missing topic")
    for sub_parser in (p_rec, p_rep):
        add_security_arguments(sub_parser)
    p_info = sub.add_parser("info", help="validate a log file and summarise it")
    p_info.add_argument("path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.WARNING)

    try:
        if args.command == "info":
            lg = read_log(args.path)
            ts = lg.table.column("timestamp_ms").to_numpy()
            span = f", timestamps {ts.min()}..{ts.max()}" if len(ts) else ""
            print(
                f"{args.path}: topic {lg.topic!r}, {len(lg):,} records, {lg.num_partitions} partitions "
                f"{list(lg.partition_counts().values())}{span}"
            )
            return 0
        bootstrap = args.bootstrap or default_bootstrap()
        security = security_from_args(args)
        if args.command == "record":
            parts = None
            if args.partitions:
                try:
                    parts = [int(p) for p in args.partitions.split(",")]
                except ValueError:
                    raise RecordedLogError(
                        f"--partitions {args.partitions!r} must be comma-separated integers"
                    ) from None
            res = record_topic(
                bootstrap,
                args.topic,
                args.out,
                partitions=parts,
                from_offset=args.from_offset,
                to_offset=args.to_offset,
                security=security,
            )
            print(
                f"recorded {res.count:,} records of {res.topic!r} to {args.out} "
                f"in {res.seconds:.1f} s ({res.rate:,.0f}/s)"
            )
        else:
            res = replay_log(
                args.log,
                bootstrap=bootstrap,
                topic=args.topic,
                speedup=args.speedup,
                create_topic=not args.no_create,
                security=security,
            )
            print(f"replayed {res.count:,} records into {res.topic!r} in {res.seconds:.1f} s ({res.rate:,.0f}/s)")
    except (RecordedLogError, BrokerError, KafkaError, KafkaSecurityError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
