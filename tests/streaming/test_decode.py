"""decode_block keeps every record's coordinates, routes each invalid one with its reason, and
order_events groups users in (ts, offset) order."""

from __future__ import annotations

import pyarrow as pa

from streaming.decode import DECODED_SCHEMA, decode_block, order_events, split_decoded
from streaming.events import INVALID_KINDS
from streaming.kafka_source import RECORD_SCHEMA

GOOD = b'{"user_id":%d,"item_id":%d,"action":"rate_%d","ts_ms":%d}'
BAD = {
    "null_value": None,
    "oversized": b'{"user_id":1,"item_id":1,"action":"rate_1","ts_ms":1,"pad":"' + b"x" * 5000 + b'"}',
    "bad_json": b"{oops",
    "not_object": b"[1,2]",
    "missing_field": b'{"user_id":1,"item_id":1,"action":"rate_1"}',
    "wrong_type": b'{"user_id":"1","item_id":1,"action":"rate_1","ts_ms":1}',
    "id_out_of_range": b'{"user_id":-4,"item_id":1,"action":"rate_1","ts_ms":1}',
    "bad_timestamp": b'{"user_id":1,"item_id":1,"action":"rate_1","ts_ms":-5}',
    "future_timestamp": b'{"user_id":1,"item_id":1,"action":"rate_1","ts_ms":9000000000000000}',
    "unknown_action": b'{"user_id":1,"item_id":1,"action":"teleport","ts_ms":1}',
}
ACTIONS = tuple(f"rate_{r}" for r in range(1, 6))


def block(values: list[bytes | None], partition: int = 3, first_offset: int = 100) -> pa.Table:
    n = len(values)
    return pa.table(
        {
            "partition": pa.array([partition] * n, pa.int32()),
            "offset": pa.array(range(first_offset, first_offset + n), pa.int64()),
            "timestamp_ms": pa.array([1_000 + i for i in range(n)], pa.int64()),
            "key": pa.array([b"k%d" % i for i in range(n)], pa.binary()),
            "value": pa.array(values, pa.binary()),
        },
        schema=RECORD_SCHEMA,
    )


def test_every_invalid_kind_is_routed_with_its_record_and_reason():
    assert set(BAD) == set(INVALID_KINDS)
    values = []
    for i, bad in enumerate(BAD.values()):  # valid and invalid interleaved
        values += [GOOD % (i, 10 + i, 1 + i % 5, 5_000 + i), bad]
    decoded = decode_block(block(values), actions=ACTIONS)
    assert decoded.schema == DECODED_SCHEMA
    valid, letters = split_decoded(decoded)
    assert valid.column("offset").to_pylist() == list(range(100, 100 + len(values), 2))
    assert valid.column("item_id").to_pylist() == [10 + i for i in range(len(BAD))]
    assert valid.column("timestamp_ms").to_pylist() == [1_000 + i for i in range(0, len(values), 2)]
    assert letters.column("kind").to_pylist() == list(BAD)
    assert letters.column("offset").to_pylist() == list(range(101, 101 + len(values), 2))
    assert letters.column("value").to_pylist() == list(BAD.values())
    assert letters.column("key").to_pylist() == [b"k%d" % i for i in range(1, len(values), 2)]
    for kind, reason in zip(letters.column("kind").to_pylist(), letters.column("reason").to_pylist()):
        assert reason.startswith(kind + ": ") and len(reason) > len(kind) + 3


def test_blocks_with_several_partitions_sharing_offsets():
    a, b = (
        block([GOOD % (1, 1, 1, 1), b"{bad"], partition=0, first_offset=5),
        block([b"{bad", GOOD % (2, 2, 2, 2)], partition=1, first_offset=5),
    )
    valid, letters = split_decoded(decode_block(pa.concat_tables([a, b]), actions=ACTIONS))
    assert list(zip(valid.column("partition").to_pylist(), valid.column("offset").to_pylist())) == [(0, 5), (1, 6)]
    assert list(zip(letters.column("partition").to_pylist(), letters.column("offset").to_pylist())) == [(0, 6), (1, 5)]


def test_order_events_groups_users_by_time_then_offset():
    values = [GOOD % (2, 1, 1, 50), GOOD % (1, 2, 1, 70), GOOD % (2, 3, 1, 10), GOOD % (1, 4, 1, 70)]
    valid, _ = split_decoded(decode_block(block(values), actions=ACTIONS))
    ordered = order_events(valid)
    assert ordered.column("item_id").to_pylist() == [2, 4, 3, 1]
