"""A bounded write-through cache of the sequences one writer last stored in Feast.

The streaming job reads every touched user's sequence from Feast before it applies a batch, and
writes the result back. When the job is the only writer of the store (one job per topic and
store: the watermarks already require it, see streaming/sequence_update.py), what it wrote last
*is* what Feast holds, so the read of a user the job wrote recently can be served from memory.
On a stream where users come back within a few batches, that removes most of the Feast reads,
which on Redis are the largest stage of a batch (benchmarks/RESULTS.md).

Rules that keep it exact:

- `put` only what is durable in Feast: call it after `write_many` returned, with the users
  written and the users read but left unchanged (both equal Feast's rows then).
- `clear` when a batch fails anywhere: a partial write leaves Feast ahead of the cache.
  (Replaying a batch on the older state gives the same sequences, but clearing keeps the
  argument simple.)
- A new process starts empty: after a crash, everything is read from Feast again.

Memory is bounded by `max_events` (events held over all users; a user costs 24 bytes per event
plus 24): past it, the users touched least recently are dropped. Everything is vectorised over
users (no Python loop per user); the cache is kept sorted by user id.

    >>> from features.sequences import SequenceBatch
    >>> cache = SequenceCache(max_events=10)
    >>> cache.put(SequenceBatch.from_sequences(user_ids=[3, 5], item_ids=[[1], [2, 3]], actions=[[0], [0, 1]],
    ...     timestamps=[[1], [2, 3]], last_partition=[0, 1], last_offset=[7, 9]))
    >>> calls = []
    >>> def read(ids):
    ...     calls.append(ids.tolist())
    ...     return SequenceBatch.from_sequences(user_ids=ids, item_ids=[[]] * len(ids), actions=[[]] * len(ids),
    ...         timestamps=[[]] * len(ids), last_partition=[-1] * len(ids), last_offset=[-1] * len(ids))
    >>> got = cache.read_through(np.array([1, 5], dtype=np.int64), read)
    >>> calls, got.user_ids.tolist(), got.lengths.tolist(), got.last_offset.tolist()
    ([[1]], [1, 5], [0, 2], [-1, 9])
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from features.sequences import SequenceBatch, concat_batches, take_users


class SequenceCache:
    """The last stored sequence of recently written users; see the module docstring."""

    def __init__(self, *, max_events: int) -> None:
        if max_events < 0:
            raise ValueError(f"max_events ({max_events}) must be >= 0 (0 turns the cache off)")
        self.max_events = max_events
        self.hits = 0
        self.misses = 0
        self.clear()

    def clear(self) -> None:
        """Forget everything (after a failed batch, or to turn the cache off for a while)."""
        self._batch = concat_batches([])
        self._touched = np.zeros(0, dtype=np.int64)  # per cached user: the tick of its last put
        self._tick = 0

    def __len__(self) -> int:
        return len(self._batch)

    @property
    def events(self) -> int:
        """Events held over all cached users."""
        return int(self._batch.offsets[-1])

    def _find(self, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hit mask over `user_ids`, cache rows of the hits)."""
        cached = self._batch.user_ids
        pos = np.searchsorted(cached, user_ids)
        pos_ok = np.minimum(pos, max(len(cached) - 1, 0))
        hit = (pos < len(cached)) & (cached[pos_ok] == user_ids) if len(cached) else np.zeros(len(user_ids), bool)
        return hit, pos[hit]

    def read_through(self, user_ids: np.ndarray, read: Callable[[np.ndarray], SequenceBatch]) -> SequenceBatch:
        """The sequences of `user_ids` (distinct), in that order: cached users from memory, the
        rest through `read(missing_ids)` (one call, skipped when nothing is missing)."""
        hit, rows = self._find(user_ids)
        n_hit = int(hit.sum())
        self.hits += n_hit
        self.misses += len(user_ids) - n_hit
        if n_hit == 0:
            return read(user_ids)
        cached = take_users(self._batch, rows)
        if n_hit == len(user_ids):
            return cached
        missing = read(user_ids[~hit])
        # Place the two parts back in the order of `user_ids`.
        order = np.empty(len(user_ids), dtype=np.int64)
        order[np.flatnonzero(hit)] = np.arange(n_hit)
        order[np.flatnonzero(~hit)] = n_hit + np.arange(len(user_ids) - n_hit)
        return take_users(concat_batches([cached, missing]), order)

    def put(self, stored: SequenceBatch) -> None:
        """Remember `stored` (distinct users), which Feast now holds, replacing older entries."""
        if self.max_events == 0 or len(stored) == 0:
            return
        self._tick += 1
        _, rows = self._find(stored.user_ids)
        keep = np.ones(len(self._batch), dtype=bool)
        keep[rows] = False
        kept = np.flatnonzero(keep)
        merged = concat_batches([take_users(self._batch, kept), stored])
        touched = np.concatenate([self._touched[kept], np.full(len(stored), self._tick, dtype=np.int64)])
        # Over the bound: drop the users touched least recently (oldest tick first, then most
        # events first within a tick, so that as few users as possible go).
        lengths = merged.lengths
        total = int(lengths.sum())
        if total > self.max_events:
            by_age = np.lexsort((-lengths, touched))
            freed = np.cumsum(lengths[by_age])
            n_drop = int(np.searchsorted(freed, total - self.max_events)) + 1
            survivors = np.zeros(len(merged), dtype=bool)
            survivors[by_age[n_drop:]] = True
            keep_rows = np.flatnonzero(survivors)
            merged = take_users(merged, keep_rows)
            touched = touched[keep_rows]
        order = np.argsort(merged.user_ids, kind="stable")
        self._batch = take_users(merged, order)
        self._touched = touched[order]
