"""The rolling-sequence update: apply a micro-batch's ordered events to the stored sequences.

The batch arrives decoded and ordered (streaming/decode.py: `decode_block` runs in the Ray Data
read tasks, `order_events` sorts by (user_id, ts_ms, offset)). Every step here is vectorised
over the whole batch (numpy; no Python loop per event or user):

- `apply_events(current, events, max_len)`: the touched users' stored sequences (read in one
   batched call) plus their new events -> the updated sequences, and `num_new` per user.

Exactly-once effect comes from the watermark (`last_partition`, `last_offset`) of each sequence:
an event of the watermark's partition at or below its offset was applied before and is skipped,
so replaying a batch after a crash changes nothing. Events of a user always share a partition
(the Kafka key is the user id); an event from another partition than the watermark's (the topic
was repartitioned) is applied and counted in `partition_moves`. Watermarks are offsets of one
topic, so one Feast store serves one topic: pointing a job at another topic with the same store
(and overlapping user ids) would skip that topic's events as already applied.

Order: a batch's new events are appended after the stored ones, in (ts_ms, offset) order within
the batch; then the sequence keeps its last `max_len` events. For a stream in which each user's
events arrive in time order (Kafka keeps a key's order), that is exactly "the user's last
`max_len` events by (ts_ms, offset)", whatever the batch boundaries.

`num_new` counts, per user, the batch's events that are in the sequence: new ones and ones that an
earlier, crashed attempt applied but no commit covered (so no consumer is known to have trained
on them). They are always the trailing `num_new` positions, because a batch's events come after
every event of earlier batches of the user's partition.

    >>> import numpy as np, pyarrow as pa
    >>> from features.sequence_batch import SequenceBatch
    >>> cur = SequenceBatch.from_sequences(user_ids=[7], item_ids=[[1, 2]], actions=[[0, 0]],
    ...     timestamps_ms=[[10, 20]], last_partition=[0], last_offset=[5])
    >>> ev = pa.table({"user_id": [7, 7], "item_id": [2, 3], "action": pa.array([0, 1], pa.int8()),
    ...     "ts_ms": [20, 30], "partition": pa.array([0, 0], pa.int32()), "offset": [5, 6]})
    >>> up = apply_events(cur, ev, max_len=2)
    >>> up.sequences.item_ids.tolist(), up.num_new.tolist(), up.skipped, up.sequences.last_offset.tolist()
    ([2, 3], [2], 1, [6])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from features.sequence_batch import SequenceBatch, take_users


def touched_users(ordered: pa.Table) -> np.ndarray:
    """The distinct users of ordered events, ascending (the order `apply_events` expects)."""
    return np.unique(ordered.column("user_id").to_numpy())


@dataclass(frozen=True)
class SequenceUpdate:
    """The result of applying one batch to the touched users' sequences.

    sequences: every touched user's updated sequence (same order as the input).
    num_new: per user, the trailing positions that hold this batch's events.
    changed: per user, whether anything was appended (only those rows need writing).
    applied / skipped: events appended / skipped as at or below the watermark.
    rolled_out: the batch's events that fell off the front of their sequence (more than max_len
      for the user in one batch) and so reach no trainer: the feed counts them as untrained.
    """

    sequences: SequenceBatch
    num_new: np.ndarray
    changed: np.ndarray
    applied: int
    skipped: int
    partition_moves: int
    rolled_out: int = 0

    def changed_sequences(self) -> SequenceBatch:
        return take_users(self.sequences, np.flatnonzero(self.changed))


def apply_events(current: SequenceBatch, events: pa.Table, *, max_len: int) -> SequenceUpdate:
    """Append `events` (ordered by `order_events`) to `current` (the stored sequences of exactly
    `touched_users(events)`, in that order), skip what the watermarks cover, keep `max_len`."""
    uid = events.column("user_id").to_numpy()
    users, counts = np.unique(uid, return_counts=True)
    if not np.array_equal(users, current.user_ids):
        raise ValueError(
            f"current sequences are for {len(current)} users, the events touch {len(users)}: read "
            "exactly touched_users(events), in that order"
        )
    if len(uid) > 1 and np.any(np.diff(uid) < 0):
        raise ValueError("events are not grouped by user: pass them through order_events first")
    num_users = len(users)
    ev_user = np.repeat(np.arange(num_users), counts)  # (E,) user index of each event
    part = events.column("partition").to_numpy().astype(np.int64)
    off = events.column("offset").to_numpy()
    wm_part = current.last_partition[ev_user]
    wm_off = current.last_offset[ev_user]
    seen = (part == wm_part) & (off <= wm_off)
    moved = (wm_part >= 0) & (part != wm_part)
    keep = ~seen

    old_len = current.lengths
    new_len = np.bincount(ev_user[keep], minlength=num_users)
    total = old_len + new_len
    final = np.minimum(total, max_len)
    drop = total - final  # oldest events that fall off the front
    out_offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(final, out=out_offsets[1:])
    size = int(out_offsets[-1])

    # Stored events: position j of user u stays if j >= drop[u], moving to j - drop[u].
    old_user = np.repeat(np.arange(num_users), old_len)
    old_pos = np.arange(len(current.item_ids)) - current.offsets[old_user]
    old_sel = old_pos >= drop[old_user]
    old_dest = out_offsets[old_user[old_sel]] + old_pos[old_sel] - drop[old_user[old_sel]]
    # New events: the k-th kept event of user u sits at old_len[u] + k before the cut.
    k_user = ev_user[keep]
    k_first = np.zeros(num_users, dtype=np.int64)
    np.cumsum(new_len[:-1], out=k_first[1:])
    new_pos = old_len[k_user] + np.arange(len(k_user)) - k_first[k_user]
    new_sel = new_pos >= drop[k_user]
    new_dest = out_offsets[k_user[new_sel]] + new_pos[new_sel] - drop[k_user[new_sel]]

    def assemble(stored: np.ndarray, incoming: np.ndarray) -> np.ndarray:
        out = np.empty(size, dtype=np.int64)
        out[old_dest] = stored[old_sel]
        out[new_dest] = incoming[keep][new_sel]
        return out

    last_partition = current.last_partition.copy()
    last_offset = current.last_offset.copy()
    kept_off = off[keep]
    # Kept events sit after the watermark; the new watermark is the largest kept offset.
    by_offset = np.lexsort((kept_off, k_user))
    ends = np.flatnonzero(np.r_[k_user[by_offset][1:] != k_user[by_offset][:-1], len(by_offset) > 0])
    last_rows = by_offset[ends] if len(by_offset) else by_offset
    last_offset[k_user[last_rows]] = kept_off[last_rows]
    last_partition[k_user[last_rows]] = part[keep][last_rows]

    sequences = SequenceBatch(
        user_ids=users.astype(np.int64),
        offsets=out_offsets,
        item_ids=assemble(current.item_ids, events.column("item_id").to_numpy()),
        actions=assemble(current.actions, events.column("action").to_numpy().astype(np.int64)),
        timestamps_ms=assemble(current.timestamps_ms, events.column("ts_ms").to_numpy()),
        last_partition=last_partition,
        last_offset=last_offset,
    )
    num_new = np.minimum(counts, final).astype(np.int64)
    return SequenceUpdate(
        sequences=sequences,
        num_new=num_new,
        rolled_out=int((counts - num_new).sum()),
        changed=new_len > 0,
        applied=int(keep.sum()),
        skipped=int(seen.sum()),
        partition_moves=int(moved.sum()),
    )


def training_examples(update: SequenceUpdate) -> SequenceBatch:
    """The users with `num_new > 0` as training examples: their sequences with `num_new` set."""
    rows = np.flatnonzero(update.num_new > 0)
    return take_users(update.sequences.with_num_new(update.num_new), rows)
