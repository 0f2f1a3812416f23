"""Recorded Kafka logs: a topic's records in one Parquet file, replayable and readable offline.

A log file has exactly the columns a Kafka record has (LOG_SCHEMA):

    topic         string   one topic per file
    partition     int32    0 <= partition < num_partitions
    offset        int64    >= 0, strictly increasing within a partition in file order
                           (gaps are allowed, as in a compacted or transactional topic)
    timestamp_ms  int64    the record's timestamp (CreateTime), >= 0, or -1 for none
    key           binary   nullable
    value         binary   nullable (a tombstone)

plus Parquet key-value metadata `hstu.recorded_log` = {"version": 1, "num_partitions": N}: the
topic's partition count, which replay uses to create the topic. Rows of different partitions may
interleave (generated logs are in event-time order; recorded ones partition by partition).

    >>> from streaming.recorded_log import events_to_log, write_log, read_log
    >>> import pandas as pd
    >>> ev = pd.DataFrame({"user_id": [1, 2, 1], "item_id": [5, 6, 7], "action": ["rate_4"] * 3, "ts_ms": [1, 2, 3]})
    >>> table = events_to_log(ev, topic="engagements", num_partitions=4)
    >>> table.column("offset").to_pylist()  # per-partition offsets: users 1 and 2 hash apart
    [0, 0, 1]

`read_log` refuses a file that breaks any rule above and says what is wrong; `write_log` checks
the same before writing (atomically: a temporary file renamed into place).

Partitioning follows Kafka's default partitioner (murmur2 of the key, positive, modulo the
partition count), vectorised in `kafka_partition`, so a live producer that leaves the partition
to Kafka puts each user in the same partition as the log does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streaming.events import encode_keys, encode_values

if TYPE_CHECKING:  # pandas costs seconds to import; the CLIs that only read logs do not need it
    import pandas as pd

LOG_SCHEMA = pa.schema(
    [
        pa.field("topic", pa.string(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("timestamp_ms", pa.int64(), nullable=False),
        pa.field("key", pa.binary()),
        pa.field("value", pa.binary()),
    ]
)
META_KEY = b"hstu.recorded_log"
FORMAT_VERSION = 1
_HOW_TO_FIX = (
    "write logs with streaming.recorded_log.write_log, `python -m infra.recorded_log record` or "
    "`python -m infra.datasets`"
)


class RecordedLogError(ValueError):
    """A recorded log file (or table) breaks the format; the message lists every problem found."""


@dataclass(frozen=True)
class RecordedLog:
    """A validated log: the table in LOG_SCHEMA, its single topic and the topic's partition count."""

    table: pa.Table
    topic: str
    num_partitions: int
    path: Path | None = None

    def __len__(self) -> int:
        return self.table.num_rows

    def partition_rows(self, partition: int) -> np.ndarray:
        """Row indices of `partition`, in offset order."""
        return np.flatnonzero(self.table.column("partition").to_numpy() == partition)

    def partition_counts(self) -> dict[int, int]:
        counts = np.bincount(self.table.column("partition").to_numpy(), minlength=self.num_partitions)
        return {p: int(c) for p, c in enumerate(counts)}


# --- Kafka's default partitioner, vectorised ---------------------------------------------------


def _murmur2_fixed(mat: np.ndarray) -> np.ndarray:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2) of each row of a (n, L) uint8 matrix."""
    n, length = mat.shape
    m = np.uint32(0x5BD1E995)
    h = np.full(n, (0x9747B28C ^ length) & 0xFFFFFFFF, dtype=np.uint32)
    nblocks = length // 4
    with np.errstate(over="ignore"):
        if nblocks:
            b = mat[:, : nblocks * 4].reshape(n, nblocks, 4).astype(np.uint32)
            k_all = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)  # (n, nblocks)
            for j in range(nblocks):
                k = k_all[:, j] * m
                k ^= k >> np.uint32(24)
                k *= m
                h *= m
                h ^= k
        extra, last = length % 4, nblocks * 4
        if extra == 3:
            h ^= mat[:, last + 2].astype(np.uint32) << np.uint32(16)
        if extra >= 2:
            h ^= mat[:, last + 1].astype(np.uint32) << np.uint32(8)
        if extra >= 1:
            h ^= mat[:, last].astype(np.uint32)
            h *= m
        h ^= h >> np.uint32(13)
        h *= m
        h ^= h >> np.uint32(15)
    return h


def kafka_partition(keys: list[bytes], num_partitions: int) -> np.ndarray:
    """The partition Kafka's default partitioner picks for each (non-null) key, as int32."""
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise RecordedLogError(f"num_partitions ({num_partitions!r}) must be an integer >= 1")
    n = len(keys)
    if any(k is None for k in keys):
        raise RecordedLogError("a null key has no hash partition: give every record a key")
    lengths = np.fromiter(map(len, keys), dtype=np.int64, count=n)
    out = np.empty(n, dtype=np.int32)
    for length in np.unique(lengths):
        idx = np.flatnonzero(lengths == length)
        buf = b"".join([keys[i] for i in idx])
        mat = np.frombuffer(buf, dtype=np.uint8).reshape(len(idx), int(length))
        h = _murmur2_fixed(mat)
        out[idx] = ((h & np.uint32(0x7FFFFFFF)) % np.uint32(num_partitions)).astype(np.int32)
    return out


