"""Per-user chronological sequences and the leave-one-out split of the public protocol.

Sequences are the project's one jagged type, `features.sequence_batch.SequenceBatch` (times in
ms), so batching slices arrays instead of walking Python lists.

`leave_one_out` is the split of Kang & McAuley (SASRec) and the HSTU paper, with the validation
set the reference implementation lacks: a user's last event is the test target, the
second-to-last the validation target, and training sees everything before those two. The model
is evaluated on validation every epoch (context: the training events) and on test at the best
validation epoch (context: training events plus the validation event).

    >>> import pandas as pd
    >>> from trainer.splits import sequences_from_frame, leave_one_out
    >>> df = pd.DataFrame({"user_id": [1, 1, 1, 1], "item_id": [10, 11, 12, 13],
    ...                    "rating": [5, 4, 3, 2], "ts_ms": [1000, 2000, 3000, 4000]})
    >>> split = leave_one_out(sequences_from_frame(df, action_column="rating", action_offset=1))
    >>> split.train.sequence(0).item_ids.tolist(), split.valid.targets.tolist(), split.test.targets.tolist()
    ([10, 11], [12], [13])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.sequence_batch import SequenceBatch, slice_events, take_users


class SplitError(ValueError):
    """The events cannot be turned into sequences or splits (missing columns, bad values)."""


def drop_last(seqs: SequenceBatch, n: int) -> SequenceBatch:
    """Every user's sequence without its last `n` events (users must have more than `n`)."""
    lengths = seqs.lengths
    if n and (lengths <= n).any():
        raise SplitError(f"a user has {int(lengths.min())} events; dropping the last {n} leaves nothing")
    return slice_events(seqs, np.arange(len(seqs)), np.zeros(len(seqs), dtype=np.int64), lengths - n)


@dataclass(frozen=True, kw_only=True)
class EvalSet:
    """Users' contexts plus the one held-out event each must be ranked on."""

    history: SequenceBatch
    targets: np.ndarray  # [U] raw item ids
    target_actions: np.ndarray  # [U]
    target_timestamps_ms: np.ndarray  # [U]


@dataclass(frozen=True, kw_only=True)
class LeaveOneOutSplit:
    train: SequenceBatch
    valid: EvalSet
    test: EvalSet
    num_dropped_users: int


def sequences_from_frame(
    df: pd.DataFrame,
    *,
    action_column: str = "action",
    action_vocab: tuple[str, ...] | None = None,
    action_offset: int = 0,
) -> SequenceBatch:
    """Group an event frame (user_id, item_id, ts_ms, action column) into time-ordered sequences.

    Actions are either strings mapped through `action_vocab` (index in the tuple) or integers
    shifted by `-action_offset` (MovieLens: `rating` with offset 1 gives 0..4). Events with equal
    timestamps keep their order in the frame (stable sort).
    """
    missing = [c for c in ("user_id", "item_id", "ts_ms", action_column) if c not in df.columns]
    if missing:
        raise SplitError(f"event frame lacks columns {missing}; it has {list(df.columns)}")
    if action_vocab is not None:
        codes = pd.Categorical(df[action_column], categories=list(action_vocab)).codes.astype(np.int64)
        if (codes < 0).any():
            bad = df[action_column][codes < 0].iloc[0]
            raise SplitError(f"action {bad!r} is not in the action vocabulary {list(action_vocab)}")
    else:
        codes = df[action_column].to_numpy().astype(np.int64) - action_offset
        if codes.size and codes.min() < 0:
            raise SplitError(f"action {int(codes.min()) + action_offset} minus offset {action_offset} is negative")
    users = df["user_id"].to_numpy(np.int64)
    ts_ms = df["ts_ms"].to_numpy(np.int64)
    order = np.lexsort((ts_ms, users))  # by user, then time; lexsort is stable
    users = users[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if users.size else np.zeros(0, np.int64)
    offsets = np.r_[starts, users.size].astype(np.int64)
    num_users = len(starts)
    return SequenceBatch(
        user_ids=users[starts] if users.size else np.zeros(0, np.int64),
        offsets=offsets,
        item_ids=df["item_id"].to_numpy(np.int64)[order],
        actions=codes[order],
        timestamps_ms=ts_ms[order],
        last_partition=np.full(num_users, -1, dtype=np.int64),
        last_offset=np.full(num_users, -1, dtype=np.int64),
    )


def leave_one_out(seqs: SequenceBatch, *, min_events: int = 3) -> LeaveOneOutSplit:
    """Train on all but each user's last two events, validate on the 2nd-to-last, test on the last.

    Users with fewer than `min_events` (>= 3) events are dropped from all three sets and counted.
    """
    if min_events < 3:
        raise SplitError(f"min_events ({min_events}) must be >= 3: one train, one valid and one test event")
    keep = np.flatnonzero(seqs.lengths >= min_events)
    dropped = len(seqs) - int(keep.size)
    if dropped:
        seqs = take_users(seqs, keep)
    train = drop_last(seqs, 2)
    valid_idx = seqs.last_events(2)
    test_idx = seqs.last_events(1)
    return LeaveOneOutSplit(
        train=train,
        valid=EvalSet(
            history=train,
            targets=seqs.item_ids[valid_idx],
            target_actions=seqs.actions[valid_idx],
            target_timestamps_ms=seqs.timestamps_ms[valid_idx],
        ),
        test=EvalSet(
            history=drop_last(seqs, 1),
            targets=seqs.item_ids[test_idx],
            target_actions=seqs.actions[test_idx],
            target_timestamps_ms=seqs.timestamps_ms[test_idx],
        ),
        num_dropped_users=dropped,
    )
