"""The one jagged sequence type: many users' events as flat int64 arrays plus offsets.

Every layer passes sequences as a `SequenceBatch`: Feast reads and writes it
(features/sequences.py), the streaming job updates it and the training feed carries it
(streaming/), the offline and stream trainers batch it, and serving reads it. Sequence `i` is
`item_ids[offsets[i]:offsets[i + 1]]`, oldest first, with `actions` as int64 codes into the
action vocabulary and `timestamps_ms` in milliseconds since the epoch (the unit of the
engagement event's `ts_ms`; the model converts to its own unit in one place,
`trainer.model.bias_seconds`). Ids are never converted to floats, so int64 ids above 2**53
stay exact.

Two optional parts:

- the watermark (`last_partition`, `last_offset`) of the last Kafka event applied to each
  sequence; (-1, -1) means none (a user never stored, or data that did not come from Kafka);
- `num_new`: per user, the trailing events that no model has trained on yet. A batch with
  `num_new` is a batch of training examples (the loss is taken on those positions only); None
  means "not examples".

    >>> import numpy as np
    >>> from features.sequence_batch import SequenceBatch, take_users
    >>> batch = SequenceBatch.from_sequences(user_ids=[7, 9], item_ids=[[1, 2], [3]],
    ...     actions=[[0, 4], [1]], timestamps_ms=[[1_000, 2_000], [5_000]], num_new=[1, 1])
    >>> batch.lengths.tolist(), batch.last_offset.tolist()
    ([2, 1], [-1, -1])
    >>> sub = take_users(batch, np.array([1]))
    >>> sub.item_ids.tolist(), sub.num_new.tolist()
    ([3], [1])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import NamedTuple

import numpy as np
import pandas as pd

from features.definitions import EVENT_TIMESTAMP, USER_ID

# Per-user and per-event arrays: each 1-D int64.
USER_FIELDS = ("user_ids", "last_partition", "last_offset")
EVENT_FIELDS = ("item_ids", "actions", "timestamps_ms")
_INT64_FIELDS = ("user_ids", "offsets", *EVENT_FIELDS, "last_partition", "last_offset")


class SequenceBatchError(ValueError):
    """A `SequenceBatch` (or the ids that select from one) breaks the data contract."""


class UserSequence(NamedTuple):
    """One user's rolling sequence: arrays oldest first, its watermark and its new events."""

    user_id: int
    item_ids: np.ndarray
    actions: np.ndarray
    timestamps_ms: np.ndarray
    last_partition: int
    last_offset: int
    num_new: int | None


