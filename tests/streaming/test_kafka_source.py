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


def test_read_ranges_and_partition_contract(kafka_bootstrap, new_topic, ray_address):
    topic = new_topic(partitions=3)
    produce(kafka_bootstrap, topic, {0: 30, 1: 5, 2: 0})
    source = KafkaSource(kafka_bootstrap, topic, KafkaReadConfig(read_timeout_s=10))
    try:
        assert source.list_parts() == [0, 1, 2]
        assert source.end_offsets() == {0: 30, 1: 5, 2: 0}
        table = collect(source.read_ranges({0: (10, 25), 1: (0, 5), 2: (0, 0)}))
        rows = sorted(zip(table.column("partition").to_pylist(), table.column("offset").to_pylist(),
                          table.column("value").to_pylist(), table.column("timestamp_ms").to_pylist()))
        assert rows == sorted([(0, o, b"v0-%d" % o, 1_000 + o) for o in range(10, 25)]
                              + [(1, o, b"v1-%d" % o, 1_000 + o) for o in range(5)])
        part = source.build_part(0, resume_offset=28)
        batch = part.next_batch(10)
        assert batch.offsets.tolist() == [28, 29] and part.snapshot() == 30
        assert len(part.next_batch(10)) == 0
        with pytest.raises(KafkaSourceError, match="has no partition 7"):
            source.build_part(7)
    finally:
        source.close()


def test_a_range_past_the_end_times_out_with_a_clear_error(kafka_bootstrap, new_topic):
    from streaming.kafka_source import read_partition_range

    topic = new_topic(partitions=1)
    produce(kafka_bootstrap, topic, {0: 3})
    with pytest.raises(KafkaSourceError, match="no record for 2 s at offset 3"):
        read_partition_range(kafka_bootstrap, topic, 0, 0, 10, KafkaReadConfig(read_timeout_s=2))


def test_unknown_topic_is_reported(kafka_bootstrap):
    source = KafkaSource(kafka_bootstrap, "no-such-topic-xyz", KafkaReadConfig(read_timeout_s=1))
    try:
        with pytest.raises(KafkaSourceError, match="topic 'no-such-topic-xyz' does not exist"):
            source.list_parts()
    finally:
        source.close()


def test_ray_read_kafka_reader_matches_kafka_python(kafka_bootstrap, new_topic, ray_address):
    pytest.importorskip("confluent_kafka", reason="ray.data.read_kafka needs confluent-kafka (pinned in requirements.lock)")
    topic = new_topic(partitions=3)
    produce(kafka_bootstrap, topic, {0: 12, 1: 4, 2: 7})
    ranges = {0: (3, 12), 1: (0, 4), 2: (7, 7)}
    tables = {}
    for reader in ("kafka-python", "ray-read-kafka"):
        source = KafkaSource(kafka_bootstrap, topic, KafkaReadConfig(reader=reader, read_timeout_s=3))
        try:
            tables[reader] = collect(source.read_ranges(ranges)).sort_by([("partition", "ascending"), ("offset", "ascending")])
            source.check_complete(ranges, tables[reader])
            # A range past the end comes back short: the check refuses it instead of committing it.
            if reader == "ray-read-kafka":
                short = collect(source.read_ranges({0: (10, 15)}))
                with pytest.raises(KafkaSourceError, match=r"read_kafka stopped at offset 12 of \[10, 15\)"):
                    source.check_complete({0: (10, 15)}, short)
        finally:
            source.close()
    assert tables["ray-read-kafka"].equals(tables["kafka-python"])
    assert tables["kafka-python"].num_rows == 13
