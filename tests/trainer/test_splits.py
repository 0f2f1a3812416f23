"""trainer/splits.py: time-ordered sequences and the leave-one-out split (with validation)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.sequence_batch import take_users
from trainer.splits import SplitError, drop_last, leave_one_out, sequences_from_frame


def frame() -> pd.DataFrame:
    # user 2 is listed out of time order; user 3 has too few events; ties keep frame order.
    return pd.DataFrame(
        {
            "user_id": [2, 1, 2, 1, 1, 2, 3, 1, 2],
            "item_id": [22, 11, 21, 12, 13, 23, 31, 14, 24],
            "rating": [3, 5, 4, 1, 2, 5, 1, 3, 4],
            "ts_ms": [5000, 1000, 4000, 2000, 2000, 6000, 1000, 9000, 7000],
        }
    )


def test_sequences_are_time_ordered_per_user() -> None:
    seqs = sequences_from_frame(frame(), action_column="rating", action_offset=1)
    assert seqs.user_ids.tolist() == [1, 2, 3]
    assert seqs.sequence(0).item_ids.tolist() == [11, 12, 13, 14]
    assert seqs.sequence(1).item_ids.tolist() == [21, 22, 23, 24]
    assert seqs.actions[:4].tolist() == [4, 0, 1, 2]
    assert seqs.timestamps_ms[:4].tolist() == [1000, 2000, 2000, 9000]
    assert seqs.last_offset.tolist() == [-1, -1, -1]  # not from Kafka: no watermark


def test_leave_one_out() -> None:
    split = leave_one_out(sequences_from_frame(frame(), action_column="rating", action_offset=1))
    assert split.num_dropped_users == 1
    assert split.train.user_ids.tolist() == [1, 2]
    assert [split.train.sequence(u).item_ids.tolist() for u in range(2)] == [[11, 12], [21, 22]]
    assert split.valid.targets.tolist() == [13, 23]
    assert split.test.targets.tolist() == [14, 24]
    assert split.test.target_actions.tolist() == [2, 3]
    assert [split.test.history.sequence(u).item_ids.tolist() for u in range(2)] == [[11, 12, 13], [21, 22, 23]]
    assert split.valid.history is split.train


def test_string_actions_and_errors() -> None:
    df = pd.DataFrame({"user_id": [1, 1], "item_id": [1, 2], "action": ["view", "buy"], "ts_ms": [0, 1]})
    seqs = sequences_from_frame(df, action_vocab=("view", "click", "buy"))
    assert seqs.actions.tolist() == [0, 2]
    with pytest.raises(SplitError, match="'buy' is not in the action vocabulary"):
        sequences_from_frame(df, action_vocab=("view",))
    with pytest.raises(SplitError, match="lacks columns"):
        sequences_from_frame(df.drop(columns=["ts_ms"]))
    with pytest.raises(SplitError, match="min_events"):
        leave_one_out(seqs, min_events=2)


def test_take_users_and_drop_last() -> None:
    seqs = sequences_from_frame(frame(), action_column="rating", action_offset=1)
    assert drop_last(seqs, 0).equals(seqs)
    with pytest.raises(SplitError, match="a user has 1 events; dropping the last 1 leaves nothing"):
        drop_last(seqs, 1)
    sub = take_users(seqs, np.array([2, 0]))
    assert sub.user_ids.tolist() == [3, 1]
    assert sub.sequence(0).item_ids.tolist() == [31] and sub.sequence(1).item_ids.tolist() == [11, 12, 13, 14]
