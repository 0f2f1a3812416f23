"""features/sequence_batch.py: the one jagged sequence type, its checks and its gathers."""

from __future__ import annotations

import numpy as np
import pytest

from features import sequence_batch
from features.sequence_batch import SequenceBatch, SequenceBatchError, concat_batches, slice_events, take_users


def batch_of(lengths: list[int], **kwargs) -> SequenceBatch:
    """User 10 + i has `lengths[i]` events: items 100 * i + k, times k seconds (in ms)."""
    return SequenceBatch.from_sequences(
        user_ids=[10 + i for i in range(len(lengths))],
        item_ids=[[100 * i + k for k in range(n)] for i, n in enumerate(lengths)],
        actions=[[k % 5 for k in range(n)] for n in lengths],
        timestamps_ms=[[1000 * k for k in range(n)] for n in lengths],
        **kwargs,
    )


def test_invalid_batches_are_rejected_with_the_fix():
    good = batch_of([2])
    fields = {name: getattr(good, name) for name in sequence_batch._INT64_FIELDS}
    with pytest.raises(SequenceBatchError, match=r"item_ids must be a 1-D int64 .*float64"):
        SequenceBatch(**{**fields, "item_ids": fields["item_ids"].astype(np.float64)})
    with pytest.raises(SequenceBatchError, match=r"offsets has 3 entries, expected .* 2"):
        SequenceBatch(**{**fields, "offsets": np.array([0, 1, 2], dtype=np.int64)})
    with pytest.raises(SequenceBatchError, match=r"actions has 1 events but offsets\[-1\] is 2"):
        SequenceBatch(**{**fields, "actions": np.array([1], dtype=np.int64)})
    with pytest.raises(SequenceBatchError, match=r"last_offset of user 10 is -2"):
        SequenceBatch(**{**fields, "last_offset": np.array([-2], dtype=np.int64)})
    with pytest.raises(SequenceBatchError, match=r"num_new of user 10 is 3, outside \[0, 2\]"):
        SequenceBatch(**{**fields, "num_new": np.array([3], dtype=np.int64)})
    with pytest.raises(SequenceBatchError, match=r"num_new has 2 entries but user_ids has 1"):
        SequenceBatch(**{**fields, "num_new": np.array([1, 1], dtype=np.int64)})
    with pytest.raises(SequenceBatchError, match=r"floats cannot hold int64 ids"):
        SequenceBatch.from_sequences(user_ids=[1], item_ids=[[1.5]], actions=[[0]], timestamps_ms=[[0]])
    with pytest.raises(SequenceBatchError, match=r"timestamps_ms lengths \[1\] differ"):
        SequenceBatch.from_sequences(user_ids=[1], item_ids=[[1, 2]], actions=[[0, 0]], timestamps_ms=[[0]])


def test_watermarks_default_to_none_applied_and_num_new_is_optional():
    batch = batch_of([2, 0, 3])
    assert batch.last_partition.tolist() == [-1, -1, -1] and batch.last_offset.tolist() == [-1, -1, -1]
    assert batch.num_new is None and batch.sequence(0).num_new is None
    examples = batch.with_num_new(np.array([1, 0, 3]))
    assert examples.sequence(2).num_new == 3 and not examples.equals(batch)
    assert examples.with_num_new(None).equals(batch)
    assert batch.num_events == 5 and batch.last_events(1).tolist() == [1, 1, 4]


def test_take_users_gathers_slices_and_num_new_in_the_given_order():
    batch = batch_of([2, 0, 3], num_new=[1, 0, 2])
    sub = take_users(batch, np.array([2, 0, 2]))
    assert sub.user_ids.tolist() == [12, 10, 12]
    assert sub.item_ids.tolist() == [200, 201, 202, 0, 1, 200, 201, 202]
    assert sub.offsets.tolist() == [0, 3, 5, 8] and sub.num_new.tolist() == [2, 1, 2]
    assert take_users(batch, np.array([], dtype=np.int64)).equals(take_users(batch, np.zeros(0, np.int64)))


def test_slice_events_cuts_windows_and_refuses_out_of_range():
    batch = batch_of([4, 3])
    cut = slice_events(batch, np.array([1, 0]), np.array([1, 0]), np.array([3, 2]), num_new=[1, 2])
    assert cut.item_ids.tolist() == [101, 102, 0, 1] and cut.timestamps_ms.tolist() == [1000, 2000, 0, 1000]
    assert cut.user_ids.tolist() == [11, 10] and cut.num_new.tolist() == [1, 2]
    with pytest.raises(SequenceBatchError, match="0 <= start <= end"):
        slice_events(batch, np.array([1]), np.array([0]), np.array([4]))


def test_concat_keeps_order_and_refuses_mixed_num_new():
    a, b = batch_of([1, 2]), batch_of([3])
    both = concat_batches([a, b])
    assert both.lengths.tolist() == [1, 2, 3] and both.user_ids.tolist() == [10, 11, 10]
    assert concat_batches([]).equals(SequenceBatch.empty())
    with pytest.raises(SequenceBatchError, match="either every batch has num_new or none"):
        concat_batches([a, b.with_num_new(np.array([1]))])
