"""The bulk row path (features/online_rows.py) writes exactly the rows Feast's provider writes,
and each path reads the other's rows: SQLite in a temp folder, Redis on a private server."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import numpy as np
import pytest
import redis
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from hypothesis import given, settings
from hypothesis import strategies as st

import features.sequences as sequences
from features import online_rows
from features.definitions import USER_ID, USER_SEQUENCE
from features.online_rows import SequenceStoreError
from features.sequence_batch import SequenceBatch
from tests.features.test_sequences import INT64_MAX, INT64_MIN, as_lists, make_store

EDGES = [0, 1, 127, 128, 16_383, 16_384, 2**35 - 1, 2**35, 2**53 + 1, 2**62, INT64_MAX, -1, -128, INT64_MIN]


def edge_batch() -> SequenceBatch:
    """Empty sequences, every varint length, negative values, ids at the int64 limits."""
    return SequenceBatch.from_sequences(
        user_ids=[0, 7, INT64_MAX, INT64_MIN, 2**53 + 1],
        item_ids=[[], EDGES, [5], [], EDGES[::-1]],
        actions=[[], [k % 5 for k in range(len(EDGES))], [4], [], [0] * len(EDGES)],
        timestamps_ms=[[], EDGES, [-1], [], EDGES],
        last_partition=[-1, 0, 3, -1, 127],
        last_offset=[-1, 0, 2**40, -1, 128],
    )


def random_batch(num_users: int, max_len: int, seed: int = 0) -> SequenceBatch:
    """Jagged sequences of random int64 values over the whole range (every varint length)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len + 1, size=num_users)
    values = [rng.integers(INT64_MIN, INT64_MAX, size=(3, n), dtype=np.int64, endpoint=True) for n in lengths]
    return SequenceBatch.from_sequences(
        user_ids=rng.choice(2**62, size=num_users, replace=False),
        item_ids=[v[0] for v in values],
        actions=[v[1] for v in values],
        timestamps_ms=[v[2] for v in values],
        last_partition=rng.integers(-1, 8, size=num_users),
        last_offset=rng.integers(-1, 2**40, size=num_users),
    )


def feast_bytes(batch: SequenceBatch) -> dict[str, list[bytes]]:
    rows = sequences._encode_rows(batch, datetime.now(UTC))
    return {name: [values[name].SerializeToString() for _, values, _, _ in rows] for name in rows[0][1]}


@pytest.mark.parametrize("make", [edge_batch, lambda: random_batch(num_users=300, max_len=50)])
def test_encoded_values_are_the_bytes_protobuf_writes_and_decode_back(make):
    batch = make()
    assert online_rows.encode_values(batch) == feast_bytes(batch)
    decoded = online_rows._decode_rows_bulk(batch.user_ids, online_rows.encode_values(batch))
    assert as_lists(decoded) == as_lists(batch)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(INT64_MIN, INT64_MAX), max_size=12), min_size=1, max_size=8))
def test_any_int64_lists_encode_like_protobuf(lists):
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    flat = np.array([v for x in lists for v in x], dtype=np.int64)
    tokens, cuts = online_rows.list_tokens(flat, offsets)
    got = online_rows.cut_bytes(*online_rows.varint_encode(tokens), cuts)
    want = [sequences._int64_list(np.array(x, dtype=np.int64)).SerializeToString() for x in lists]
    assert got == want
    values, lengths = online_rows.decode_lists(got)
    assert values.tolist() == flat.tolist() and lengths.tolist() == [len(x) for x in lists]


def test_values_in_another_layout_are_refused_not_misread():
    as_scalar = ValueProto(int64_val=5).SerializeToString()
    as_doubles = ValueProto()
    as_doubles.double_list_val.val.extend([1.5])
    with pytest.raises(online_rows.RowLayoutError, match="not an int64_list_val"):
        online_rows.decode_lists([as_scalar])
    with pytest.raises(online_rows.RowLayoutError):
        online_rows.decode_lists([as_doubles.SerializeToString()])
    with pytest.raises(online_rows.RowLayoutError, match="not an int64_val"):
        online_rows.decode_scalars([sequences._int64_list(np.array([1], dtype=np.int64)).SerializeToString()])
    with pytest.raises(online_rows.RowLayoutError, match="ends inside a varint"):
        online_rows.decode_scalars([b"\x20\x80"])


