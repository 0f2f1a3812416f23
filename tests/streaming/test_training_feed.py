"""The training feed hands every batch to every consumer, holds at most `capacity` unacknowledged
batches, and reports what all consumers acknowledged."""

from __future__ import annotations

import pytest

from features.sequence_batch import SequenceBatch
from streaming.training_feed import FeedConsumer, FeedError, TrainingFeed


def examples(n: int) -> SequenceBatch:
    return SequenceBatch.from_sequences(
        user_ids=list(range(n)), item_ids=[[1]] * n, actions=[[0]] * n, timestamps_ms=[[0]] * n, num_new=[1] * n
    )


def test_broadcast_backpressure_and_acks(ray_address):
    feed = TrainingFeed(consumers=("a", "b"), capacity=2, actor_name="test-feed", namespace="hstu")
    try:
        a = FeedConsumer("a", actor_name="test-feed", namespace="hstu")
        b = FeedConsumer("b", actor_name="test-feed", namespace="hstu")
        assert feed.wait_for_room(0.1)
        feed.publish(1, {0: 10}, examples(3))
        feed.publish(2, {0: 20}, examples(4))
        assert not feed.wait_for_room(0.2)  # two batches out, none acknowledged: full
        got = a.next(timeout_s=5)
        assert (got.batch_id, got.end_offsets, len(got.examples)) == (1, {0: 10}, 3)
        a.ack(1)
        assert feed.acked_through() == -1 and not feed.wait_for_room(0.2)  # b has not acked
        assert b.next(timeout_s=5).batch_id == 1
        b.ack(1)
        b.ack(1)  # repeated acknowledgements are harmless
        assert feed.acked_through() == 1 and feed.wait_for_room(1.0)
        assert a.next(timeout_s=5).batch_id == 2 and a.next(timeout_s=0.2) is None
        assert feed.stats()["held"] == 1
        with pytest.raises(FeedError, match="consumer 'c' is not one of"):
            FeedConsumer("c", actor_name="test-feed", namespace="hstu").next(timeout_s=0.1)
    finally:
        feed.close()


def test_a_missing_feed_is_reported(ray_address):
    with pytest.raises(FeedError, match="no training feed 'nope'"):
        FeedConsumer("a", actor_name="nope", namespace="hstu", wait_s=0.5)
