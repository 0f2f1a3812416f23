"""Per-user chronological sequences and the leave-one-out split of the public protocol.

`UserSequences` holds every user's events, oldest first, in CSR form (one flat array per field
plus offsets), so batching slices arrays instead of walking Python lists.

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
    >>> split.train.items_of(0).tolist(), split.valid.targets.tolist(), split.test.targets.tolist()
    ([10, 11], [12], [13])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


class SplitError(ValueError):
    """The events cannot be turned into sequences or splits (missing columns, bad values)."""


@dataclass(frozen=True, kw_only=True)
class UserSequences:
    """All users' events, oldest first, as flat arrays with `offsets[u]:offsets[u+1]` per user."""

    user_ids: np.ndarray  # [U] int64
    offsets: np.ndarray  # [U+1] int64
    item_ids: np.ndarray  # [N] int64 raw item ids
    actions: np.ndarray  # [N] int64 action index (0..num_actions-1)
    timestamps: np.ndarray  # [N] int64 seconds

    def __post_init__(self) -> None:
        n = int(self.offsets[-1]) if self.offsets.size else 0
        if self.offsets.size != self.user_ids.size + 1:
            raise SplitError(f"offsets has {self.offsets.size} entries for {self.user_ids.size} users (need U+1)")
        for name in ("item_ids", "actions", "timestamps"):
            if getattr(self, name).size != n:
                raise SplitError(f"{name} has {getattr(self, name).size} entries, offsets say {n}")

    @property
    def num_users(self) -> int:
        return int(self.user_ids.size)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def items_of(self, u: int) -> np.ndarray:
        return self.item_ids[self.offsets[u] : self.offsets[u + 1]]

    def drop_last(self, n: int) -> UserSequences:
        """Every user's sequence without its last `n` events (users must have more than `n`)."""
        lengths = self.lengths
        if n and (lengths <= n).any():
            raise SplitError(f"a user has {int(lengths.min())} events; dropping the last {n} leaves nothing")
        new_lengths = lengths - n
        keep = np.repeat(np.arange(self.num_users), new_lengths)
        pos = np.arange(int(new_lengths.sum())) - np.repeat(np.cumsum(new_lengths) - new_lengths, new_lengths)
        idx = self.offsets[keep] + pos
        offsets = np.zeros(self.num_users + 1, dtype=np.int64)
        np.cumsum(new_lengths, out=offsets[1:])
        return UserSequences(
            user_ids=self.user_ids,
            offsets=offsets,
            item_ids=self.item_ids[idx],
            actions=self.actions[idx],
            timestamps=self.timestamps[idx],
        )

    def last(self, k: int) -> np.ndarray:
        """Index (into the flat arrays) of every user's k-th event from the end (k=1: the last)."""
        return self.offsets[1:] - k


@dataclass(frozen=True, kw_only=True)
class EvalSet:
    """Users' contexts plus the one held-out event each must be ranked on."""

    history: UserSequences
    targets: np.ndarray  # [U] raw item ids
    target_actions: np.ndarray  # [U]
    target_timestamps: np.ndarray  # [U] seconds


@dataclass(frozen=True, kw_only=True)
class LeaveOneOutSplit:
    train: UserSequences
    valid: EvalSet
    test: EvalSet
    num_dropped_users: int


def sequences_from_frame(
    df: pd.DataFrame,
    *,
    action_column: str = "action",
    action_vocab: tuple[str, ...] | None = None,
    action_offset: int = 0,
) -> UserSequences:
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
    ts = df["ts_ms"].to_numpy(np.int64) // 1000
    order = np.lexsort((ts, users))  # by user, then time; lexsort is stable
    users = users[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if users.size else np.zeros(0, np.int64)
    offsets = np.r_[starts, users.size].astype(np.int64)
    return UserSequences(
        user_ids=users[starts] if users.size else np.zeros(0, np.int64),
        offsets=offsets,
        item_ids=df["item_id"].to_numpy(np.int64)[order],
        actions=codes[order],
        timestamps=ts[order],
    )


def leave_one_out(seqs: UserSequences, *, min_events: int = 3) -> LeaveOneOutSplit:
    """Train on all but each user's last two events, validate on the 2nd-to-last, test on the last.

    Users with fewer than `min_events` (>= 3) events are dropped from all three sets and counted.
    """
    if min_events < 3:
        raise SplitError(f"min_events ({min_events}) must be >= 3: one train, one valid and one test event")
    keep = np.flatnonzero(seqs.lengths >= min_events)
    dropped = seqs.num_users - int(keep.size)
    if dropped:
        seqs = select_users(seqs, keep)
    train = seqs.drop_last(2)
    valid_idx = seqs.last(2)
    test_idx = seqs.last(1)
    return LeaveOneOutSplit(
        train=train,
        valid=EvalSet(
            history=train,
            targets=seqs.item_ids[valid_idx],
            target_actions=seqs.actions[valid_idx],
            target_timestamps=seqs.timestamps[valid_idx],
        ),
        test=EvalSet(
            history=seqs.drop_last(1),
            targets=seqs.item_ids[test_idx],
            target_actions=seqs.actions[test_idx],
            target_timestamps=seqs.timestamps[test_idx],
        ),
        num_dropped_users=dropped,
    )


def select_users(seqs: UserSequences, users: np.ndarray) -> UserSequences:
    """The sequences of users at positions `users` (in that order)."""
    users = np.asarray(users, dtype=np.int64)
    lengths = seqs.lengths[users]
    offsets = np.zeros(users.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    idx = np.repeat(seqs.offsets[users] - offsets[:-1], lengths) + np.arange(int(offsets[-1]))
    return UserSequences(
        user_ids=seqs.user_ids[users],
        offsets=offsets,
        item_ids=seqs.item_ids[idx],
        actions=seqs.actions[idx],
        timestamps=seqs.timestamps[idx],
    )