def sqlite_rows(store) -> list[tuple]:
    path = store.feature_store.config.online_store.path
    db = store.repo_dir / path
    table = f"{store.feature_store.config.project}_{USER_SEQUENCE}"
    with sqlite3.connect(db) as conn:
        return sorted(
            conn.execute(
                f"SELECT entity_key, feature_name, value, value_text, vector_value, "
                f'typeof(event_ts), created_ts FROM "{table}"'
            ).fetchall()
        )


def test_sqlite_rows_are_byte_identical_and_each_path_reads_the_other(tmp_path):
    batch = edge_batch()
    bulk = make_store(tmp_path / "bulk", max_len=len(EDGES))
    slow = make_store(tmp_path / "feast", max_len=len(EDGES), bulk_io=False)
    bulk.write_many(batch)
    slow.write_many(batch)
    assert bulk._bulk is not None and slow._bulk is None
    assert sqlite_rows(bulk) == sqlite_rows(slow) and len(sqlite_rows(bulk)) == 5 * len(batch)
    ids = np.concatenate([batch.user_ids, [12345]]).astype(np.int64)
    want = as_lists(batch) + [(12345, [], [], [], -1, -1)]
    for folder in ("bulk", "feast"):  # rows of each path, read by both paths
        for bulk_io in (True, False):
            assert as_lists(make_store(tmp_path / folder, max_len=len(EDGES), bulk_io=bulk_io).read_many(ids)) == want
    # Feast's own serving read sees the bulk path's rows.
    online = bulk.feature_store.get_online_features(
        features=[f"{USER_SEQUENCE}:item_ids", f"{USER_SEQUENCE}:last_offset"], entity_rows=[{USER_ID: 7}]
    ).to_dict()
    assert online["item_ids"] == [EDGES] and online["last_offset"] == [0]


def test_bulk_read_reports_partial_rows_and_falls_back_for_foreign_layouts(tmp_path):
    store = make_store(tmp_path)
    store.write_many(
        SequenceBatch.from_sequences(
            user_ids=[1, 2],
            item_ids=[[1], [2]],
            actions=[[0], [0]],
            timestamps_ms=[[5], [6]],
            last_partition=[0, 0],
            last_offset=[1, 2],
        )
    )
    fs = store.feature_store
    view = fs.get_feature_view(USER_SEQUENCE)
    only_items = {"item_ids": sequences._int64_list(np.array([3, 4], dtype=np.int64))}
    fs.provider.online_write_batch(
        fs.config, view, [(sequences._entity_key(9), only_items, datetime.now(UTC), None)], progress=None
    )
    with pytest.raises(SequenceStoreError, match=r"user 9 has a partial row \(no \['actions'"):
        store.read_many(np.array([1, 9], dtype=np.int64))
    # A watermark stored as int32_val (not what we write): the bulk reader refuses it and the
    # read goes through Feast's parser, which the store's decoder then reads as before.
    odd = {
        "item_ids": sequences._int64_list(np.array([3], dtype=np.int64)),
        "actions": sequences._int64_list(np.array([1], dtype=np.int64)),
        "timestamps_ms": sequences._int64_list(np.array([9], dtype=np.int64)),
        "last_partition": ValueProto(int32_val=2),
        "last_offset": ValueProto(int64_val=4),
    }
    fs.provider.online_write_batch(
        fs.config, view, [(sequences._entity_key(10), odd, datetime.now(UTC), None)], progress=None
    )
    with pytest.raises(online_rows.RowLayoutError):
        store._bulk.read(np.array([10], dtype=np.int64), 100)
    got = store.read_many(np.array([1, 10], dtype=np.int64))
    assert as_lists(got)[0] == (1, [1], [0], [5], 0, 1) and got.sequence(1).item_ids.tolist() == [3]


