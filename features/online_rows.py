"""Feast online-store rows of `user_sequence`, built and parsed in bulk with numpy.

Feast's providers build one `ValueProto` per feature per user and serialize or parse it in
Python (`online_write_batch`, `online_read`): ~0.4 ms per user written and ~0.2 ms read on the
2-core box, which bounded the streaming job whenever a micro-batch touched many users. This
module writes and reads the very same rows without a message per value:

- every value Feast stores is a serialized `ValueProto`; ours are `int64_list_val` (field 14,
  an `Int64List` with packed field 1) and `int64_val` (field 4). All their bytes, tags and
  lengths included, are protobuf varints, so a user's `item_ids` value is the varint encoding
  of the tokens `[114, len(list), 10, len(packed), v1, ..., vn]` (`[114, 0]` when empty) and a
  watermark is `[32, v]`. `encode_values` encodes every token of a batch in one numpy pass and
  cuts the bytes per user; `decode_values` decodes every varint of the stored values at once
  and checks each value's tags and lengths, so anything that is not exactly this layout is
  refused (`RowLayoutError`) rather than misread, and the caller falls back to Feast's parser.
- entity keys are Feast's `serialize_entity_key` (version 3) of a single int64 join key: a
  fixed prefix and the id as 8 little-endian bytes (checked against Feast at open time).
- `SqliteRows` writes the SQLite store's rows (entity_key, feature_name, value, value_text,
  event_ts, created_ts) with one `executemany` upsert, and reads them with one SELECT per
  10k users, as Feast's own SQL does. `RedisRows` writes each user's hash (the feature fields
  are `_mmh3("<view>:<feature>")`, plus the `_ts:<view>` event-time field) with one native
  HSET per user and reads them with one HMGET per user, built column-wise by Arrow and
  pipelined (see `RedisRows`); hiredis parses the replies.

The rows are byte-identical to what the provider writes (tests/features/test_online_rows.py
compares them row by row, and reads each path's rows through the other), so Feast's own reads
(`get_online_features`, serving) keep working.

    >>> import numpy as np
    >>> tokens, cuts = list_tokens(np.array([300, 1], dtype=np.int64), np.array([0, 2, 2]))
    >>> [bytes(b) for b in cut_bytes(*varint_encode(tokens), cuts)]
    [b'r\\x05\\n\\x03\\xac\\x02\\x01', b'r\\x00']
"""

from __future__ import annotations

import sqlite3
import struct
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.definitions import FEATURES, SEQUENCE_FEATURES
from features.definitions import WATERMARK_FEATURES as SCALAR_FEATURES
from features.redis_pipe import RedisPipe, resp_bulk
from features.sequence_batch import SequenceBatch, take_users

# Tags of the ValueProto fields we store, and of Int64List.val: each one byte (field << 3 | wire type).
TAG_INT64_VAL = 4 << 3 | 0  # 32
TAG_INT64_LIST = 14 << 3 | 2  # 114
TAG_LIST_VAL = 1 << 3 | 2  # 10
LIST_FEATURES = SEQUENCE_FEATURES
_SHIFTS = np.arange(0, 70, 7, dtype=np.uint64)  # 7-bit groups of a 64-bit varint (10 at most)


class RowLayoutError(ValueError):
    """A stored value is not a ValueProto in the layout this module writes."""


class SequenceStoreError(RuntimeError):
    """The online store could not be opened or applied, or holds a row it cannot have written."""


_LIMITS = np.uint64(1) << _SHIFTS[1:]  # a token needs k + 1 bytes when it is >= _LIMITS[k - 1]


def varint_lengths(tokens: np.ndarray) -> np.ndarray:
    """Bytes of each uint64 token's varint encoding (1..10)."""
    return np.searchsorted(_LIMITS, np.asarray(tokens, dtype=np.uint64), side="right") + 1


