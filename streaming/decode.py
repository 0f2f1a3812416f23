"""Decoding a micro-batch: Kafka records -> valid events and dead letters, as Ray Data transformations.

`decode_block` is the `map_batches` function the job fuses into each partition's read task, so
decoding runs in parallel where the records were fetched. It keeps only light imports (no Feast),
because every Ray worker that runs it imports this module. Validity is decided by
streaming/events.py (`decode_values`); this module carries the record coordinates and Kafka
timestamps alongside, and keeps the raw key and value of every invalid record for the DLQ.

    >>> import pyarrow as pa
    >>> from streaming.kafka_source import RECORD_SCHEMA
    >>> block = pa.table({"partition": pa.array([0, 0], pa.int32()), "offset": [7, 8], "timestamp_ms": [1, 2],
    ...     "key": [b"1", b"1"], "value": [b'{"user_id":1,"item_id":5,"action":"view","ts_ms":3}', b"{oops"]},
    ...     schema=RECORD_SCHEMA)
    >>> valid, letters = split_decoded(decode_block(block, actions=("view",)))
    >>> valid.column("item_id").to_pylist(), letters.column("kind").to_pylist()
    ([5], ['bad_json'])
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streaming.events import ActionVocab, DecodeConfig, decode_values

DECODED_SCHEMA = pa.schema(
    [
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("timestamp_ms", pa.int64()),  # the Kafka record's timestamp (production time)
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("action", pa.int8()),  # index into the action vocabulary
        ("ts_ms", pa.int64()),
        ("key", pa.binary()),  # raw key and value: dead letters only
        ("value", pa.binary()),
        ("reason", pa.string()),  # null for a valid event
        ("kind", pa.string()),
    ]
)
EVENT_COLUMNS = ["partition", "offset", "timestamp_ms", "user_id", "item_id", "action", "ts_ms"]
DEAD_LETTER_COLUMNS = ["partition", "offset", "timestamp_ms", "key", "value", "reason", "kind"]


def _valid_mask(partitions: np.ndarray, offsets: np.ndarray, invalid: pa.Table) -> np.ndarray:
    """Which input rows decode_values kept, from the (partition, offset) pairs it rejected."""
    ok = np.ones(len(offsets), dtype=bool)
    if invalid.num_rows == 0:
        return ok
    bad_part = invalid.column("partition").to_numpy()
    bad_off = invalid.column("offset").to_numpy()
    for p in np.unique(bad_part):  # a block holds one or a few partitions
        rows = np.flatnonzero(partitions == p)
        ok[rows[np.isin(offsets[rows], bad_off[bad_part == p])]] = False
    return ok


def decode_block(
    block: pa.Table, *, actions: tuple[str, ...], decode: DecodeConfig = DecodeConfig(), now_ms: int | None = None
) -> pa.Table:
    """Decode one block of Kafka records (RECORD_SCHEMA) into a DECODED_SCHEMA table.

    Valid rows have null key/value/reason/kind; invalid rows have null event fields.
    """
    vocab = ActionVocab(actions=tuple(actions))
    n = block.num_rows
    partitions = block.column("partition").to_numpy().astype(np.int64)
    offsets = block.column("offset").to_numpy()
    record_ts = block.column("timestamp_ms").to_numpy()
    valid, invalid = decode_values(
        block.column("value"), partitions, offsets, vocab=vocab, now_ms=now_ms, config=decode
    )
    ok = _valid_mask(partitions, offsets, invalid)
    nv, ni = int(ok.sum()), n - int(ok.sum())
    bad_rows = pa.array(np.flatnonzero(~ok))

    def stack(valid_part: pa.Array, invalid_part: pa.Array) -> pa.ChunkedArray:
        return pa.chunked_array([valid_part, invalid_part])

    def nulls(typ: pa.DataType, count: int) -> pa.Array:
        return pa.nulls(count, type=typ)

    columns = {
        "partition": stack(pa.array(partitions[ok].astype(np.int32)), pa.array(partitions[~ok].astype(np.int32))),
        "offset": stack(pa.array(offsets[ok]), pa.array(offsets[~ok])),
        "timestamp_ms": stack(pa.array(record_ts[ok]), pa.array(record_ts[~ok])),
        "user_id": stack(valid.column("user_id").combine_chunks(), nulls(pa.int64(), ni)),
        "item_id": stack(valid.column("item_id").combine_chunks(), nulls(pa.int64(), ni)),
        "action": stack(valid.column("action").combine_chunks().indices, nulls(pa.int8(), ni)),
        "ts_ms": stack(valid.column("ts_ms").combine_chunks(), nulls(pa.int64(), ni)),
        "key": stack(nulls(pa.binary(), nv), block.column("key").take(bad_rows).combine_chunks().cast(pa.binary())),
        "value": stack(nulls(pa.binary(), nv), invalid.column("value").combine_chunks()),
        "reason": stack(nulls(pa.string(), nv), invalid.column("reason").combine_chunks()),
        "kind": stack(nulls(pa.string(), nv), invalid.column("kind").combine_chunks()),
    }
    return pa.table(columns, schema=DECODED_SCHEMA)


def split_decoded(decoded: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(valid events with EVENT_COLUMNS, dead letters with DEAD_LETTER_COLUMNS)."""
    is_bad = decoded.column("reason").is_valid()
    valid = decoded.filter(pc.invert(is_bad)).select(EVENT_COLUMNS)
    invalid = decoded.filter(is_bad).select(DEAD_LETTER_COLUMNS)
    return valid, invalid


def order_events(events: pa.Table) -> pa.Table:
    """Events sorted by (user_id, ts_ms, offset): each user's events together, in order."""
    if events.num_rows == 0:
        return events
    order = pc.sort_indices(
        events, sort_keys=[("user_id", "ascending"), ("ts_ms", "ascending"), ("offset", "ascending")]
    )
    return events.take(order)
