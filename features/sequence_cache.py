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

    >>> from features.sequence_batch import SequenceBatch
    >>> cache = SequenceCache(max_events=10)
    >>> cache.put(SequenceBatch.from_sequences(user_ids=[3, 5], item_ids=[[1], [2, 3]], actions=[[0], [0, 1]],
    ...     timestamps_ms=[[1], [2, 3]], last_partition=[0, 1], last_offset=[7, 9]))
    >>> calls = []
    >>> def read(ids):
    ...     calls.append(ids.tolist())
    ...     return SequenceBatch.from_sequences(user_ids=ids, item_ids=[[]] * len(ids), actions=[[]] * len(ids),
    ...         timestamps_ms=[[]] * len(ids), last_partition=[-1] * len(ids), last_offset=[-1] * len(ids))
    >>> got = cache.read_through(np.array([1, 5], dtype=np.int64), read)
    >>> calls, got.user_ids.tolist(), got.lengths.tolist(), got.last_offset.tolist()
    ([[1]], [1, 5], [0, 2], [-1, 9])
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from features.sequence_batch import SequenceBatch, concat_batches, take_users


class SequenceCache:
    """The last stored sequence of recently written users; see the module docstring.

    Layout (so that a batch costs time in proportion to its own size, not the cache's): the
    events live in an append-only log (three int64 arrays); an index sorted by user id holds
    each cached user's slice of the log, watermarks and last-put tick. A put appends its users'
    events and points their index rows at them; what they held before becomes garbage, which a
    compaction drops once the log is full (amortised O(1) per event; the log holds at most about
    twice `max_events` plus the largest put). Past `max_events` live events, the users touched
    least recently are dropped down to 90% of the bound, so eviction, too, runs once per ~10% of
    the bound rather than on every put.
    """

    min_capacity = 1024  # events: the smallest log allocated

    def __init__(self, *, max_events: int) -> None:
        if max_events < 0:
            raise ValueError(f"max_events ({max_events}) must be >= 0 (0 turns the cache off)")
        self.max_events = max_events
        self.hits = 0
        self.misses = 0
        self.clear()

    def clear(self) -> None:
        """Forget everything (after a failed batch, or to turn the cache off for a while)."""
        empty = np.zeros(0, dtype=np.int64)
        self._log = [empty, empty.copy(), empty.copy()]  # item_ids, actions, timestamps_ms
        self._used = 0  # events appended to the log (live and garbage)
        self._uid, self._start, self._len = empty.copy(), empty.copy(), empty.copy()
        self._part, self._off, self._touched = empty.copy(), empty.copy(), empty.copy()
        self._live = 0
        self._tick = 0

    def __len__(self) -> int:
        return len(self._uid)

    @property
    def events(self) -> int:
        """Events held over all cached users."""
        return self._live

    @property
    def user_ids(self) -> np.ndarray:
        """The cached users, ascending."""
        return self._uid.copy()

    @property
    def capacity(self) -> int:
        """Events the log has room for (live, garbage and free)."""
        return len(self._log[0])

    def _find(self, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hit mask over `user_ids`, index rows of the hits)."""
        if len(self._uid) == 0:
            return np.zeros(len(user_ids), dtype=bool), np.zeros(0, dtype=np.int64)
        pos = np.searchsorted(self._uid, user_ids)
        hit = self._uid[np.minimum(pos, len(self._uid) - 1)] == user_ids
        return hit, pos[hit]

    def _gather(self, rows: np.ndarray) -> SequenceBatch:
        lengths = self._len[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        src = np.repeat(self._start[rows] - offsets[:-1], lengths) + np.arange(int(offsets[-1]))
        items, actions, stamps = (column[src] for column in self._log)
        return SequenceBatch(
            user_ids=self._uid[rows],
            offsets=offsets,
            item_ids=items,
            actions=actions,
            timestamps_ms=stamps,
            last_partition=self._part[rows],
            last_offset=self._off[rows],
        )

    def read_through(self, user_ids: np.ndarray, read: Callable[[np.ndarray], SequenceBatch]) -> SequenceBatch:
        """The sequences of `user_ids` (distinct), in that order: cached users from memory, the
        rest through `read(missing_ids)` (one call, skipped when nothing is missing)."""
        hit, rows = self._find(user_ids)
        n_hit = int(hit.sum())
        self.hits += n_hit
        self.misses += len(user_ids) - n_hit
        if n_hit == 0:
            return read(user_ids)
        cached = self._gather(rows)
        if n_hit == len(user_ids):
            return cached
        missing = read(user_ids[~hit])
        # Place the two parts back in the order of `user_ids`.
        order = np.empty(len(user_ids), dtype=np.int64)
        order[np.flatnonzero(hit)] = np.arange(n_hit)
        order[np.flatnonzero(~hit)] = n_hit + np.arange(len(user_ids) - n_hit)
        return take_users(concat_batches([cached, missing]), order)

    def _drop_rows(self, rows: np.ndarray) -> None:
        keep = np.ones(len(self._uid), dtype=bool)
        keep[rows] = False
        self._live -= int(self._len[rows].sum())
        for name in ("_uid", "_start", "_len", "_part", "_off", "_touched"):
            setattr(self, name, getattr(self, name)[keep])

    def _evict(self, incoming: int, keep_rows: np.ndarray) -> None:
        """Drop the least recently touched users (not `keep_rows`) until the live events plus
        `incoming` fit in 90% of the bound (or as close as dropping everyone else gets)."""
        need = self._live + incoming - int(0.9 * self.max_events)
        candidates = np.ones(len(self._uid), dtype=bool)
        candidates[keep_rows] = False
        cand = np.flatnonzero(candidates)
        by_age = cand[np.lexsort((-self._len[cand], self._touched[cand]))]  # oldest, then longest, first
        freed = np.cumsum(self._len[by_age])
        n_drop = min(int(np.searchsorted(freed, need)) + 1, len(by_age))
        self._drop_rows(by_age[:n_drop])

    def _make_room(self, incoming: int) -> None:
        """Room for `incoming` more events at the end of the log: compact (keep only what the
        index points at) into a log of twice what is live plus incoming."""
        if self._used + incoming <= self.capacity:
            return
        capacity = max(2 * (self._live + incoming), self.min_capacity)
        new_start = np.cumsum(self._len) - self._len  # each user's slice, packed in index order
        src = np.repeat(self._start - new_start, self._len) + np.arange(self._live)
        new_log = []
        for column in self._log:
            fresh = np.empty(capacity, dtype=np.int64)
            fresh[: self._live] = column[src]
            new_log.append(fresh)
        self._log = new_log
        self._start = new_start
        self._used = self._live

    def put(self, stored: SequenceBatch) -> None:
        """Remember `stored` (distinct users), which Feast now holds, replacing older entries.
        A put of more than `max_events` events is not kept (and the cache is emptied)."""
        if self.max_events == 0 or len(stored) == 0:
            return
        incoming = int(stored.offsets[-1])
        if incoming > self.max_events:
            self.clear()
            return
        self._tick += 1
        if len(stored) > 1 and np.any(np.diff(stored.user_ids) <= 0):
            stored = take_users(stored, np.argsort(stored.user_ids, kind="stable"))
        hit, rows = self._find(stored.user_ids)
        # The users being replaced: their old events are garbage from now on.
        self._live -= int(self._len[rows].sum())
        self._len[rows] = 0
        if self._live + incoming > self.max_events:
            self._evict(incoming, rows)
            hit, rows = self._find(stored.user_ids)
        self._make_room(incoming)
        at = self._used
        for column, values in zip(self._log, (stored.item_ids, stored.actions, stored.timestamps_ms)):
            column[at : at + incoming] = values
        self._used += incoming
        self._live += incoming
        starts, lengths = at + stored.offsets[:-1], stored.lengths
        # Replaced users in place; new users inserted in order.
        fields = {
            "_start": starts,
            "_len": lengths,
            "_part": stored.last_partition,
            "_off": stored.last_offset,
            "_touched": np.full(len(stored), self._tick, dtype=np.int64),
        }
        for name, values in fields.items():
            getattr(self, name)[rows] = values[hit]
        new = ~hit
        if new.any():
            where = np.searchsorted(self._uid, stored.user_ids[new])
            self._uid = np.insert(self._uid, where, stored.user_ids[new])
            for name, values in fields.items():
                setattr(self, name, np.insert(getattr(self, name), where, values[new]))
