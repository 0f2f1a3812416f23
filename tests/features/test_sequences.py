"""SequenceStore against the real Feast repository: SQLite in a temp folder, Redis when a
`redis-server` binary is installed (a private server on a free port, stopped afterwards)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from feast import PushSource
from hypothesis import given, settings
from hypothesis import strategies as st

import features.sequences as sequences
from features.definitions import (
    FEATURES,
    OFFLINE_PATH,
    USER_ID,
    USER_SEQUENCE,
    USER_SEQUENCE_PUSH,
)
from features.online_rows import SequenceStoreError
from features.sequence_batch import SequenceBatch, SequenceBatchError
from features.sequences import FEATURES_DIR, SequenceStore, SequenceStoreConfig

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def make_store(tmp_path: Path, *, max_len: int = 16, **kwargs) -> SequenceStore:
    return SequenceStore(SequenceStoreConfig(max_len=max_len, state_dir=tmp_path, **kwargs))


def batch_of(rows: list[tuple[int, list[int], int, int]]) -> SequenceBatch:
    """(user_id, item_ids, last_partition, last_offset) rows; actions and times derived."""
    return SequenceBatch.from_sequences(
        user_ids=[r[0] for r in rows],
        item_ids=[r[1] for r in rows],
        actions=[[(item % 5) for item in r[1]] for r in rows],
        timestamps_ms=[[1_700_000_000_000 + 1000 * k for k in range(len(r[1]))] for r in rows],
        last_partition=[r[2] for r in rows],
        last_offset=[r[3] for r in rows],
    )


def as_lists(batch: SequenceBatch) -> list[tuple]:
    """Python ints all the way, so the comparison cannot go through floats."""
    return [
        (s.user_id, s.item_ids.tolist(), s.actions.tolist(), s.timestamps_ms.tolist(), s.last_partition, s.last_offset)
        for s in batch
    ]


def test_round_trip_is_exact_for_ids_above_2_53(tmp_path):
    # Odd values above 2**53 have no exact float64: a float anywhere on the path would show.
    big = [2**53 + 1, 2**53 + 3, 2**62 + 12345, INT64_MAX, 2**63 - 3]
    assert all(float(v) != v for v in big[:2])
    written = SequenceBatch.from_sequences(
        user_ids=[2**53 + 1, INT64_MAX],
        item_ids=[big, big[::-1]],
        actions=[[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]],
        timestamps_ms=[[2**53 + 7 + k for k in range(5)], [INT64_MAX - k for k in range(5)]],
        last_partition=[3, 2**31 + 1],
        last_offset=[2**53 + 5, INT64_MAX],
    )
    store = make_store(tmp_path)
    store.write_many(written)
    read = store.read_many(np.array([2**53 + 1, INT64_MAX], dtype=np.int64))
    assert as_lists(read) == as_lists(written)
    assert read.sequence(0).item_ids.tolist() == big
    assert read.item_ids.dtype == np.int64


def test_missing_users_come_back_empty_with_watermark_minus_one(tmp_path):
    store = make_store(tmp_path)
    assert as_lists(store.read_many(np.array([5, 6], dtype=np.int64))) == [
        (5, [], [], [], -1, -1),
        (6, [], [], [], -1, -1),
    ]  # nothing written yet
    store.write_many(batch_of([(1, [10, 11], 0, 7), (3, [30], 1, 9)]))
    read = store.read_many(np.array([3, 2**60, 1, 2], dtype=np.int64))
    assert read.user_ids.tolist() == [3, 2**60, 1, 2]
    assert read.lengths.tolist() == [1, 0, 2, 0]
    assert read.last_partition.tolist() == [1, -1, 0, -1]
    assert read.last_offset.tolist() == [9, -1, 7, -1]
    assert read.sequence(2).item_ids.tolist() == [10, 11]
    assert len(store.read_many(np.empty(0, dtype=np.int64))) == 0


def test_write_replaces_the_whole_row_and_leaves_other_users_alone(tmp_path):
    store = make_store(tmp_path)
    store.write_many(batch_of([(1, [1, 2, 3, 4, 5], 0, 10), (2, [7, 8], 0, 11)]))
    store.write_many(batch_of([(1, [9, 8, 7], 4, 99)]))  # shorter: no stale tail may remain
    read = store.read_many(np.array([1, 2], dtype=np.int64))
    assert as_lists(read) == as_lists(batch_of([(1, [9, 8, 7], 4, 99), (2, [7, 8], 0, 11)]))
    store.write_many(batch_of([(1, [], 4, 100)]))  # an empty sequence is a value, not a delete
    assert as_lists(store.read_many(np.array([1], dtype=np.int64))) == [(1, [], [], [], 4, 100)]


def test_sequence_at_max_len_round_trips_and_longer_is_refused(tmp_path):
    store = make_store(tmp_path, max_len=8)
    full = batch_of([(1, list(range(100, 108)), 0, 8)])
    store.write_many(full)
    assert as_lists(store.read_many(np.array([1], dtype=np.int64))) == as_lists(full)
    with pytest.raises(SequenceBatchError, match=r"user 2 has 9 events, more than max_len \(8\)"):
        store.write_many(batch_of([(1, [1], 0, 9), (2, list(range(9)), 0, 9)]))
    # Refused as a whole: user 1's row is still the full one.
    assert as_lists(store.read_many(np.array([1], dtype=np.int64))) == as_lists(full)


def test_many_users_in_one_call(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    num_users = 3000
    lengths = rng.integers(0, 33, size=num_users)
    user_ids = 2**53 + 1 + 2 * rng.permutation(10 * num_users)[:num_users]
    written = SequenceBatch.from_sequences(
        user_ids=user_ids,
        item_ids=[rng.integers(INT64_MIN, INT64_MAX, size=n, dtype=np.int64) for n in lengths],
        actions=[rng.integers(0, 5, size=n) for n in lengths],
        timestamps_ms=[np.sort(rng.integers(0, 2**45, size=n)) for n in lengths],
        last_partition=rng.integers(0, 16, size=num_users),
        last_offset=rng.integers(0, 2**50, size=num_users),
    )
    store = make_store(tmp_path, max_len=32)
    store.write_many(written)
    assert store.read_many(written.user_ids).equals(written)
    # Reads are split into chunks of _READ_CHUNK keys; order and duplicates survive the split.
    monkeypatch.setattr(sequences, "_READ_CHUNK", 7)
    ids = np.concatenate([written.user_ids[:20][::-1], written.user_ids[:3]])
    read = store.read_many(ids)
    assert read.user_ids.tolist() == ids.tolist()
    for got in read:
        want = written.sequence(int(np.flatnonzero(written.user_ids == got.user_id)[0]))
        assert got.item_ids.tolist() == want.item_ids.tolist()
        assert (got.last_partition, got.last_offset) == (want.last_partition, want.last_offset)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> SequenceStore:
    return make_store(tmp_path_factory.mktemp("feast_property"), max_len=6)


@settings(max_examples=25, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.integers(INT64_MIN, INT64_MAX),
            st.lists(st.integers(INT64_MIN, INT64_MAX), max_size=6),
            st.integers(-1, 2**31),
            st.integers(-1, INT64_MAX),
        ),
        min_size=1,
        max_size=8,
        unique_by=lambda row: row[0],
    )
)
def test_any_int64_values_round_trip(shared_store, data):
    written = batch_of(data)
    shared_store.write_many(written)
    assert as_lists(shared_store.read_many(written.user_ids)) == as_lists(written)


def test_repository_applies_on_first_use_in_the_state_folder_only(tmp_path, monkeypatch):
    source_files = sorted(p.name for p in FEATURES_DIR.iterdir())
    monkeypatch.setenv("HSTU_STATE_DIR", str(tmp_path / "state"))
    store = SequenceStore(SequenceStoreConfig(max_len=4))  # state_dir=None: HSTU_STATE_DIR
    assert store.repo_dir == tmp_path / "state" / "feast" / "sqlite"
    assert not store.repo_dir.exists()  # nothing happens until first use
    store.write_many(batch_of([(1, [5, 6], 0, 1)]))
    assert {"feature_store.yaml", "registry.db", "online.db"} <= {p.name for p in store.repo_dir.iterdir()}
    view = store.feature_store.get_feature_view(USER_SEQUENCE)
    assert [f.name for f in view.features] == list(FEATURES)
    assert view.join_keys == [USER_ID]
    push = store.feature_store.get_data_source(USER_SEQUENCE_PUSH)
    assert isinstance(push, PushSource) and push.batch_source.path == OFFLINE_PATH
    assert sorted(p.name for p in FEATURES_DIR.iterdir()) == source_files
    # A second store (another process, in real use) applies again and sees the same rows.
    again = SequenceStore(SequenceStoreConfig(max_len=4))
    assert as_lists(again.read_many(np.array([1], dtype=np.int64))) == as_lists(batch_of([(1, [5, 6], 0, 1)]))
    # The rendered copy is a valid Feast config on its own (what the Feast CLI would load).
    from feast.repo_config import load_repo_config

    config = load_repo_config(store.repo_dir, store.repo_dir / "feature_store.yaml")
    assert config.online_store.type == "sqlite" and config.project == "hstu_rt"


def test_push_source_and_get_online_features_see_the_same_rows(tmp_path):
    store = make_store(tmp_path)
    pushed = batch_of([(2**60 + 1, [2**53 + 1, 4], 1, 5), (7, [], 0, 6)])
    store.feature_store.push(USER_SEQUENCE_PUSH, pushed.to_pandas(event_timestamp=datetime.now(UTC)))
    assert as_lists(store.read_many(pushed.user_ids)) == as_lists(pushed)
    store.write_many(batch_of([(2**60 + 1, [2**53 + 3], 2, 8)]))
    online = store.feature_store.get_online_features(
        features=[f"{USER_SEQUENCE}:{name}" for name in FEATURES], entity_rows=[{USER_ID: 2**60 + 1}]
    ).to_dict()
    assert online["item_ids"] == [[2**53 + 3]]
    assert online["last_offset"] == [8]


def test_invalid_writes_and_reads_are_rejected_with_the_fix(tmp_path):
    store = make_store(tmp_path)
    with pytest.raises(SequenceBatchError, match=r"user 4 appears 2 times in one write"):
        store.write_many(batch_of([(4, [1], 0, 1), (5, [1], 0, 1), (4, [2], 0, 2)]))
    with pytest.raises(SequenceBatchError, match=r"1-D int64 numpy array of user ids, got list"):
        store.read_many([1, 2])
    with pytest.raises(SequenceBatchError, match=r"got dtype float64"):
        store.read_many(np.array([1.0]))
    with pytest.raises(SequenceBatchError, match=r"takes a SequenceBatch, got dict"):
        store.write_many({"user_ids": [1]})


def test_a_partial_row_written_outside_the_store_is_reported(tmp_path):
    store = make_store(tmp_path)
    store.write_many(batch_of([(1, [1], 0, 1)]))  # applies the repository
    view = store.feature_store.get_feature_view(USER_SEQUENCE)
    only_items = {"item_ids": sequences._int64_list(np.array([3, 4], dtype=np.int64))}
    store.feature_store.provider.online_write_batch(
        store.feature_store.config,
        view,
        [(sequences._entity_key(9), only_items, datetime.now(UTC), None)],
        progress=None,
    )
    with pytest.raises(SequenceStoreError, match=r"user 9 has a partial row \(no \['actions'"):
        store.read_many(np.array([1, 9], dtype=np.int64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_len": 0}, r"max_len \(0\) must be a positive int"),
        ({"max_len": 8, "online_store": "postgres"}, r"online_store \('postgres'\) must be one of"),
        ({"max_len": 8, "redis_address": "localhost"}, r"redis_address \('localhost'\) must be"),
        ({"max_len": 8, "state_dir": "/tmp/x"}, r"state_dir \('/tmp/x'\) must be a pathlib.Path"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SequenceStoreConfig(**kwargs)


def test_unreachable_redis_fails_on_first_use_with_the_fix(tmp_path):
    from tests.conftest import free_port

    port = free_port()  # nothing listens there
    store = make_store(tmp_path, online_store="redis", redis_address=f"127.0.0.1:{port}")
    with pytest.raises(SequenceStoreError, match=rf"Redis at 127.0.0.1:{port} is not reachable"):
        store.read_many(np.array([1], dtype=np.int64))


def test_redis_variant_round_trip(tmp_path, redis_address):
    store = make_store(tmp_path / "feast", online_store="redis", redis_address=redis_address)
    written = batch_of([(2**53 + 1, [2**53 + 3, INT64_MAX], 1, 2**53 + 5), (2, [1], 0, 1)])
    store.write_many(written)
    store.write_many(batch_of([(2, [4, 5], 0, 2)]))  # same second: last write still wins
    read = store.read_many(np.array([2**53 + 1, 2, 3], dtype=np.int64))
    assert as_lists(read) == as_lists(written)[:1] + as_lists(batch_of([(2, [4, 5], 0, 2)])) + [(3, [], [], [], -1, -1)]
    from feast.repo_config import load_repo_config

    config = load_repo_config(store.repo_dir, store.repo_dir / "feature_store.yaml")
    assert config.online_store.connection_string == redis_address
    assert config.online_store.skip_dedup is True
