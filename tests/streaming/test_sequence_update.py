"""apply_events against a plain per-user Python model of the rolling sequence, batch by batch."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.sequence_batch import SequenceBatch, take_users
from streaming.decode import order_events
from streaming.sequence_update import apply_events, touched_users, training_examples


def events_table(rows: list[tuple[int, int, int, int, int, int]]) -> pa.Table:
    """rows of (user, item, action, ts, partition, offset)."""
    cols = list(zip(*rows)) if rows else [[]] * 6
    return pa.table(
        {
            "partition": pa.array(cols[4], pa.int32()),
            "offset": pa.array(cols[5], pa.int64()),
            "timestamp_ms": pa.array([0] * len(rows), pa.int64()),
            "user_id": pa.array(cols[0], pa.int64()),
            "item_id": pa.array(cols[1], pa.int64()),
            "action": pa.array(cols[2], pa.int8()),
            "ts_ms": pa.array(cols[3], pa.int64()),
        }
    )


def empty_store(users: np.ndarray) -> SequenceBatch:
    n = len(users)
    z = np.zeros(0, dtype=np.int64)
    return SequenceBatch(
        user_ids=users.astype(np.int64),
        offsets=np.zeros(n + 1, dtype=np.int64),
        item_ids=z,
        actions=z,
        timestamps_ms=z,
        last_partition=np.full(n, -1, dtype=np.int64),
        last_offset=np.full(n, -1, dtype=np.int64),
    )


class DictStore:
    """The reference: one Python list per user, updated event by event."""

    def __init__(self) -> None:
        self.rows: dict[int, dict] = {}

    def read(self, users: np.ndarray) -> SequenceBatch:
        got = [self.rows.get(int(u), {"seq": [], "wm": (-1, -1)}) for u in users]
        return SequenceBatch.from_sequences(
            user_ids=users,
            item_ids=[[e[0] for e in g["seq"]] for g in got],
            actions=[[e[1] for e in g["seq"]] for g in got],
            timestamps_ms=[[e[2] for e in g["seq"]] for g in got],
            last_partition=[g["wm"][0] for g in got],
            last_offset=[g["wm"][1] for g in got],
        )

    def write(self, batch: SequenceBatch) -> None:
        for s in batch:
            self.rows[s.user_id] = {
                "seq": list(zip(s.item_ids.tolist(), s.actions.tolist(), s.timestamps_ms.tolist())),
                "wm": (s.last_partition, s.last_offset),
            }


def reference(batches: list[list[tuple]], max_len: int) -> dict[int, list[tuple]]:
    """Each batch sorted by (user, ts, offset); events after the watermark appended; last max_len kept."""
    seqs: dict[int, list] = {}
    marks: dict[int, int] = {}
    for batch in batches:
        for u, i, a, t, _p, o in sorted(batch, key=lambda r: (r[0], r[3], r[5])):
            if o <= marks.get(u, -1):
                continue
            seqs.setdefault(u, []).append((i, a, t))
            seqs[u] = seqs[u][-max_len:]
        for u, *_, o in batch:
            marks[u] = max(marks.get(u, -1), o)
    return seqs


def run_batches(batches: list[list[tuple]], max_len: int) -> tuple[DictStore, list]:
    store, updates = DictStore(), []
    for rows in batches:
        ordered = order_events(events_table(rows))
        users = touched_users(ordered)
        update = apply_events(store.read(users), ordered, max_len=max_len)
        store.write(update.changed_sequences())
        updates.append(update)
    return store, updates


def test_append_truncate_and_watermark():
    store, (u1, u2) = run_batches(
        [
            [(1, 10, 0, 100, 0, 0), (1, 11, 1, 50, 0, 1), (2, 20, 2, 5, 1, 0)],
            [(1, 12, 3, 200, 0, 2), (1, 13, 4, 300, 0, 3)],
        ],
        max_len=3,
    )
    # Within a batch, (ts, offset) order: item 11 (ts 50) before item 10 (ts 100).
    assert [e[0] for e in store.rows[1]["seq"]] == [10, 12, 13]
    assert store.rows[1]["wm"] == (0, 3) and store.rows[2]["wm"] == (1, 0)
    assert u1.num_new.tolist() == [2, 1] and u2.num_new.tolist() == [2]
    assert u2.changed.tolist() == [True] and u2.applied == 2 and u2.skipped == 0


def test_replay_changes_nothing_but_counts_unacknowledged_events_as_new():
    first = [(7, 1, 0, 1, 2, 40), (7, 2, 0, 2, 2, 41), (8, 3, 1, 3, 2, 42)]
    store, _ = run_batches([first], max_len=10)
    before = {u: dict(r) for u, r in store.rows.items()}
    # The crashed batch is read again, together with newer events of user 7.
    replay = first + [(7, 4, 0, 5, 2, 43)]
    ordered = order_events(events_table(replay))
    update = apply_events(store.read(touched_users(ordered)), ordered, max_len=10)
    assert update.skipped == 3 and update.applied == 1
    assert update.changed.tolist() == [True, False]  # user 8 needs no write
    assert update.num_new.tolist() == [3, 1]  # the replayed events are still untrained targets
    assert update.sequences.sequence(0).item_ids.tolist() == [1, 2, 4]
    assert update.sequences.sequence(1).item_ids.tolist() == [3] and before[8] == store.rows[8]


def test_num_new_is_capped_by_the_sequence_length():
    _, (update,) = run_batches([[(1, i, 0, i, 0, i) for i in range(10)]], max_len=4)
    assert update.sequences.sequence(0).item_ids.tolist() == [6, 7, 8, 9]
    assert update.num_new.tolist() == [4]


def test_events_from_another_partition_are_applied_and_counted():
    store, _ = run_batches([[(1, 5, 0, 1, 0, 9)]], max_len=5)
    ordered = order_events(events_table([(1, 6, 0, 2, 3, 2)]))
    update = apply_events(store.read(touched_users(ordered)), ordered, max_len=5)
    assert update.partition_moves == 1 and update.applied == 1
    assert (int(update.sequences.last_partition[0]), int(update.sequences.last_offset[0])) == (3, 2)


def test_wrong_users_or_unordered_events_are_refused():
    ordered = order_events(events_table([(1, 5, 0, 1, 0, 0), (2, 5, 0, 1, 0, 1)]))
    with pytest.raises(ValueError, match="read exactly touched_users"):
        apply_events(empty_store(np.array([1])), ordered, max_len=3)
    unordered = events_table([(2, 5, 0, 1, 0, 0), (1, 5, 0, 1, 0, 1)])
    with pytest.raises(ValueError, match="order_events"):
        apply_events(empty_store(np.array([1, 2])), unordered, max_len=3)


def test_take_users_and_training_examples():
    _, (update,) = run_batches([[(1, 10, 0, 1, 0, 0), (2, 20, 1, 2, 0, 1), (2, 21, 1, 3, 0, 2)]], max_len=5)
    sub = take_users(update.sequences, np.array([1]))
    assert sub.user_ids.tolist() == [2] and sub.item_ids.tolist() == [20, 21]
    examples = training_examples(update)
    assert len(examples) == 2 and examples.num_new.tolist() == [1, 2]
    seq = examples.sequence(1)
    assert (seq.user_id, seq.item_ids.tolist(), seq.actions.tolist(), seq.timestamps_ms.tolist()) == (
        2,
        [20, 21],
        [1, 1],
        [2, 3],
    )
    assert (seq.num_new, seq.last_partition, seq.last_offset) == (2, 0, 2)


def test_ids_above_2_53_stay_exact():
    big = 2**62 + 1
    store, _ = run_batches([[(big, big + 2, 0, 1, 0, 0)]], max_len=3)
    assert store.rows[big]["seq"] == [(big + 2, 0, 1)]


event = st.tuples(st.integers(0, 5), st.integers(0, 3), st.integers(0, 50))  # user, action, ts


@settings(max_examples=60, deadline=None)
@given(stream=st.lists(event, max_size=80), cuts=st.lists(st.integers(0, 80), max_size=6), max_len=st.integers(1, 6))
def test_matches_reference_for_any_batching(stream, cuts, max_len):
    # Offsets per partition as Kafka assigns them; a user's partition is user % 2.
    next_off = [0, 0]
    rows = []
    for i, (u, a, t) in enumerate(stream):
        p = u % 2
        rows.append((u, 1000 + i, a, t, p, next_off[p]))
        next_off[p] += 1
    bounds = sorted({0, len(rows), *[c for c in cuts if c <= len(rows)]})
    batches = [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    store, updates = run_batches(batches, max_len)
    want = reference(batches, max_len)
    assert {u: r["seq"] for u, r in store.rows.items()} == want
    # In a crash-free run every event is a target exactly once, unless it fell off the sequence:
    # per batch and user, the batch's events up to max_len of them (the last ones).
    for batch, update in zip(batches, updates):
        per_user = np.bincount([r[0] for r in batch], minlength=6)
        assert int(update.num_new.sum()) == int(np.minimum(per_user, max_len).sum())
    if max_len >= len(rows):
        assert sum(int(u.num_new.sum()) for u in updates) == len(rows)