def varint_encode(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 buffer of every token's varint, in order; end offset of each token in it)."""
    tokens = np.asarray(tokens, dtype=np.uint64)
    lengths = varint_lengths(tokens)
    ends = np.cumsum(lengths)
    width = int(lengths.max()) if len(lengths) else 1
    # One row of `width` 7-bit groups per token, the continuation bit on all but its last byte;
    # the row-major boolean gather keeps each token's own bytes, in order.
    groups = ((tokens[:, None] >> _SHIFTS[:width]) & np.uint64(0x7F)).astype(np.uint8)
    column = np.arange(width)
    groups |= (column < (lengths - 1)[:, None]).astype(np.uint8) << 7
    return groups[column < lengths[:, None]], ends


def cut_bytes(buffer: np.ndarray, token_ends: np.ndarray, cuts: np.ndarray) -> list[bytes]:
    """Split the encoded buffer into one bytes object per value; value i holds tokens
    [cuts[i], cuts[i + 1])."""
    byte_cuts = np.concatenate([[0], token_ends])[cuts].tolist()
    raw = buffer.tobytes()
    return [raw[a:b] for a, b in zip(byte_cuts[:-1], byte_cuts[1:])]


def list_tokens(values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The varint tokens of one `int64_list_val` ValueProto per jagged row, and the token cut
    points per row (row i is tokens[cuts[i]:cuts[i + 1]])."""
    values = values.astype(np.int64, copy=False).view(np.uint64)
    offsets = np.asarray(offsets, dtype=np.int64)
    rows = len(offsets) - 1
    counts = np.diff(offsets)
    cum_bytes = np.concatenate([[0], np.cumsum(varint_lengths(values))])
    packed = cum_bytes[offsets[1:]] - cum_bytes[offsets[:-1]]  # bytes of each row's packed values
    nonempty = counts > 0
    inner = np.where(nonempty, 1 + varint_lengths(packed.astype(np.uint64)) + packed, 0)
    header = np.where(nonempty, 4, 2)
    per_row = header + counts
    cuts = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(per_row, out=cuts[1:])
    tokens = np.empty(int(cuts[-1]), dtype=np.uint64)
    start = cuts[:-1]
    tokens[start] = TAG_INT64_LIST
    tokens[start + 1] = inner.astype(np.uint64)
    full = np.flatnonzero(nonempty)
    tokens[start[full] + 2] = TAG_LIST_VAL
    tokens[start[full] + 3] = packed[full].astype(np.uint64)
    row_of_value = np.repeat(np.arange(rows), counts)
    tokens[start[row_of_value] + 4 + np.arange(len(values)) - offsets[row_of_value]] = values
    return tokens, cuts


def _encode_features(batch: SequenceBatch, finish) -> dict:
    """{feature: finish(varint buffer, token ends, token cuts per user)} for a `SequenceBatch`."""
    out = {}
    for name in LIST_FEATURES:
        tokens, cuts = list_tokens(getattr(batch, name), batch.offsets)
        out[name] = finish(*varint_encode(tokens), cuts)
    for name in SCALAR_FEATURES:
        tokens = np.empty(2 * len(batch), dtype=np.uint64)
        tokens[0::2] = TAG_INT64_VAL
        tokens[1::2] = getattr(batch, name).view(np.uint64)
        out[name] = finish(*varint_encode(tokens), np.arange(0, 2 * len(batch) + 1, 2))
    return out


def encode_values(batch) -> dict[str, list[bytes]]:
    """{feature: one serialized ValueProto per user} for a `SequenceBatch`."""
    return _encode_features(batch, cut_bytes)


def value_arrays(batch: SequenceBatch) -> dict[str, pa.LargeBinaryArray]:
    """`encode_values` as Arrow arrays over the encoded buffers (no bytes object per value)."""

    def array(buffer: np.ndarray, token_ends: np.ndarray, cuts: np.ndarray) -> pa.Array:
        byte_cuts = np.concatenate([[0], token_ends]).astype(np.int64)[cuts]
        return pa.Array.from_buffers(
            pa.large_binary(), len(cuts) - 1, [None, pa.py_buffer(byte_cuts), pa.py_buffer(buffer)]
        )

    return _encode_features(batch, array)


def varint_decode(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(every varint token of the concatenated blobs as uint64; token cut points per blob).
    Raises RowLayoutError when a blob does not end on a token boundary."""
    raw = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    blob_ends = np.cumsum(np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs)))
    last = raw < 0x80  # the last byte of each token
    if len(blobs) and len(raw) and (not last[-1] or np.any(~last[blob_ends[blob_ends > 0] - 1])):
        raise RowLayoutError("a value ends inside a varint")
    first = np.empty(len(raw), dtype=bool)  # the first byte of each token
    first[:1] = True
    first[1:] = last[:-1]
    index = np.arange(len(raw), dtype=np.int64)
    position = index - np.maximum.accumulate(np.where(first, index, 0))
    if len(raw) and position.max() > 9:
        raise RowLayoutError("a varint longer than 10 bytes")
    parts = (raw & 0x7F).astype(np.uint64) << (position.astype(np.uint64) * np.uint64(7))
    tokens = np.add.reduceat(parts, np.flatnonzero(first)) if len(raw) else np.zeros(0, dtype=np.uint64)
    ends_cum = np.concatenate([[0], np.cumsum(last)])
    cuts = np.concatenate([[0], ends_cum[blob_ends]]).astype(np.int64)
    return tokens, cuts


