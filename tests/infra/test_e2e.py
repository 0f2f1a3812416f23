"""End to end over real parts: the broker, a `ray start --head` cluster, `trainer/stream_train.py`
(streaming job -> Feast, Ray Train, registry) and the Serve app over HTTP (infra/loop.py).

A burst of events makes a new item popular with a group of users, with malformed events mixed
in. Within a bounded time `/rank` for a user of that group puts the new item higher than before,
answered by a newer model version; the dead-letter topic holds the malformed events and nothing
else.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

import numpy as np
import pytest

from features.movielens import movielens_events
from infra.loop import Loop, add_arguments, post
from infra.producer import produce_log
from infra.recorded_log import read_topic
from streaming.events import encode_values
from streaming.recorded_log import events_to_log

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SMALL = [  # CPU-sized: the model of trainer/configs/stream.yaml at small dimensions
    "model.dim=16",
    "model.qk_dim=16",
    "model.v_dim=16",
    "model.max_seq_len=50",
    "model.num_time_buckets=32",
    "table.dim=16",
    "table.capacity=5000",
    "loss.num_negatives=32",
    "train.batch_size=64",
    "train.lr=3e-3",
    "train.cpus_per_worker=0.5",
    "train.context_events=30",
    "streaming.max_len=50",
    "streaming.interval_s=0.3",
    "train.progress_every_s=5",
    "eval.max_events=300",
]
ROUNDS, ROUND_GAP_S = 10, 2.0  # the burst
NEW_ITEM = 1700  # ML-100K's items are 1..1682: no version has seen it
CANDIDATES = [50, 100, 181, 258, 286, 288, 294, 300, 1, 121, 174, 127, 98, 56, 7, 117, 172, 222, 313, NEW_ITEM]


def loop_args(topic: str, *overrides: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--rate", "0", "--publish-every", "8", "--ray-cpus", "6"])
    args.topic = topic
    args.overrides = list(overrides)
    return args


def rank_of_new_item(url: str, user: int) -> tuple[int, int] | None:
    """(position of NEW_ITEM among the candidates, answering version), or None without a version."""
    status, answer, _ = post(url, {"user_id": user, "candidates": CANDIDATES})
    if status != 200 or not answer or answer["cold_start"]:
        return None
    order = [item["item_id"] for item in answer["items"]]
    return order.index(NEW_ITEM), answer["version"]


def wait_for(what, timeout_s: float, every_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every_s)
    return None


def test_a_burst_reaches_the_ranking_and_malformed_events_reach_the_dlq(
    kafka_bootstrap, new_topic, tmp_path, monkeypatch
):
    monkeypatch.setenv("HSTU_STATE_DIR", str(tmp_path / "state"))  # the cluster, trainer and Serve inherit it
    topic = new_topic(partitions=2, prefix="e2e")
    events = movielens_events("ml-100k").iloc[:15_000].reset_index(drop=True)
    produce_log(events_to_log(events, topic=topic, num_partitions=2), kafka_bootstrap, topic, partitions=2)
    loop = Loop(
        loop_args(
            topic,
            *SMALL,
            f"streaming.group_id=e2e-{uuid.uuid4().hex[:6]}",
            f"streaming.dlq_topic={topic}.dlq",
            f"streaming.feed.actor_name=feed-{topic}",
            "streaming.freshness_clock=log",
            # A stream trains each event once and coalesces the replay into a few steps: a higher
            # rate than SMALL's lets the burst's ~10 steps move the new item's row visibly.
            "train.lr=2e-2",
        ),
        kafka_bootstrap,
    )
    # The group: 40 users with the most history in the replayed events (they are in Feast).
    group = [int(u) for u in events.user_id.value_counts().index[:40]]
    user = group[0]
    try:
        loop.start_cluster()
        loop.start_trainer()
        loop.start_serving()
        url = f"http://127.0.0.1:{loop.serve_port}/rank"
        before = wait_for(lambda: rank_of_new_item(url, user), timeout_s=300)
        assert before is not None, f"no version answered /rank in 300 s: see {loop.trainer_log}"

        # The burst: every user of the group rates the new item 5, in ROUNDS a few seconds apart
        # (each round is at least one training step: a stream trains each event once, and one
        # optimizer step barely moves a new row); malformed values (not JSON, a missing field, an
        # unknown action, a negative id) mixed in.
        bad = [
            b"not json at all",
            json.dumps({"user_id": 5, "action": "rate_5", "ts_ms": 0}).encode(),
            json.dumps({"user_id": 5, "item_id": NEW_ITEM, "action": "rate_9", "ts_ms": 0}).encode(),
            json.dumps({"user_id": -3, "item_id": NEW_ITEM, "action": "rate_5", "ts_ms": 0}).encode(),
        ]
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        sent_bad = []
        for round_ in range(ROUNDS):
            now = time.time_ns() // 1_000_000
            good = encode_values(
                group, np.full(len(group), NEW_ITEM), ["rate_5"] * len(group), now + np.arange(len(group))
            )
            for user_id, value in zip(group, good):
                producer.send(topic, key=b"%d" % user_id, value=value, timestamp_ms=now)
            producer.send(topic, key=b"bad", value=bad[round_ % len(bad)], timestamp_ms=now)
            sent_bad.append(bad[round_ % len(bad)])
            producer.flush()
            time.sleep(ROUND_GAP_S)
        producer.close()

        def improved():
            now_rank = rank_of_new_item(url, user)
            return now_rank if now_rank and now_rank[1] > before[1] and now_rank[0] < before[0] else None

        after = wait_for(improved, timeout_s=300)
        assert after is not None, (
            f"in 300 s /rank for user {user} did not put item {NEW_ITEM} above position {before[0]} "
            f"(version {before[1]}); last: {rank_of_new_item(url, user)}"
        )
        dlq = read_topic(kafka_bootstrap, f"{topic}.dlq")
        assert sorted(dlq.column("value").to_pylist()) == sorted(sent_bad)
    finally:
        stopped = loop.stop()
    assert stopped["trainer_exit"] == 0, f"the trainer did not stop cleanly: see {loop.trainer_log}"
