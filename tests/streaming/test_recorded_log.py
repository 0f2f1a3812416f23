"""The recorded Kafka log format: building, writing, reading, and refusing bad files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kafka.partitioner.default import murmur2

from streaming.events import ActionVocab, decode_values
from streaming.recorded_log import (
    LOG_SCHEMA,
    META_KEY,
    RecordedLogError,
    events_to_log,
    kafka_partition,
    read_log,
    validate_log_table,
    write_log,
)


def small_events(n: int = 500, users: int = 37, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user_id": rng.integers(1, users + 1, n) * (2**54 + 1),  # ids above 2^53
            "item_id": rng.integers(0, 2**63 - 1, n),
            "action": [f"rate_{r}" for r in rng.integers(1, 6, n)],
            "ts_ms": np.sort(rng.integers(0, 10**12, n)),
        }
    )


def test_partitioner_matches_kafkas_murmur2():
    rng = np.random.default_rng(1)
    keys = [bytes(rng.integers(0, 256, int(rng.integers(0, 24))).astype(np.uint8)) for _ in range(3000)]
    keys += [b"%d" % u for u in range(2000)] + [b""]
    for parts in (1, 2, 4, 7, 100):
        expected = [(murmur2(k) & 0x7FFFFFFF) % parts for k in keys]
        assert kafka_partition(keys, parts).tolist() == expected
    with pytest.raises(RecordedLogError, match="null key"):
        kafka_partition([b"1", None], 4)
    with pytest.raises(RecordedLogError, match=r"num_partitions \(0\)"):
        kafka_partition([b"1"], 0)


def test_events_to_log_keys_partitions_offsets_values():
    events = small_events()
    table = events_to_log(events, topic="engagements", num_partitions=4)
    assert table.schema == LOG_SCHEMA
    part = table.column("partition").to_numpy()
    offs = table.column("offset").to_numpy()
    assert table.column("key").to_pylist() == [b"%d" % u for u in events.user_id]
    # One user, one partition; offsets count 0.. within each partition in row order.
    per_user = pd.DataFrame({"u": events.user_id, "p": part}).groupby("u").p.nunique()
    assert (per_user == 1).all()
    for p in range(4):
        assert offs[part == p].tolist() == list(range(int((part == p).sum())))
    assert set(part.tolist()) == {0, 1, 2, 3}
    assert table.column("timestamp_ms").to_pylist() == events.ts_ms.tolist()
    valid, invalid = decode_values(table.column("value"), part, offs, vocab=ActionVocab.movielens(), now_ms=10**13)
    assert invalid.num_rows == 0
    assert valid.column("user_id").to_pylist() == events.user_id.tolist()
    assert valid.column("item_id").to_pylist() == events.item_id.tolist()
    assert valid.column("action").to_pylist() == events.action.tolist()


def test_write_read_round_trip(tmp_path):
    table = events_to_log(small_events(), topic="t1", num_partitions=8)
    path = tmp_path / "sub" / "log.parquet"
    written = write_log(table, path, num_partitions=8)
    log = read_log(path)
    assert log.table.equals(table)
    assert (log.topic, log.num_partitions, written.num_partitions) == ("t1", 8, 8)
    assert json.loads(pq.read_schema(path).metadata[META_KEY]) == {"version": 1, "num_partitions": 8}
    assert sum(log.partition_counts().values()) == len(log) == 500
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left behind


def test_interleaved_partitions_and_gaps_are_fine_and_types_are_coerced():
    t = pa.table(
        {
            "topic": pa.array(["x"] * 5).dictionary_encode(),
            "partition": pa.array([1, 0, 1, 0, 1], type=pa.int64()),
            "offset": pa.array([5, 0, 9, 3, 10], type=pa.int32()),
            "timestamp_ms": [1, 2, -1, 4, 5],
            "key": pa.array(["a", None, "b", "c", "d"], type=pa.string()),
            "value": pa.array([b"1", b"2", None, b"4", b"5"], type=pa.large_binary()),
        }
    )
    log = validate_log_table(t, num_partitions=3)
    assert log.table.schema == LOG_SCHEMA
    assert log.table.column("key").to_pylist() == [b"a", None, b"b", b"c", b"d"]
    assert log.partition_rows(1).tolist() == [0, 2, 4]


def good_table(n: int = 6) -> pa.Table:
    return events_to_log(small_events(n), topic="t", num_partitions=2)


def replace(table: pa.Table, name: str, array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, array)


BAD_TABLES = [
    ("missing columns ['key']", lambda t: t.drop_columns(["key"])),
    ("unexpected columns ['extra']", lambda t: t.append_column("extra", pa.array([1] * t.num_rows))),
    ("column 'offset' has type string", lambda t: replace(t, "offset", pa.array(["1"] * t.num_rows))),
    ("column 'value' has type int64", lambda t: replace(t, "value", pa.array([1] * t.num_rows))),
    (
        "column 'partition' (int64) does not fit int32",
        lambda t: replace(t, "partition", pa.array([2**40] * t.num_rows)),
    ),
    (
        "1 null offset values (first at row 2)",
        lambda t: replace(t, "offset", pa.array([0, 1, None, 3, 4, 5], pa.int64())),
    ),
    ("2 topics ['t', 'u']", lambda t: replace(t, "topic", pa.array(["t"] * 5 + ["u"]))),
    ("negative partition -1 at row 0", lambda t: replace(t, "partition", pa.array([-1, 0, 0, 0, 0, 0], pa.int32()))),
    ("negative offset -3 at row 1", lambda t: replace(t, "offset", pa.array([0, -3, 0, 1, 2, 3], pa.int64()))),
    (
        "timestamp_ms -2 at row 4 is below -1",
        lambda t: replace(t, "timestamp_ms", pa.array([0, 0, 0, 0, -2, 0], pa.int64())),
    ),
    (
        "offsets do not increase within their partition, first: partition 0 offset 0 at row 2 after offset 5 at row 1",
        lambda t: replace(
            replace(t, "partition", pa.array([0] * 6, pa.int32())), "offset", pa.array([0, 5, 0, 1, 6, 7], pa.int64())
        ),
    ),
]


@pytest.mark.parametrize(("message", "mutate"), BAD_TABLES, ids=[m[:30] for m, _ in BAD_TABLES])
def test_bad_tables_are_refused_with_what_is_wrong(tmp_path, message, mutate):
    bad = mutate(good_table())
    with pytest.raises(RecordedLogError, match="not a (valid )?recorded Kafka log") as err:
        write_log(bad, tmp_path / "bad.parquet")
    assert message in str(err.value)
    assert "write_log" in str(err.value)  # says how to make a good one
    assert not (tmp_path / "bad.parquet").exists()
    # The same file written behind our back is refused on read.
    pq.write_table(bad, tmp_path / "raw.parquet")
    with pytest.raises(RecordedLogError, match="raw.parquet"):
        read_log(tmp_path / "raw.parquet")


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(RecordedLogError, match="does not exist"):
        read_log(tmp_path / "nope.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(RecordedLogError, match="not a readable Parquet file"):
        read_log(tmp_path / "junk.parquet")
    t = good_table()
    pq.write_table(
        t.replace_schema_metadata({META_KEY: b'{"version": 2, "num_partitions": 2}'}), tmp_path / "v2.parquet"
    )
    with pytest.raises(RecordedLogError, match="log format version 2; this code reads version 1"):
        read_log(tmp_path / "v2.parquet")
    pq.write_table(t.replace_schema_metadata({META_KEY: b"{bad"}), tmp_path / "meta.parquet")
    with pytest.raises(RecordedLogError, match="metadata hstu.recorded_log is not valid"):
        read_log(tmp_path / "meta.parquet")
    pq.write_table(
        t.replace_schema_metadata({META_KEY: b'{"version": 1, "num_partitions": 1}'}), tmp_path / "np.parquet"
    )
    with pytest.raises(RecordedLogError, match="partition 1 .* is not below the topic's num_partitions 1"):
        read_log(tmp_path / "np.parquet")
    with pytest.raises(RecordedLogError, match="events frame lacks columns"):
        events_to_log(pd.DataFrame({"user_id": [1]}), topic="t", num_partitions=1)