def decode_lists(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """`int64_list_val` ValueProtos -> (int64 values, lengths per blob), every layout checked."""
    tokens, cuts = varint_decode(blobs)
    count = np.diff(cuts)
    start = cuts[:-1]
    if np.any(count < 2) or np.any(tokens[start] != TAG_INT64_LIST):
        raise RowLayoutError("a value is not an int64_list_val")
    full = count > 2
    lengths = np.where(full, count - 4, 0)
    if (
        np.any(count[~full] != 2)
        or np.any(tokens[start[~full] + 1] != 0)
        or np.any(count[full] < 4)
        or np.any(tokens[start[full] + 2] != TAG_LIST_VAL)
    ):
        raise RowLayoutError("an int64 list value in an unexpected layout")
    keep = np.ones(len(tokens), dtype=bool)
    for k in range(4):
        keep[start[full] + k] = False
    keep[start[~full]] = keep[start[~full] + 1] = False
    return tokens[keep].view(np.int64), lengths.astype(np.int64)


def decode_scalars(blobs: list[bytes]) -> np.ndarray:
    """`int64_val` ValueProtos -> int64 array, every layout checked."""
    tokens, cuts = varint_decode(blobs)
    if np.any(np.diff(cuts) != 2) or np.any(tokens[cuts[:-1]] != TAG_INT64_VAL):
        raise RowLayoutError("a value is not an int64_val")
    return tokens[cuts[:-1] + 1].view(np.int64)


def entity_key_bytes(user_ids: np.ndarray, serialize_one) -> list[bytes]:
    """Feast's serialized entity key of each user id; `serialize_one(user_id)` is Feast's own,
    used to find the fixed prefix and to check the layout."""
    zero = serialize_one(0)
    prefix = zero[:-8]
    for probe in (1, -1, 2**62 + 12345):
        if serialize_one(probe) != prefix + struct.pack("<q", probe):
            return [serialize_one(int(u)) for u in user_ids.tolist()]  # another layout: Feast's
    raw = user_ids.astype("<i8").tobytes()
    return [prefix + raw[i : i + 8] for i in range(0, len(raw), 8)]


def _decode_rows_bulk(user_ids: np.ndarray, values: dict[str, list[bytes | None]]):
    """{feature: value or None per user} -> SequenceBatch; None for all features = missing user."""
    has = {name: np.array([v is not None for v in values[name]], dtype=bool) for name in FEATURES}
    present = np.logical_or.reduce([has[name] for name in FEATURES])
    partial = present & ~np.logical_and.reduce([has[name] for name in FEATURES])
    if partial.any():
        i = int(np.flatnonzero(partial)[0])
        missing = [name for name in FEATURES if not has[name][i]]
        raise SequenceStoreError(
            f"user {int(user_ids[i])} has a partial row (no {missing}): it was written outside "
            "SequenceStore; rewrite it with write_many"
        )
    rows = np.flatnonzero(present)
    num = len(user_ids)
    lengths = np.zeros(num, dtype=np.int64)
    flat = {}
    for name in LIST_FEATURES:
        vals, lens = decode_lists([values[name][i] for i in rows.tolist()])
        if name == "item_ids":
            lengths[rows] = lens
        elif not np.array_equal(lens, lengths[rows]):
            i = int(rows[np.flatnonzero(lens != lengths[rows])[0]])
            raise SequenceStoreError(
                f"user {int(user_ids[i])} has items/actions/timestamps of different lengths: the "
                "stored row is inconsistent; rewrite it with write_many"
            )
        flat[name] = vals
    marks = {}
    for name in SCALAR_FEATURES:
        marks[name] = np.full(num, -1, dtype=np.int64)
        marks[name][rows] = decode_scalars([values[name][i] for i in rows.tolist()])
    return SequenceBatch(
        user_ids=user_ids.copy(),
        offsets=np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)]),
        **{name: flat[name] for name in LIST_FEATURES},
        last_partition=marks["last_partition"],
        last_offset=marks["last_offset"],
    )


