"""serving/features.py and serving/history_cache.py: batched reads (SQLite and Redis), merging
recent events, the encoded-history cache's keys and bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from features.sequence_batch import SequenceBatch
from features.sequences import SequenceStore, SequenceStoreConfig
from serving.config import FeatureConfig
from serving.features import FeatureReader, merge_recent
from serving.history_cache import HistoryLRU, cache_key
from trainer.model import ModelConfig, build_model

STORED = SequenceBatch.from_sequences(
    user_ids=[4, 9],
    item_ids=[[10, 11, 12], [7]],
    actions=[[0, 1, 2], [4]],
    timestamps_ms=[[1_000, 2_000, 3_000], [5_000]],
    last_partition=[0, 1],
    last_offset=[17, 3],
)


@pytest.mark.parametrize("online_store", ["sqlite", "redis"])
def test_one_batched_read_for_many_users(online_store: str, tmp_path: Path, request) -> None:
    redis_address = request.getfixturevalue("redis_address") if online_store == "redis" else "127.0.0.1:6379"
    writer = SequenceStore(
        SequenceStoreConfig(max_len=50, online_store=online_store, redis_address=redis_address, state_dir=tmp_path)
    )
    writer.write_many(STORED)
    reader = FeatureReader(
        config=FeatureConfig(online_store=online_store, redis_address=redis_address, state_dir=tmp_path)
    )
    reader.open()
    got = reader.read(np.array([9, 123, 4], dtype=np.int64))
    assert got.lengths.tolist() == [1, 0, 3]  # an unknown user comes back empty
    assert got.sequence(2).item_ids.tolist() == [10, 11, 12] and got.sequence(0).actions.tolist() == [4]
    assert got.last_offset.tolist() == [3, -1, 17]
    reader.close()
    writer.close()


def arrays(*rows):
    return tuple(np.array(r, dtype=np.int64) for r in rows)


def test_merge_recent_appends_new_events_in_time_order_and_truncates() -> None:
    stored = arrays([10, 11, 12], [0, 1, 2], [1_000, 2_000, 3_000])
    # a stored event again (dropped), one between stored ones, one after
    recent = arrays([11, 20, 21], [1, 3, 0], [2_000, 2_500, 9_000])
    items, actions, ts = merge_recent(*stored, recent=recent, max_events=10)
    assert items.tolist() == [10, 11, 20, 12, 21]
    assert actions.tolist() == [0, 1, 3, 2, 0] and ts.tolist() == [1_000, 2_000, 2_500, 3_000, 9_000]
    items, _, _ = merge_recent(*stored, recent=recent, max_events=2)
    assert items.tolist() == [12, 21]  # the latest events
    # the same item at the same time with another action is another event
    items, _, _ = merge_recent(*stored, recent=arrays([12], [4], [3_000]), max_events=10)
    assert items.tolist() == [10, 11, 12, 12]
    assert [a.tolist() for a in merge_recent(*stored, recent=None, max_events=2)] == [[11, 12], [1, 2], [2_000, 3_000]]
    empty = arrays([], [], [])
    assert merge_recent(*empty, recent=arrays([5], [1], [7]), max_events=4)[0].tolist() == [5]


def encoded(n: int):
    model = build_model(ModelConfig(layout="interleaved", dim=8, qk_dim=4, v_dim=4, max_seq_len=20), capacity=10)
    ids = torch.arange(n) + 1
    return model.eval().encode_history(item_ids=ids, actions=ids % 5, timestamps_ms=ids * 1000)


def test_cache_key_names_version_user_watermark_and_events() -> None:
    events = arrays([1, 2], [0, 0], [10, 20])
    base = cache_key(3, 42, 0, 17, *events)
    assert base == cache_key(3, 42, 0, 17, *arrays([1, 2], [0, 0], [10, 20]))
    assert base != cache_key(4, 42, 0, 17, *events)  # another version
    assert base != cache_key(3, 43, 0, 17, *events)  # another user
    assert base != cache_key(3, 42, 0, 18, *events)  # the store moved on
    assert base != cache_key(3, 42, 0, 17, *arrays([1, 2], [0, 1], [10, 20]))  # other events (recent_events)
    assert base != cache_key(3, 42, 0, 17, *arrays([1, 2, 0], [0, 10], [20]))  # same bytes, other arrays


def test_history_lru_is_bounded_in_bytes_and_drops_old_versions() -> None:
    entry = encoded(6)
    cache = HistoryLRU(max_bytes=3 * entry.nbytes)
    keys = [cache_key(1, user, -1, -1, *arrays([user], [0], [0])) for user in range(4)]
    for key in keys[:3]:
        cache.put(key, entry)
    assert cache.get(keys[0]) is entry  # 0 is now the most recent
    cache.put(keys[3], entry)  # over the bound: the least recently used (1) goes
    assert cache.get(keys[1]) is None and cache.get(keys[2]) is entry and len(cache) == 3
    assert cache.nbytes == 3 * entry.nbytes and (cache.hits, cache.misses) == (2, 1)
    newer = cache_key(2, 0, -1, -1, *arrays([0], [0], [0]))
    cache.put(newer, entry)
    assert cache.retain_versions({2}) == 2 and len(cache) == 1 and cache.get(newer) is entry
    off = HistoryLRU(max_bytes=0)
    off.put(newer, entry)
    assert len(off) == 0