@dataclass(frozen=True, kw_only=True, eq=False)
class SequenceBatch:
    """Many users' rolling sequences as jagged int64 arrays.

    `user_ids`, `last_partition`, `last_offset`, `num_new`: shape (B,). `offsets`: shape (B + 1,),
    starting at 0, non-decreasing. `item_ids`, `actions`, `timestamps_ms`: shape (offsets[-1],);
    user `i`'s events are `[offsets[i], offsets[i + 1])`, oldest first. Every array is 1-D int64;
    nothing is converted, so a float array (which cannot hold ids above 2**53 exactly) is
    rejected. Build one from Python lists with `from_sequences`.
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    item_ids: np.ndarray
    actions: np.ndarray
    timestamps_ms: np.ndarray
    last_partition: np.ndarray
    last_offset: np.ndarray
    num_new: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in _INT64_FIELDS + (("num_new",) if self.num_new is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.dtype != np.int64 or value.ndim != 1:
                got = (
                    f"dtype {value.dtype}, shape {value.shape}"
                    if isinstance(value, np.ndarray)
                    else type(value).__name__
                )
                raise SequenceBatchError(
                    f"SequenceBatch.{name} must be a 1-D int64 numpy array, got {got}: "
                    "build it with np.asarray(values, dtype=np.int64) or use "
                    "SequenceBatch.from_sequences"
                )
        num_users = len(self.user_ids)
        for name in ("last_partition", "last_offset", "num_new"):
            value = getattr(self, name)
            if value is not None and len(value) != num_users:
                raise SequenceBatchError(
                    f"SequenceBatch.{name} has {len(value)} entries but user_ids has {num_users}: give one per user"
                )
        if len(self.offsets) != num_users + 1:
            raise SequenceBatchError(
                f"SequenceBatch.offsets has {len(self.offsets)} entries, expected len(user_ids) + 1 = {num_users + 1}"
            )
        if self.offsets[0] != 0 or np.any(np.diff(self.offsets) < 0):
            raise SequenceBatchError(
                f"SequenceBatch.offsets must start at 0 and never decrease, got "
                f"{self.offsets[:8].tolist()}{'...' if len(self.offsets) > 8 else ''}"
            )
        total = int(self.offsets[-1])
        for name in EVENT_FIELDS:
            if len(getattr(self, name)) != total:
                raise SequenceBatchError(
                    f"SequenceBatch.{name} has {len(getattr(self, name))} events but offsets[-1] is "
                    f"{total}: every event needs an item, an action and a timestamp"
                )
        for name in ("last_partition", "last_offset"):
            below = np.flatnonzero(getattr(self, name) < -1)
            if len(below):
                i = int(below[0])
                raise SequenceBatchError(
                    f"SequenceBatch.{name} of user {int(self.user_ids[i])} is "
                    f"{int(getattr(self, name)[i])}: use -1 for 'no event applied yet'"
                )
        if self.num_new is not None:
            bad = np.flatnonzero((self.num_new < 0) | (self.num_new > self.lengths))
            if len(bad):
                i = int(bad[0])
                raise SequenceBatchError(
                    f"SequenceBatch.num_new of user {int(self.user_ids[i])} is {int(self.num_new[i])}, "
                    f"outside [0, {int(self.lengths[i])}] (its number of events)"
                )

    @classmethod
    def from_sequences(
        cls,
        *,
        user_ids: Sequence[int] | np.ndarray,
        item_ids: Sequence[Sequence[int] | np.ndarray],
        actions: Sequence[Sequence[int] | np.ndarray],
        timestamps_ms: Sequence[Sequence[int] | np.ndarray],
        last_partition: Sequence[int] | np.ndarray | None = None,
        last_offset: Sequence[int] | np.ndarray | None = None,
        num_new: Sequence[int] | np.ndarray | None = None,
    ) -> SequenceBatch:
        """Build a batch from one list of ints per user (ints, not floats: ids must be exact).

        Watermarks default to (-1, -1): no Kafka event applied."""
        lengths = [len(seq) for seq in item_ids]
        for name, seqs in (("actions", actions), ("timestamps_ms", timestamps_ms)):
            other = [len(seq) for seq in seqs]
            if other != lengths:
                raise SequenceBatchError(
                    f"{name} lengths {other[:8]} differ from item_ids lengths {lengths[:8]}: "
                    "give each user one action and one timestamp per item"
                )
        if len(lengths) != len(user_ids):
            raise SequenceBatchError(f"{len(lengths)} sequences for {len(user_ids)} user_ids: give one per user")

        def flat(seqs: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
            parts = [as_int64(seq) for seq in seqs]
            return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

        none = np.full(len(lengths), -1, dtype=np.int64)
        return cls(
            user_ids=as_int64(user_ids),
            offsets=offsets_from_lengths(np.asarray(lengths, dtype=np.int64)),
            item_ids=flat(item_ids),
            actions=flat(actions),
            timestamps_ms=flat(timestamps_ms),
            last_partition=none if last_partition is None else as_int64(last_partition),
            last_offset=none.copy() if last_offset is None else as_int64(last_offset),
            num_new=None if num_new is None else as_int64(num_new),
        )

    @classmethod
    def empty(cls) -> SequenceBatch:
        """A batch of no users."""
        return cls.from_sequences(user_ids=[], item_ids=[], actions=[], timestamps_ms=[])

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Events per user, shape (B,)."""
        return np.diff(self.offsets)

    @property
    def num_events(self) -> int:
        return int(self.offsets[-1])

    def sequence(self, i: int) -> UserSequence:
        """User `i` of the batch (views into the batch's arrays, not copies)."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return UserSequence(
            user_id=int(self.user_ids[i]),
            item_ids=self.item_ids[start:end],
            actions=self.actions[start:end],
            timestamps_ms=self.timestamps_ms[start:end],
            last_partition=int(self.last_partition[i]),
            last_offset=int(self.last_offset[i]),
            num_new=None if self.num_new is None else int(self.num_new[i]),
        )

    def __iter__(self) -> Iterator[UserSequence]:
        return (self.sequence(i) for i in range(len(self)))

    def equals(self, other: SequenceBatch) -> bool:
        """True when both batches hold the same users, events, watermarks and `num_new`, in order."""
        if (self.num_new is None) != (other.num_new is None):
            return False
        names = _INT64_FIELDS + (("num_new",) if self.num_new is not None else ())
        return all(np.array_equal(getattr(self, name), getattr(other, name)) for name in names)

    def with_num_new(self, num_new: np.ndarray | None) -> SequenceBatch:
        """The same sequences with `num_new` replaced (None: not training examples)."""
        return replace(self, num_new=None if num_new is None else as_int64(num_new))

    def last_events(self, k: int) -> np.ndarray:
        """Index into the event arrays of every user's k-th event from the end (k=1: the last)."""
        return self.offsets[1:] - k

    def to_pandas(self, *, event_timestamp: datetime) -> pd.DataFrame:
        """One row per user in the layout of the Feast push source (for `FeatureStore.push`)."""
        cut = self.offsets[1:-1]
        return pd.DataFrame(
            {
                USER_ID: self.user_ids,
                "item_ids": np.split(self.item_ids, cut),
                "actions": np.split(self.actions, cut),
                "timestamps_ms": np.split(self.timestamps_ms, cut),
                "last_partition": self.last_partition,
                "last_offset": self.last_offset,
                EVENT_TIMESTAMP: pd.Series([event_timestamp] * len(self), dtype="datetime64[us, UTC]"),
            }
        )


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    """[0, cumsum(lengths)...] as int64: the offsets of sequences of `lengths`."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def gather_slices(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(event index of every kept event, new offsets) for the slices [starts[i], starts[i] + lengths[i])
    of a flat event array, in order: the vectorised gather behind `take_users` and `slice_events`."""
    offsets = offsets_from_lengths(lengths)
    index = np.repeat(np.asarray(starts, dtype=np.int64) - offsets[:-1], lengths) + np.arange(int(offsets[-1]))
    return index, offsets