class SqliteRows:
    """Bulk rows of Feast's SQLite online store (one connection to the store's own file)."""

    def __init__(self, db_path: str, table: str, serialize_one) -> None:
        self.conn = sqlite3.connect(db_path, timeout=30, check_same_thread=False)
        self.table = table
        self.serialize_one = serialize_one
        columns = {row[1] for row in self.conn.execute(f'PRAGMA table_info("{table}")')}
        if (
            not {"entity_key", "feature_name", "value", "value_text", "event_ts", "created_ts"} <= columns
            or "value_num" in columns
        ):
            raise RowLayoutError(f"table {table} has columns {sorted(columns)}: not the layout written here")

    def write(self, batch, now: datetime) -> None:
        # Rows go in primary-key order (entity key bytes, then feature name), so the upserts walk
        # the B-tree sequentially: the key is the id's little-endian bytes after a fixed prefix,
        # so byte order is the order of the byte-swapped id.
        order = np.argsort(batch.user_ids.astype("<i8").byteswap().view(np.uint64), kind="stable")
        ids = batch.user_ids[order]
        keys = entity_key_bytes(ids, self.serialize_one)
        encoded = encode_values(take_users(batch, order))
        event_ts = now.astimezone(UTC).replace(tzinfo=None)  # as Feast's to_naive_utc
        text = {name: [str(v) for v in getattr(batch, name)[order].tolist()] for name in SCALAR_FEATURES}
        names = sorted((*LIST_FEATURES, *SCALAR_FEATURES))
        columns = [
            [(name, v, text[name][i] if name in text else None) for i, v in enumerate(encoded[name])] for name in names
        ]
        rows = ((k, *cell, event_ts, None) for k, *cells in zip(keys, *columns) for cell in cells)
        sql = (
            f'INSERT INTO "{self.table}" (entity_key, feature_name, value, value_text, event_ts, created_ts) '
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
            "value = excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, "
            "created_ts = excluded.created_ts;"
        )
        with self.conn:
            self.conn.executemany(sql, rows)

    def read(self, user_ids: np.ndarray, chunk: int):
        keys = entity_key_bytes(user_ids, self.serialize_one)
        unique = list(dict.fromkeys(keys))  # a user asked for twice is fetched once
        found: dict[str, dict[bytes, bytes]] = {name: {} for name in (*LIST_FEATURES, *SCALAR_FEATURES)}
        for start in range(0, len(unique), chunk):
            part = unique[start : start + chunk]
            cur = self.conn.execute(
                f'SELECT entity_key, feature_name, value FROM "{self.table}" '
                f"WHERE entity_key IN ({','.join('?' * len(part))})",
                part,
            )
            for key, name, value in cur:
                if name in found:
                    found[name][key] = value
        return _decode_rows_bulk(user_ids, {name: [rows.get(k) for k in keys] for name, rows in found.items()})

    def close(self) -> None:
        self.conn.close()


_REDIS_CHUNK = 5_000  # users per pipelined round trip: a few MB of commands at max_len 200


def _resp_commands(pieces: list) -> tuple[memoryview, np.ndarray]:
    """Join Arrow columns and scalars element-wise into one RESP command per row: (the bytes of
    every command, back to back; the end offset of each command in them, after a leading 0)."""

    commands = pc.binary_join_element_wise(*pieces, _const(b""))  # the last argument: the separator
    n = len(commands)
    ends = np.frombuffer(commands.buffers()[1], dtype=np.int64)[commands.offset : commands.offset + n + 1]
    return memoryview(commands.buffers()[2]), ends


