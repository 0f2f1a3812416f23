"""Committed offsets survive a restart in both stores; the frontier never passes an unfinished batch."""

from __future__ import annotations

import json

import pytest

from streaming.offsets import CommitFrontier, FileOffsets, KafkaGroupOffsets, OffsetStoreError


def test_file_offsets_round_trip_and_refuse_another_topic(tmp_path):
    path = tmp_path / "offsets.json"
    store = FileOffsets(path, topic="engagements")
    assert store.committed([0, 1]) == {}
    store.commit({0: 5})
    store.commit({1: 7})
    assert FileOffsets(path, topic="engagements").committed([0, 1, 2]) == {0: 5, 1: 7}
    assert json.loads(path.read_text())["topic"] == "engagements"
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(OffsetStoreError, match="holds offsets of topic 'engagements', not 'other'"):
        FileOffsets(path, topic="other").committed([0])
    path.write_text("{not json")
    with pytest.raises(OffsetStoreError, match="delete it to start over"):
        store.committed([0])


def test_frontier_waits_for_durability_in_order():
    f = CommitFrontier({0: 0, 1: 0})
    f.add_batch(1, {0: 10, 1: 5})
    f.add_batch(2, {0: 20, 1: 5})
    f.add_batch(3, {0: 30, 1: 9})
    f.mark_durable(2)
    assert f.committable() is None  # batch 1 is not durable yet
    f.mark_durable(1)
    assert f.committable() == {0: 20, 1: 5}
    f.committed({0: 20, 1: 5})
    assert f.committable() is None and f.pending == 1
    f.mark_durable(3)
    assert f.committable() == {0: 30, 1: 9}
    with pytest.raises(ValueError, match="batch ids must increase"):
        f.add_batch(3, {0: 40})


@pytest.mark.kafka
def test_kafka_group_offsets_round_trip(kafka_bootstrap, new_topic):
    topic = new_topic(partitions=3)
    group = f"g-{topic}"
    store = KafkaGroupOffsets(kafka_bootstrap, topic, group)
    try:
        assert store.committed([0, 1, 2]) == {}
        store.commit({0: 11, 2: 4})
    finally:
        store.close()
    again = KafkaGroupOffsets(kafka_bootstrap, topic, group)
    try:
        assert again.committed([0, 1, 2]) == {0: 11, 2: 4}
    finally:
        again.close()
