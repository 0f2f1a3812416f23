"""The training feed coalesces per user, counts what rolls out, bounds its memory, says which
offsets each take covers, and works as a named actor shared by the job and a trainer."""

from __future__ import annotations

import pytest

from features.sequence_batch import SequenceBatch
from streaming.training_feed import FeedConsumer, FeedError, FeedState, TrainingFeed


def examples(rows: dict[int, tuple[list[int], int]]) -> SequenceBatch:
    """{user: (items, num_new)}; times are the item ids in ms."""
    users = sorted(rows)
    return SequenceBatch.from_sequences(
        user_ids=users,
        item_ids=[rows[u][0] for u in users],
        actions=[[0] * len(rows[u][0]) for u in users],
        timestamps_ms=[rows[u][0] for u in users],
        num_new=[rows[u][1] for u in users],
    )


def test_puts_coalesce_per_user_with_the_latest_sequence_and_all_untrained_events():
    feed = FeedState(max_users=100)
    feed.put({0: 0, 1: 0}, {0: 2, 1: 1}, examples({1: ([10, 11], 2), 2: ([20], 1)}), now_ms=100)
    feed.put({0: 2, 1: 1}, {0: 3, 1: 1}, examples({1: ([10, 11, 12], 1)}), now_ms=200)
    assert feed.stats(now_ms=300)["pending_events"] == 4
    took = feed.take(now_ms=300)
    assert took.examples.user_ids.tolist() == [1, 2] and took.examples.num_new.tolist() == [3, 1]
    assert took.examples.sequence(0).item_ids.tolist() == [10, 11, 12]
    assert (took.from_offsets, took.to_offsets, took.num_events, took.oldest_put_ms) == (
        {0: 0, 1: 0},
        {0: 3, 1: 1},
        4,
        100,
    )
    empty = feed.take(now_ms=400)
    assert len(empty.examples) == 0 and empty.from_offsets == {0: 3, 1: 1} and empty.generation == took.generation


def test_events_that_roll_out_of_max_len_are_counted_untrained():
    feed = FeedState()
    feed.put({0: 0}, {0: 3}, examples({5: ([1, 2, 3], 3)}), now_ms=1)
    feed.put({0: 3}, {0: 6}, examples({5: ([4, 5, 6], 3)}), now_ms=2)  # max_len 3: 1..3 are gone
    took = feed.take(now_ms=3)
    assert took.examples.num_new.tolist() == [3] and took.untrained_events == 3
    assert feed.stats(now_ms=4)["untrained_events"] == 3 and feed.take(now_ms=5).untrained_events == 0


def test_memory_is_bounded_by_dropping_the_users_waiting_longest():
    feed = FeedState(max_users=2)
    feed.put({0: 0}, {0: 1}, examples({1: ([1], 1)}), now_ms=1)
    feed.put({0: 1}, {0: 2}, examples({2: ([2], 1)}), now_ms=2)
    feed.put({0: 2}, {0: 4}, examples({3: ([3], 1), 2: ([2, 4], 1)}), now_ms=3)
    took = feed.take(now_ms=4)
    assert took.examples.user_ids.tolist() == [2, 3] and took.untrained_events == 1


def test_a_restarted_job_putting_older_offsets_again_does_not_move_the_delivered_point():
    feed = FeedState()
    feed.put({0: 0}, {0: 5}, examples({1: ([1, 2], 2)}), now_ms=1)
    feed.take(now_ms=2)
    feed.put({0: 3}, {0: 6}, examples({1: ([1, 2, 3], 1)}), now_ms=3)  # replayed from its last commit
    took = feed.take(now_ms=4)
    assert took.from_offsets == {0: 5} and took.to_offsets == {0: 6}


def test_bad_puts_are_refused():
    with pytest.raises(FeedError, match="num_new"):
        FeedState().put({0: 0}, {0: 1}, examples({1: ([1], 1)}).with_num_new(None), now_ms=1)
    with pytest.raises(FeedError, match="max_users"):
        FeedState(max_users=0)


def test_the_named_actor_between_a_job_and_a_trainer(ray_address):
    import ray

    feed = TrainingFeed(actor_name="test-feed", namespace="hstu", max_users=10)
    try:
        consumer = FeedConsumer(actor_name="test-feed", namespace="hstu", wait_s=5)
        for i in range(10):  # more puts than may be in flight: publish never waits for a trainer
            feed.publish({0: i}, {0: i + 1}, examples({i % 3: ([i], 1)}))
        feed.close()
        took = consumer.take()
        assert took.producer_done and took.to_offsets == {0: 10} and took.from_offsets == {0: 0}
        assert sorted(took.examples.user_ids.tolist()) == [0, 1, 2] and took.num_events == 3
        assert took.untrained_events == 7  # each user's sequence holds one event: the others rolled out
        # a job restarting attaches to the same feed (same generation) and reopens it
        again = TrainingFeed(actor_name="test-feed", namespace="hstu", max_users=10)
        assert again.stats()["generation"] == took.generation and not again.stats()["closed"]
    finally:
        ray.kill(ray.get_actor("test-feed", namespace="hstu"))
    with pytest.raises(FeedError, match="no training feed 'nope'"):
        FeedConsumer(actor_name="nope", namespace="hstu", wait_s=0.5)