def gather(
    batch: SequenceBatch, rows: np.ndarray, index: np.ndarray, offsets: np.ndarray, num_new: np.ndarray | None
) -> SequenceBatch:
    """The users at `rows` with the events at `index` (their new `offsets`) and `num_new`: the one
    place a batch is rebuilt from a selection (take_users, slice_events, trainer.batching)."""
    return SequenceBatch(
        user_ids=batch.user_ids[rows],
        offsets=offsets,
        item_ids=batch.item_ids[index],
        actions=batch.actions[index],
        timestamps_ms=batch.timestamps_ms[index],
        last_partition=batch.last_partition[rows],
        last_offset=batch.last_offset[rows],
        num_new=num_new,
    )


def take_users(batch: SequenceBatch, rows: np.ndarray) -> SequenceBatch:
    """The sub-batch of users at positions `rows`, in that order (a vectorised gather)."""
    rows = np.asarray(rows, dtype=np.int64)
    index, offsets = gather_slices(batch.offsets[rows], batch.lengths[rows])
    return gather(batch, rows, index, offsets, None if batch.num_new is None else batch.num_new[rows])


def slice_events(
    batch: SequenceBatch, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, num_new: np.ndarray | None = None
) -> SequenceBatch:
    """For each `rows[i]`, the events at positions [starts[i], ends[i]) of that user's sequence.

    The sub-sequences keep their user ids and watermarks; `num_new` (default none) is given per
    row. Used to cut histories (`ends` = the event being predicted) and training windows."""
    rows = np.asarray(rows, dtype=np.int64)
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    if np.any(starts < 0) or np.any(ends < starts) or np.any(ends > batch.lengths[rows]):
        raise SequenceBatchError("slice_events: every slice must satisfy 0 <= start <= end <= its user's length")
    index, offsets = gather_slices(batch.offsets[rows] + starts, ends - starts)
    return gather(batch, rows, index, offsets, None if num_new is None else as_int64(num_new))


def concat_batches(batches: Sequence[SequenceBatch]) -> SequenceBatch:
    """The users of `batches`, one after the other (no check that they are distinct)."""
    if not batches:
        return SequenceBatch.empty()
    if len(batches) == 1:
        return batches[0]
    with_new = [b.num_new is not None for b in batches]
    if any(with_new) and not all(with_new):
        raise SequenceBatchError("concat_batches: either every batch has num_new or none has")
    offsets = offsets_from_lengths(np.concatenate([b.lengths for b in batches]))
    return SequenceBatch(
        user_ids=np.concatenate([b.user_ids for b in batches]),
        offsets=offsets,
        item_ids=np.concatenate([b.item_ids for b in batches]),
        actions=np.concatenate([b.actions for b in batches]),
        timestamps_ms=np.concatenate([b.timestamps_ms for b in batches]),
        last_partition=np.concatenate([b.last_partition for b in batches]),
        last_offset=np.concatenate([b.last_offset for b in batches]),
        num_new=np.concatenate([b.num_new for b in batches]) if all(with_new) else None,
    )


def as_int64(values: Sequence[int] | np.ndarray) -> np.ndarray:
    """`values` as a 1-D int64 array; floats are refused (they cannot hold every int64 id)."""
    array = np.asarray(values)
    if array.size == 0:
        return np.empty(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise SequenceBatchError(
            f"expected integer ids, got dtype {array.dtype} (e.g. {array.ravel()[:3].tolist()}): "
            "floats cannot hold int64 ids above 2**53 exactly, pass ints"
        )
    if array.dtype == np.uint64 and array.size and array.max() > np.iinfo(np.int64).max:
        raise SequenceBatchError(f"id {int(array.max())} does not fit in int64")
    return array.astype(np.int64, copy=False).ravel()
