"""The offline store and dead-letter sinks are durable, partitioned as documented, and idempotent
under replays with different batch boundaries."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

from streaming.sinks import DAY_MS, FileDeadLetters, KafkaDeadLetters, OfflineStore

ACTIONS = ("view", "click", "buy")


def events(rows: list[tuple[int, int, int]]) -> pa.Table:
    """rows of (partition, offset, ts_ms); user and item derived from the offset."""
    p, o, t = zip(*rows)
    return pa.table(
        {
            "partition": pa.array(p, pa.int32()),
            "offset": pa.array(o, pa.int64()),
            "timestamp_ms": pa.array([0] * len(rows), pa.int64()),
            "user_id": pa.array([x % 7 for x in o], pa.int64()),
            "item_id": pa.array([100 + x for x in o], pa.int64()),
            "action": pa.array([x % 3 for x in o], pa.int8()),
            "ts_ms": pa.array(t, pa.int64()),
        }
    )


def letters(rows: list[tuple[int, int]]) -> pa.Table:
    p, o = zip(*rows)
    return pa.table(
        {
            "partition": pa.array(p, pa.int32()),
            "offset": pa.array(o, pa.int64()),
            "timestamp_ms": pa.array([1_700_000_000_000] * len(rows), pa.int64()),
            "key": pa.array([b"k%d" % x for x in o], pa.binary()),
            "value": pa.array([b"{bad%d" % x for x in o], pa.binary()),
            "reason": pa.array([f"bad_json: at {x}" for x in o]),
            "kind": pa.array(["bad_json"] * len(rows)),
        }
    )


def test_offline_store_partitions_by_day_and_skips_replays(tmp_path):
    # Partition 0 interleaves two days; partition 1 has one.
    stream = [(0, 0, 0), (0, 1, DAY_MS + 5), (0, 2, 3), (1, 0, DAY_MS), (0, 3, DAY_MS + 9), (1, 1, DAY_MS + 1)]
    store = OfflineStore(tmp_path, actions=ACTIONS)
    assert store.append(events(stream[:3])) == 3
    # A crash replays from an earlier point with a longer batch: only the new events are written.
    again = OfflineStore(tmp_path, actions=ACTIONS)
    assert again.append(events(stream[1:])) == 3
    assert again.append(events(stream)) == 0
    got = again.read()
    assert list(zip(got.column("partition").to_pylist(), got.column("offset").to_pylist())) == [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 0),
        (1, 1),
    ]
    assert got.column("action").to_pylist() == ["view", "click", "buy", "view", "view", "click"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day=1970-01-01", "day=1970-01-02"]
    assert sorted(p.name for p in (tmp_path / "day=1970-01-02").iterdir()) == [
        "p0000-00000000000000000001-00000000000000000001.parquet",
        "p0000-00000000000000000003-00000000000000000003.parquet",
        "p0001-00000000000000000000-00000000000000000001.parquet",
    ]


def test_parallel_writers_write_the_same_files_as_one(tmp_path):
    # A replay of history: 40 days x 3 partitions in one batch, then a replay overlapping it.
    stream = [(p, o, (o * 7 % 40) * DAY_MS + o) for p in range(3) for o in range(400)]
    first, replay = events(stream[:900]), events(stream[600:])
    stores = {n: OfflineStore(tmp_path / f"w{n}", actions=ACTIONS, writers=n) for n in (1, 8)}
    for store in stores.values():
        assert store.append(first) == 900
        assert store.append(replay) == 300
        store.close()
    files = {
        n: sorted(str(f.relative_to(tmp_path / f"w{n}")) for f in (tmp_path / f"w{n}").rglob("*.parquet"))
        for n in stores
    }
    assert files[1] == files[8] and len(files[8]) == 4 * 40  # p0, p1 and p2 once; p2 again in the replay
    assert not list((tmp_path / "w8").rglob("*.tmp"))
    assert stores[8].read().equals(stores[1].read()) and stores[8].read().num_rows == 1200
    # A reopened store knows its watermarks from the file names: a second replay writes nothing.
    assert OfflineStore(tmp_path / "w8", actions=ACTIONS, writers=8).append(events(stream)) == 0


def test_file_dead_letters_are_written_once(tmp_path):
    sink = FileDeadLetters(tmp_path, source_topic="engagements")
    assert sink.send(letters([(0, 4), (1, 2)])) == 2
    assert FileDeadLetters(tmp_path, source_topic="engagements").send(letters([(0, 4), (0, 9), (1, 2)])) == 1
    table = sink.read()
    assert sorted(zip(table.column("partition").to_pylist(), table.column("offset").to_pylist())) == [
        (0, 4),
        (0, 9),
        (1, 2),
    ]
    assert set(table.column("topic").to_pylist()) == {"engagements"}


@pytest.mark.kafka
def test_kafka_dead_letters_carry_value_key_and_reason(kafka_bootstrap, new_topic):
    from kafka import KafkaConsumer, TopicPartition

    dlq = new_topic(partitions=1, prefix="dlq")
    sink = KafkaDeadLetters(kafka_bootstrap, dlq, source_topic="engagements")
    try:
        sink.send(letters([(2, 40), (3, 7)]))
        sink.flush()
    finally:
        sink.close()
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    tp = TopicPartition(dlq, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    got, deadline = [], time.monotonic() + 30
    while len(got) < 2 and time.monotonic() < deadline:
        got += consumer.poll(timeout_ms=500).get(tp, [])
    consumer.close()
    assert [(r.key, r.value) for r in got] == [(b"k40", b"{bad40"), (b"k7", b"{bad7")]
    headers = dict(got[0].headers)
    assert headers == {
        "reason": b"bad_json: at 40",
        "kind": b"bad_json",
        "source_topic": b"engagements",
        "source_partition": b"2",
        "source_offset": b"40",
    }


@pytest.mark.kafka
def test_kafka_dead_letters_create_a_missing_topic(kafka_bootstrap):
    """The broker refuses to create topics on first use: the sink creates its own, or its first
    letters would wait for metadata until the batch fails."""
    import uuid

    from kafka.admin import KafkaAdminClient

    dlq = f"missing-dlq-{uuid.uuid4().hex[:8]}"
    sink = KafkaDeadLetters(kafka_bootstrap, dlq, source_topic="engagements")
    try:
        sink.send(letters([(0, 3)]))
        sink.flush()
    finally:
        sink.close()
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        assert dlq in admin.list_topics()
    finally:
        admin.close()
