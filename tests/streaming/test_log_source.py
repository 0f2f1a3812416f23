"""The log source reads like a Kafka topic: batches, offsets, resume state; and equals a broker read."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from infra.datasets.synthetic import SyntheticConfig, write_synthetic_log
from streaming.events import ActionVocab
from streaming.log_source import LogSource, LogSourceError
from streaming.recorded_log import read_log, validate_log_table


@pytest.fixture(scope="module")
def log_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("logs") / "syn.parquet"
    write_synthetic_log(
        SyntheticConfig(num_users=60, num_items=300, num_events=3_000, num_days=3, seed=5), path, num_partitions=3
    )
    return path


def drain(part, max_events):
    batches = []
    while len(b := part.next_batch(max_events)):
        batches.append(b)
    return batches


def test_batches_cover_each_partition_in_offset_order(log_path):
    src = LogSource(log_path)
    log = read_log(log_path)
    assert src.list_parts() == [0, 1, 2]
    total = 0
    for p in src.list_parts():
        part = src.build_part(p, None)
        rows = log.table.take(pa.array(log.partition_rows(p)))
        batches = drain(part, 250)
        assert [len(b) for b in batches[:-1]] == [250] * (len(batches) - 1)
        assert 0 < len(batches[-1]) <= 250
        assert np.concatenate([b.offsets for b in batches]).tolist() == list(range(rows.num_rows))
        assert pa.concat_arrays([b.values for b in batches]).equals(rows.column("value").combine_chunks())
        assert pa.concat_arrays([b.keys for b in batches]).equals(rows.column("key").combine_chunks())
        assert np.concatenate([b.timestamps_ms for b in batches]).tolist() == rows.column("timestamp_ms").to_pylist()
        assert all(b.partition == p and b.topic == "engagements" for b in batches)
        assert part.snapshot() == rows.num_rows == src.end_offsets()[p]
        assert part.lag() == 0
        total += rows.num_rows
    assert total == 3_000


def test_resume_from_snapshot_continues_exactly(log_path):
    src = LogSource(log_path)
    whole = drain(src.build_part(1), 100)
    first = src.build_part(1)
    head = [first.next_batch(100) for _ in range(3)]
    state = first.snapshot()
    assert state == head[-1].next_offset == 300
    rest = drain(src.build_part(1, state), 100)
    assert [b.offsets.tolist() for b in head + rest] == [b.offsets.tolist() for b in whole]
    # A batch decodes straight into the event columns, keeping its offsets.
    valid, invalid = rest[0].decode(vocab=ActionVocab.synthetic(), now_ms=2**62)
    assert invalid.num_rows == 0
    assert valid.column("offset").to_pylist() == list(range(300, 400))
    assert valid.column("partition").to_pylist() == [1] * 100


def test_resume_semantics_with_gaps_and_bad_states():
    t = pa.table(
        {
            "topic": ["t"] * 4,
            "partition": pa.array([0] * 4, pa.int32()),
            "offset": [10, 11, 15, 16],
            "timestamp_ms": [1, 2, 3, 4],
            "key": [b"k"] * 4,
            "value": [b"a", b"b", b"c", b"d"],
        }
    )
    src = LogSource(validate_log_table(t, num_partitions=2))
    assert src.build_part(0, 3).next_batch(10).offsets.tolist() == [10, 11, 15, 16]  # below the start: earliest
    part = src.build_part(0, 12)  # inside the gap: the next record
    assert part.snapshot() == 12
    assert part.next_batch(1).offsets.tolist() == [15]
    assert part.snapshot() == 16
    assert src.build_part(0, 17).next_batch(5).offsets.tolist() == []  # caught up
    assert src.build_part(1).next_batch(5).offsets.tolist() == []  # an empty partition
    assert src.end_offsets() == {0: 17, 1: 0}
    with pytest.raises(LogSourceError, match="resume offset 18 is past the end of t\\[0\\] \\(high watermark 17\\)"):
        src.build_part(0, 18)
    with pytest.raises(LogSourceError, match="partition 2 does not exist in 't': it has partitions 0..1"):
        src.build_part(2)
    with pytest.raises(LogSourceError, match=r"max_events \(0\)"):
        src.build_part(0).next_batch(0)
    with pytest.raises(LogSourceError, match="resume offset '3'"):
        src.build_part(0, "3")


@pytest.mark.kafka
def test_log_source_equals_a_broker_read(log_path, kafka_bootstrap, new_topic):
    from infra.recorded_log import iter_partition_batches, replay_log

    src = LogSource(log_path)
    topic = new_topic(partitions=src.num_partitions, prefix="logsrc")
    assert replay_log(log_path, bootstrap=kafka_bootstrap, topic=topic, progress=False).count == 3_000
    for p in src.list_parts():
        part = src.build_part(p, None)
        broker = list(iter_partition_batches(kafka_bootstrap, topic, p, max_events=333))
        offline = drain(part, 333)
        assert len(broker) == len(offline) > 1
        for kb, lb in zip(broker, offline):
            assert kb.partition == lb.partition == p
            assert kb.offsets.tolist() == lb.offsets.tolist()
            assert kb.timestamps_ms.tolist() == lb.timestamps_ms.tolist()
            assert kb.keys.equals(lb.keys) and kb.values.equals(lb.values)
        # Resuming mid-partition from a snapshot gives the same batches on both sides.
        resume = offline[0].next_offset
        again = src.build_part(p, resume).next_batch(100)
        (kb,) = list(
            iter_partition_batches(
                kafka_bootstrap, topic, p, max_events=100, start_offset=resume, end_offset=resume + 100
            )
        )
        assert kb.offsets.tolist() == again.offsets.tolist() and kb.values.equals(again.values)