def test_redis_hashes_are_byte_identical_and_each_path_reads_the_other(tmp_path, redis_address):
    batch = edge_batch()
    host, _, port = redis_address.rpartition(":")
    client = redis.Redis(host=host, port=int(port))

    def hashes() -> dict:
        out = {}
        for key in client.keys("*"):
            fields = client.hgetall(key)
            ts = fields.pop(f"_ts:{USER_SEQUENCE}".encode())
            assert len(ts) > 0
            out[key] = fields
        return out

    bulk = make_store(tmp_path / "a", max_len=len(EDGES), online_store="redis", redis_address=redis_address)
    bulk.write_many(batch)
    by_bulk = hashes()
    client.flushall()
    slow = make_store(
        tmp_path / "b", max_len=len(EDGES), online_store="redis", redis_address=redis_address, bulk_io=False
    )
    slow.write_many(batch)
    assert hashes() == by_bulk and len(by_bulk) == len(batch)
    ids = np.concatenate([batch.user_ids, [12345]]).astype(np.int64)
    want = as_lists(batch) + [(12345, [], [], [], -1, -1)]
    assert as_lists(bulk.read_many(ids)) == want  # Feast's rows, bulk read
    client.flushall()
    bulk.write_many(batch)
    assert as_lists(slow.read_many(ids)) == want  # bulk rows, Feast's read
    online = slow.feature_store.get_online_features(
        features=[f"{USER_SEQUENCE}:timestamps_ms"], entity_rows=[{USER_ID: INT64_MAX}]
    ).to_dict()
    assert online["timestamps_ms"] == [[-1]]


class _RecordingPipe:
    """Stands in for features.redis_pipe.RedisPipe: keeps the payloads, answers like Redis would."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.replies: list[int] = []

    def round_trip(self, payload: bytes, num_replies: int) -> list:
        payload = bytes(payload)  # writes hand over a memoryview of the Arrow buffer
        self.payloads.append(payload)
        self.replies.append(num_replies)
        if payload.startswith(b"*7\r\n$5\r\nHMGET"):
            return [[None] * 5] * num_replies
        return [6] * num_replies


@pytest.mark.parametrize("chunk", [2, 5000])
def test_redis_commands_are_what_resp_command_builds_even_with_percent_signs(chunk, monkeypatch):
    """Field names are hash bytes and the timestamp is protobuf bytes: either may hold b'%'
    (the packing must not treat them specially). The packed commands, split into round trips of `chunk`
    users, must be exactly what resp_command builds from the raw arguments."""
    from features.redis_pipe import resp_command

    monkeypatch.setattr(online_rows, "_REDIS_CHUNK", chunk)

    def field(name: str) -> bytes:
        return b"%d%b%%\r\n" + name.encode()

    def serialize_one(user_id: int) -> bytes:
        return b"K%s" + int(user_id).to_bytes(8, "little", signed=True)

    pipe = _RecordingPipe()
    rows = online_rows.RedisRows(pipe, "pr%oj", "view%s", serialize_one, field, lambda now: b"ts%d%%")
    batch = random_batch(num_users=5, max_len=4)
    rows.write(batch, datetime.now(UTC))
    keys = [serialize_one(u) + b"pr%oj" for u in batch.user_ids.tolist()]
    encoded = online_rows.encode_values(batch)
    names = rows.names
    want = b"".join(
        resp_command(
            [b"HSET", k, b"_ts:view%s", b"ts%d%%", *[x for n in names for x in (field(f"view%s:{n}"), encoded[n][i])]]
        )
        for i, k in enumerate(keys)
    )
    assert b"".join(pipe.payloads) == want
    assert pipe.replies == ([2, 2, 1] if chunk == 2 else [5])
    assert all(p.startswith(b"*14\r\n$4\r\nHSET\r\n") for p in pipe.payloads)

    pipe.payloads.clear()
    read = rows.read(batch.user_ids, chunk=5000)
    assert pipe.payloads[0] == b"".join(
        resp_command([b"HMGET", k, *[field(f"view%s:{n}") for n in names]]) for k in keys
    )
    assert len(read) == 5 and read.lengths.tolist() == [0] * 5  # no stored rows: empty sequences
