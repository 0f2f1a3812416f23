"""The Kafka source reads exactly the asked offset ranges from a real broker, through Ray Data,
and keeps the recorded-log source's partition contract."""

from __future__ import annotations

import pytest

from streaming.config import KafkaReadConfig
from streaming.kafka_source import KafkaSource, KafkaSourceError
from streaming.sources import collect

pytestmark = pytest.mark.kafka


def produce(bootstrap: str, topic: str, per_partition: dict[int, int]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for p, n in per_partition.items():
        for i in range(n):
            producer.send(topic, key=b"u%d" % p, value=b"v%d-%d" % (p, i), partition=p, timestamp_ms=1_000 + i)
    producer.flush()
    producer.close()


@pytest.mark.parametrize("reader", ["confluent-kafka", "kafka-python"])
def test_read_ranges_and_partition_contract(reader, kafka_bootstrap, new_topic, ray_address):
    topic = new_topic(partitions=3)
    produce(kafka_bootstrap, topic, {0: 30, 1: 5, 2: 0})
    source = KafkaSource(kafka_bootstrap, topic, KafkaReadConfig(reader=reader, read_timeout_s=10))
    try:
        assert source.list_parts() == [0, 1, 2]
        assert source.end_offsets() == {0: 30, 1: 5, 2: 0}
        table = collect(source.read_ranges({0: (10, 25), 1: (0, 5), 2: (0, 0)}))
        rows = sorted(
            zip(
                table.column("partition").to_pylist(),
                table.column("offset").to_pylist(),
                table.column("value").to_pylist(),
                table.column("timestamp_ms").to_pylist(),
            )
        )
        assert rows == sorted(
            [(0, o, b"v0-%d" % o, 1_000 + o) for o in range(10, 25)]
            + [(1, o, b"v1-%d" % o, 1_000 + o) for o in range(5)]
        )
        part = source.build_part(0, resume_offset=28)
        batch = part.next_batch(10)
        assert batch.offsets.tolist() == [28, 29] and part.snapshot() == 30
        assert len(part.next_batch(10)) == 0
        with pytest.raises(KafkaSourceError, match="has no partition 7"):
            source.build_part(7)
    finally:
        source.close()


@pytest.mark.parametrize("reader", ["confluent-kafka", "kafka-python"])
def test_a_range_past_the_end_times_out_with_a_clear_error(reader, kafka_bootstrap, new_topic):
    from streaming.kafka_source import range_reader

    config = KafkaReadConfig(reader=reader, read_timeout_s=2)
    topic = new_topic(partitions=1)
    produce(kafka_bootstrap, topic, {0: 3})
    with pytest.raises(KafkaSourceError, match="no record for 2 s at offset 3"):
        range_reader(config)(kafka_bootstrap, topic, 0, 0, 10, config)


def test_confluent_reader_reads_big_ranges_exactly(kafka_bootstrap, new_topic):
    """More records than one consume() call returns, a range ending mid-fetch, null keys/values."""
    from kafka import KafkaProducer

    from streaming.kafka_source import read_partition_range, read_partition_range_confluent

    topic = new_topic(partitions=1)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=20, batch_size=1 << 20)
    for i in range(150_000):
        producer.send(
            topic,
            key=None if i % 7 == 1 and i % 11 else b"k%d" % i,
            value=None if i % 11 == 0 else b"v%d" % i,
            partition=0,
            timestamp_ms=5_000 + i,
        )
    producer.flush()
    producer.close()
    config = KafkaReadConfig(read_timeout_s=10)
    for start, end in ((0, 150_000), (123, 140_001), (149_999, 150_000)):
        got = read_partition_range_confluent(kafka_bootstrap, topic, 0, start, end, config)
        assert got.column("offset").to_pylist() == list(range(start, end))
        assert got.column("timestamp_ms").to_pylist() == [5_000 + i for i in range(start, end)]
        assert got.equals(read_partition_range(kafka_bootstrap, topic, 0, start, end, config))
    values = read_partition_range_confluent(kafka_bootstrap, topic, 0, 0, 23, config).column("value").to_pylist()
    keys = read_partition_range_confluent(kafka_bootstrap, topic, 0, 0, 23, config).column("key").to_pylist()
    assert values[0] is None and values[11] is None and values[22] is None and values[1] == b"v1"
    assert keys[1] is None and keys[8] is None and keys[0] == b"k0" and keys[22] == b"k22"


def test_unknown_topic_is_reported(kafka_bootstrap):
    source = KafkaSource(kafka_bootstrap, "no-such-topic-xyz", KafkaReadConfig(read_timeout_s=1))
    try:
        with pytest.raises(KafkaSourceError, match="topic 'no-such-topic-xyz' does not exist"):
            source.list_parts()
    finally:
        source.close()


def test_every_reader_reads_the_same_records(kafka_bootstrap, new_topic, ray_address):
    pytest.importorskip(
        "confluent_kafka", reason="ray.data.read_kafka needs confluent-kafka (pinned in requirements.lock)"
    )
    topic = new_topic(partitions=3)
    produce(kafka_bootstrap, topic, {0: 12, 1: 4, 2: 7})
    ranges = {0: (3, 12), 1: (0, 4), 2: (7, 7)}
    tables = {}
    for reader in ("confluent-kafka", "kafka-python", "ray-read-kafka"):
        source = KafkaSource(kafka_bootstrap, topic, KafkaReadConfig(reader=reader, read_timeout_s=3))
        try:
            tables[reader] = collect(source.read_ranges(ranges)).sort_by(
                [("partition", "ascending"), ("offset", "ascending")]
            )
            source.check_complete(ranges, tables[reader])
            # A range past the end comes back short: the check refuses it instead of committing it.
            if reader == "ray-read-kafka":
                short = collect(source.read_ranges({0: (10, 15)}))
                with pytest.raises(KafkaSourceError, match=r"read_kafka stopped at offset 12 of \[10, 15\)"):
                    source.check_complete({0: (10, 15)}, short)
        finally:
            source.close()
    assert tables["ray-read-kafka"].equals(tables["kafka-python"])
    assert tables["confluent-kafka"].equals(tables["kafka-python"])
    assert tables["kafka-python"].num_rows == 13