# --- building, validating, reading and writing logs ---------------------------------------------


def events_to_log(events: pd.DataFrame, *, topic: str, num_partitions: int) -> pa.Table:
    """Engagement events (user_id, item_id, action, ts_ms) as a recorded log, rows in the given order.

    Keys are the user ids, partitions come from Kafka's default partitioner on the key, offsets
    count from 0 in each partition, and timestamp_ms is the event's ts_ms. Sort the events by
    time first if the stream should be in time order.
    """
    missing = [c for c in ("user_id", "item_id", "action", "ts_ms") if c not in events.columns]
    if missing:
        raise RecordedLogError(f"events frame lacks columns {missing}; it has {list(events.columns)}")
    if not isinstance(topic, str) or not topic:
        raise RecordedLogError(f"topic ({topic!r}) must be a non-empty string")
    user = events["user_id"].to_numpy(dtype=np.int64)
    # Hash each distinct user once: a user's key, hence partition, never changes.
    uniq, inverse = np.unique(user, return_inverse=True)
    partition = kafka_partition(encode_keys(uniq), num_partitions)[inverse]
    # Offsets count 0, 1, ... within each partition, in row order.
    order = np.argsort(partition, kind="stable")
    counts = np.bincount(partition, minlength=num_partitions)
    offset = np.empty(len(partition), dtype=np.int64)
    offset[order] = np.arange(len(partition)) - np.repeat(np.cumsum(counts) - counts, counts)
    keys = encode_keys(user)
    values = encode_values(user, events["item_id"].to_numpy(), events["action"].tolist(), events["ts_ms"].to_numpy())
    n = len(events)
    return pa.Table.from_arrays(
        [
            pa.array([topic] * n, type=pa.string()),
            pa.array(partition, type=pa.int32()),
            pa.array(offset, type=pa.int64()),
            pa.array(events["ts_ms"].to_numpy(dtype=np.int64), type=pa.int64()),
            pa.array(keys, type=pa.binary()),
            pa.array(values, type=pa.binary()),
        ],
        schema=LOG_SCHEMA,
    )


def _coerce(table: pa.Table, problems: list[str]) -> pa.Table | None:
    names = table.column_names
    wanted = LOG_SCHEMA.names
    missing = [c for c in wanted if c not in names]
    extra = [c for c in names if c not in wanted]
    if missing:
        problems.append(f"missing columns {missing}")
    if extra:
        problems.append(f"unexpected columns {extra} (a log has exactly {wanted})")
    if missing:
        return None
    arrays = []
    for field in LOG_SCHEMA:
        col = table.column(field.name)
        t = col.type
        if pa.types.is_dictionary(t):
            t = t.value_type
            col = col.cast(t)
        if field.name == "topic":
            ok = pa.types.is_string(t) or pa.types.is_large_string(t)
        elif field.name in ("key", "value"):
            ok = (
                pa.types.is_binary(t)
                or pa.types.is_large_binary(t)
                or pa.types.is_string(t)
                or pa.types.is_large_string(t)
            )
        else:
            ok = pa.types.is_integer(t)
        if not ok:
            problems.append(f"column {field.name!r} has type {col.type}, expected {field.type}")
            arrays.append(None)
            continue
        try:
            arrays.append(col.cast(field.type))  # safe cast: fails on values that do not fit
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            problems.append(f"column {field.name!r} ({col.type}) does not fit {field.type}: {exc}")
            arrays.append(None)
    if any(a is None for a in arrays):
        return None
    return pa.Table.from_arrays(arrays, schema=LOG_SCHEMA.remove_metadata())


