"""The write-through sequence cache against a dict model of the store it fronts."""

from __future__ import annotations

import numpy as np
import pytest

from features.sequence_batch import SequenceBatch, concat_batches, take_users
from features.sequence_cache import SequenceCache


def batch_of(store: dict[int, tuple[list[int], int]], users) -> SequenceBatch:
    """The sequences of `users` in a dict model {user: (items, last_offset)}; missing users empty."""
    users = [int(u) for u in users]
    items = [store.get(u, ([], -1))[0] for u in users]
    return SequenceBatch.from_sequences(
        user_ids=np.asarray(users, dtype=np.int64),
        item_ids=items,
        actions=[[1] * len(s) for s in items],
        timestamps_ms=[[7 * x for x in s] for s in items],
        last_partition=[0 if store.get(u, ([], -1))[1] >= 0 else -1 for u in users],
        last_offset=[store.get(u, ([], -1))[1] for u in users],
    )


class CountingReader:
    def __init__(self, store: dict) -> None:
        self.store = store
        self.calls: list[list[int]] = []

    def __call__(self, ids: np.ndarray) -> SequenceBatch:
        assert ids.dtype == np.int64
        self.calls.append(ids.tolist())
        return batch_of(self.store, ids)


def test_concat_and_take_round_trip():
    store = {1: ([4, 5], 3), 2: ([], -1), 9: ([6], 8)}
    a, b = batch_of(store, [1, 2]), batch_of(store, [9])
    both = concat_batches([a, b])
    assert both.equals(batch_of(store, [1, 2, 9]))
    assert take_users(both, np.array([2, 0])).equals(batch_of(store, [9, 1]))
    assert len(concat_batches([])) == 0


def test_hits_are_served_from_memory_and_misses_read_once_in_order():
    feast = {u: ([u, u + 1], u) for u in range(1, 20)}
    reader = CountingReader(feast)
    cache = SequenceCache(max_events=1000)
    cache.put(batch_of(feast, [3, 5, 11]))
    got = cache.read_through(np.array([2, 3, 4, 11, 12], dtype=np.int64), reader)
    assert got.equals(batch_of(feast, [2, 3, 4, 11, 12]))
    assert reader.calls == [[2, 4, 12]]
    assert (cache.hits, cache.misses) == (2, 3)
    # All cached: no read at all.
    assert cache.read_through(np.array([11, 5], dtype=np.int64), reader).equals(batch_of(feast, [11, 5]))
    assert len(reader.calls) == 1
    # Nothing cached: one read of everything.
    cache.clear()
    assert cache.read_through(np.array([5, 6], dtype=np.int64), reader).equals(batch_of(feast, [5, 6]))
    assert reader.calls[-1] == [5, 6]


def test_put_replaces_the_older_entry():
    cache = SequenceCache(max_events=100)
    cache.put(batch_of({4: ([1], 0)}, [4]))
    cache.put(batch_of({4: ([1, 2, 3], 2), 6: ([9], 5)}, [4, 6]))
    assert len(cache) == 2 and cache.events == 4
    got = cache.read_through(np.array([4], dtype=np.int64), lambda ids: pytest.fail("should be cached"))
    assert got.item_ids.tolist() == [1, 2, 3] and got.last_offset.tolist() == [2]


def test_the_bound_drops_the_users_touched_least_recently():
    cache = SequenceCache(max_events=6)
    cache.put(batch_of({1: ([1, 1], 0), 2: ([2, 2], 1)}, [1, 2]))  # tick 1: 4 events
    cache.put(batch_of({3: ([3, 3], 2)}, [3]))  # tick 2: 6 events, at the bound
    assert cache.events == 6
    cache.put(batch_of({4: ([4, 4, 4], 3)}, [4]))  # tick 3: 9 > 6, users 1 and 2 go
    assert cache.events == 5  # down to 90% of the bound: one eviction serves several puts
    assert sorted(cache.user_ids.tolist()) == [3, 4]
    # A user longer than the bound is not kept at all.
    cache.put(batch_of({5: (list(range(7)), 4)}, [5]))
    assert 5 not in cache.user_ids.tolist() and cache.events <= 6


def test_max_events_zero_caches_nothing():
    cache = SequenceCache(max_events=0)
    cache.put(batch_of({1: ([1], 0)}, [1]))
    assert len(cache) == 0
    with pytest.raises(ValueError, match="max_events"):
        SequenceCache(max_events=-1)


@pytest.mark.parametrize("seed", range(6))
def test_random_batches_read_what_the_store_holds(seed, monkeypatch):
    """A job-like loop: read through the cache, change some users, write them to the model store
    and put them; every read must equal the store's content, whatever the bound. A small
    minimum log makes compactions frequent."""
    if seed % 2:
        monkeypatch.setattr(SequenceCache, "min_capacity", 4)
    rng = np.random.default_rng(seed)
    feast: dict[int, tuple[list[int], int]] = {}
    reader = CountingReader(feast)
    cache = SequenceCache(max_events=int(rng.integers(0, 60)))
    offset = 0
    for _ in range(150):
        users = np.unique(rng.integers(0, 30, size=int(rng.integers(1, 12)))).astype(np.int64)
        got = cache.read_through(users, reader)
        assert got.equals(batch_of(feast, users))
        for u in users.tolist():
            if rng.random() < 0.8:  # some touched users do not change (a replayed event)
                items = (feast.get(u, ([], -1))[0] + [int(rng.integers(0, 1000))])[-5:]
                feast[u] = (items, offset)
                offset += 1
        if rng.random() < 0.1:
            cache.clear()  # a failed batch
        else:
            cache.put(batch_of(feast, users))
        assert cache.events <= cache.max_events
        assert cache.capacity <= max(2 * cache.max_events, SequenceCache.min_capacity)
        assert np.all(np.diff(cache.user_ids) > 0)