def _const(raw: bytes):

    return pa.scalar(raw, type=pa.large_binary())


def _bulk_column(array) -> list:
    """The pieces of a RESP bulk string per row: `$<len>\r\n<bytes>\r\n` (lengths in decimal)."""

    length = pc.cast(pc.cast(pc.binary_length(array), pa.string()), pa.large_binary())
    return [_const(b"$"), length, _const(b"\r\n"), array, _const(b"\r\n")]


class RedisRows:
    """Bulk rows of Feast's Redis online store: one hash per user, fields keyed by mmh3.

    Every user is one native command (HSET of the event-time field and the five features, or
    HMGET of the five features), sent pipelined (`_REDIS_CHUNK` users per round trip for writes,
    the caller's chunk for reads) on a `RedisPipe` (features/redis_pipe.py). Both are built
    column-wise by Arrow's element-wise binary join (`_resp_commands`): no Python object per
    user or value.
    redis-py's pipeline packs each command in Python (~44 us per user written; a %-template per
    user ~5 us, Arrow's join well under 1 us), and the Lua scripts that looped over the keys
    server-side before cost the single-threaded server 2-3x the CPU of native commands (~10 vs
    ~4 us per user).
    """

    def __init__(self, pipe: RedisPipe, project: str, view: str, serialize_one, mmh3_field, timestamp_bytes) -> None:
        self.pipe = pipe
        self.project = project.encode()
        self.serialize_one = serialize_one
        self.names = (*LIST_FEATURES, *SCALAR_FEATURES)
        self.fields = {name: mmh3_field(f"{view}:{name}") for name in self.names}
        self.ts_field = f"_ts:{view}"
        self.timestamp_bytes = timestamp_bytes
        self._hmget_head = b"*%d\r\n" % (2 + len(self.names)) + resp_bulk(b"HMGET")
        self._hmget_fields = b"".join(resp_bulk(self.fields[n]) for n in self.names)

    def _keys(self, user_ids: np.ndarray) -> list[bytes]:
        return [k + self.project for k in entity_key_bytes(user_ids, self.serialize_one)]

    def _key_column(self, user_ids: np.ndarray) -> pa.Array:
        return pa.array(self._keys(user_ids), type=pa.large_binary())

    def write(self, batch, now: datetime) -> None:
        """One HSET per user (the event-time field and the five features), sent `_REDIS_CHUNK`
        users per round trip."""
        n = len(batch)
        if n == 0:
            return
        values = value_arrays(batch)
        ts = resp_bulk(self.ts_field.encode()) + resp_bulk(self.timestamp_bytes(now))
        pieces = [
            _const(b"*%d\r\n" % (2 + 2 * (1 + len(self.names))) + resp_bulk(b"HSET")),
            *_bulk_column(self._key_column(batch.user_ids)),
            _const(ts),
        ]
        for name in self.names:
            pieces += [_const(resp_bulk(self.fields[name])), *_bulk_column(values[name])]
        self._send(*_resp_commands(pieces), _REDIS_CHUNK)  # HSET's replies: counts

    def _send(self, data: memoryview, ends: np.ndarray, chunk: int) -> list:
        """Pipeline the commands (`_resp_commands`' bytes and ends) `chunk` per round trip; the replies."""
        replies: list = []
        n = len(ends) - 1
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            replies.extend(self.pipe.round_trip(data[ends[start] : ends[stop]], stop - start))
        return replies

    def read(self, user_ids: np.ndarray, chunk: int = _REDIS_CHUNK):
        """One HMGET of the five features per user, `chunk` users per round trip."""
        replies: list = []
        if len(user_ids):
            replies = self._send(
                *_resp_commands(
                    [_const(self._hmget_head), *_bulk_column(self._key_column(user_ids)), _const(self._hmget_fields)]
                ),
                chunk,
            )
        values = {name: [r[j] for r in replies] for j, name in enumerate(self.names)}
        return _decode_rows_bulk(user_ids, values)

    def close(self) -> None:
        self.pipe.close()