def validate_log_table(table: pa.Table, *, num_partitions: int | None = None, where: str = "log") -> RecordedLog:
    """Check `table` against the format; return it as a RecordedLog in LOG_SCHEMA, or raise
    RecordedLogError naming every problem. `num_partitions` defaults to max(partition) + 1."""
    problems: list[str] = []
    coerced = _coerce(table, problems)
    if coerced is None:
        raise RecordedLogError(f"{where} is not a recorded Kafka log: {'; '.join(problems)}. {_HOW_TO_FIX}")
    table = coerced
    for name in ("topic", "partition", "offset", "timestamp_ms"):
        nulls = table.column(name).null_count
        if nulls:
            first = int(np.flatnonzero(table.column(name).is_null().to_numpy(zero_copy_only=False))[0])
            problems.append(f"{nulls} null {name} values (first at row {first})")
    topics = pc.unique(table.column("topic").drop_null()).to_pylist()
    if len(topics) > 1:
        problems.append(f"{len(topics)} topics {sorted(topics)[:5]}: a log holds one topic, split it per topic")
    if table.num_rows and topics == [""]:
        problems.append("the topic name is empty")
    part = table.column("partition").fill_null(0).to_numpy()
    offs = table.column("offset").fill_null(0).to_numpy()
    ts = table.column("timestamp_ms").fill_null(0).to_numpy()
    if len(part) and part.min() < 0:
        problems.append(f"negative partition {part.min()} at row {int(np.argmin(part))}")
    max_part = int(part.max()) if len(part) else -1
    if num_partitions is None:
        num_partitions = max(max_part + 1, 1)
    elif isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        problems.append(f"num_partitions ({num_partitions!r}) must be an integer >= 1")
        num_partitions = max(max_part + 1, 1)
    elif max_part >= num_partitions:
        problems.append(
            f"partition {max_part} (row {int(np.argmax(part))}) is not below the topic's "
            f"num_partitions {num_partitions}"
        )
    if len(offs) and offs.min() < 0:
        problems.append(f"negative offset {offs.min()} at row {int(np.argmin(offs))}")
    if len(ts) and ts.min() < -1:
        problems.append(f"timestamp_ms {ts.min()} at row {int(np.argmin(ts))} is below -1 (-1 means no timestamp)")
    if len(part) > 1:
        order = np.argsort(part, kind="stable")  # rows of each partition, still in file order
        same = part[order][1:] == part[order][:-1]
        not_increasing = same & (offs[order][1:] <= offs[order][:-1])
        if not_increasing.any():
            j = int(np.flatnonzero(not_increasing)[0])
            r0, r1 = int(order[j]), int(order[j + 1])
            problems.append(
                f"{int(not_increasing.sum())} offsets do not increase within their partition, first: partition "
                f"{part[r1]} offset {offs[r1]} at row {r1} after offset {offs[r0]} at row {r0}"
            )
    if problems:
        raise RecordedLogError(f"{where} is not a valid recorded Kafka log: {'; '.join(problems)}. {_HOW_TO_FIX}")
    topic = topics[0] if topics else ""
    return RecordedLog(table=table, topic=topic, num_partitions=num_partitions)


def write_log(table: pa.Table, path: str | Path, *, num_partitions: int | None = None) -> RecordedLog:
    """Validate `table` and write it to `path` (zstd Parquet), atomically; returns the validated log."""
    path = Path(path)
    log = validate_log_table(table, num_partitions=num_partitions, where=f"table for {path}")
    meta = {META_KEY: json.dumps({"version": FORMAT_VERSION, "num_partitions": log.num_partitions}).encode()}
    out = log.table.replace_schema_metadata(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(out, tmp, compression="zstd", row_group_size=256 * 1024)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return RecordedLog(table=log.table, topic=log.topic, num_partitions=log.num_partitions, path=path)


def read_log(path: str | Path) -> RecordedLog:
    """Read and validate a log file; raises RecordedLogError saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise RecordedLogError(f"{path} does not exist or is not a file")
    try:
        with pq.ParquetFile(path) as fh:  # not pq.read_table: that imports pyarrow.dataset (seconds)
            table = fh.read()
    except (pa.ArrowInvalid, OSError) as exc:
        raise RecordedLogError(f"{path} is not a readable Parquet file ({exc}). {_HOW_TO_FIX}") from None
    num_partitions = None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is not None:
        try:
            meta = json.loads(raw)
            version, num_partitions = meta["version"], meta["num_partitions"]
        except (ValueError, KeyError, TypeError):
            raise RecordedLogError(f"{path}: metadata {META_KEY.decode()} is not valid: {raw[:200]!r}") from None
        if version != FORMAT_VERSION:
            raise RecordedLogError(f"{path}: log format version {version!r}; this code reads version {FORMAT_VERSION}")
    log = validate_log_table(table, num_partitions=num_partitions, where=str(path))
    return RecordedLog(table=log.table, topic=log.topic, num_partitions=log.num_partitions, path=path)
