"""The users' sequences for serving: one batched Feast read, then each request's `recent_events`.

`FeatureReader.read` reads every user of a serving batch in one `SequenceStore.read_many` call
(SQLite by default, Redis with `features.online_store=redis`): concurrent requests share one
online-store round trip. `merge_recent` appends the events a request brings that the store does
not hold yet and keeps the latest `max_events` (the model's `max_seq_len`).

    >>> import numpy as np
    >>> merged = merge_recent(np.array([1, 2]), np.array([0, 4]), np.array([10, 20]),
    ...                       recent=(np.array([2, 9]), np.array([4, 3]), np.array([20, 30])), max_events=2)
    >>> [a.tolist() for a in merged]      # (2, 4, 20) was stored already; the oldest event drops
    [[2, 9], [4, 3], [20, 30]]
"""

from __future__ import annotations

import numpy as np

from features.sequence_batch import SequenceBatch
from features.sequences import SequenceStore, SequenceStoreConfig
from serving.config import FeatureConfig

Events = tuple[np.ndarray, np.ndarray, np.ndarray]  # item_ids, actions, timestamps_ms (int64)

# SequenceStoreConfig.max_len bounds writes; serving only reads (and truncates per version).
_READ_ONLY_MAX_LEN = 2**31 - 1


class FeatureReader:
    """Batched reads of `user_sequence` rows through `features.sequences.SequenceStore`."""

    def __init__(self, *, config: FeatureConfig) -> None:
        self.config = config
        self.store = SequenceStore(
            SequenceStoreConfig(
                max_len=_READ_ONLY_MAX_LEN,
                online_store=config.online_store,
                redis_address=config.redis_address,
                redis_security=config.redis_security,
                state_dir=config.state_path,
            )
        )

    def open(self) -> None:
        """Apply the Feast repository and open the online store now, not on the first request."""
        self.store.read_many(np.zeros(0, dtype=np.int64))

    def read(self, user_ids: np.ndarray) -> SequenceBatch:
        """The stored sequences of `user_ids` (distinct int64), in that order; unknown users empty."""
        return self.store.read_many(np.ascontiguousarray(user_ids, dtype=np.int64))

    def close(self) -> None:
        self.store.close()


def merge_recent(
    item_ids: np.ndarray, actions: np.ndarray, timestamps_ms: np.ndarray, *, recent: Events | None, max_events: int
) -> Events:
    """The stored events plus `recent` ones not among them, in time order (stable: stored first
    at equal times), truncated to the latest `max_events`."""
    if recent is not None and len(recent[0]):
        r_items, r_actions, r_ts = recent
        if len(item_ids):
            # An event the store already holds (same item, action and time) is not added twice.
            stored = set(zip(item_ids.tolist(), actions.tolist(), timestamps_ms.tolist()))
            new = np.array(
                [(i, a, t) not in stored for i, a, t in zip(r_items.tolist(), r_actions.tolist(), r_ts.tolist())],
                dtype=bool,
            )
            r_items, r_actions, r_ts = r_items[new], r_actions[new], r_ts[new]
        item_ids = np.concatenate([item_ids, r_items])
        actions = np.concatenate([actions, r_actions])
        timestamps_ms = np.concatenate([timestamps_ms, r_ts])
        order = np.argsort(timestamps_ms, kind="stable")
        item_ids, actions, timestamps_ms = item_ids[order], actions[order], timestamps_ms[order]
    if len(item_ids) > max_events:
        item_ids, actions, timestamps_ms = item_ids[-max_events:], actions[-max_events:], timestamps_ms[-max_events:]
    return item_ids, actions, timestamps_ms
