"""The event contract: encoding, the vectorised decoder on valid values and every invalid kind."""

from __future__ import annotations

import json
import time

import numpy as np
import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.events import (
    INT64_MAX,
    INVALID_KINDS,
    INVALID_SCHEMA,
    VALID_SCHEMA,
    ActionVocab,
    DecodeConfig,
    EngagementEvent,
    EventContractError,
    decode_values,
    encode_keys,
    encode_values,
)

VOCAB = ActionVocab.movielens()
NOW = 1_700_000_000_000


def ev(**over) -> bytes:
    base = {"user_id": 1, "item_id": 2, "action": "rate_3", "ts_ms": 1_000}
    base.update(over)
    return orjson.dumps({k: v for k, v in base.items() if v is not _DROP})


_DROP = object()


def test_valid_values_decode_exactly_with_ids_above_2_53():
    users = [0, 7, 2**53 + 1, INT64_MAX]
    items = [INT64_MAX, 2**60 + 3, 5, 0]
    actions = ["rate_1", "rate_5", "rate_3", "rate_5"]
    ts = [0, 1, 1_000_000, NOW]
    vals = encode_values(users, items, actions, ts)
    valid, invalid = decode_values(vals, 2, [10, 11, 12, 13], vocab=VOCAB, now_ms=NOW)
    assert invalid.num_rows == 0
    assert valid.schema == VALID_SCHEMA
    assert valid.column("user_id").to_pylist() == users
    assert valid.column("item_id").to_pylist() == items
    assert valid.column("action").to_pylist() == actions
    # The dictionary indices are the vocabulary's action ids.
    assert valid.column("action").chunk(0).indices.to_pylist() == [VOCAB.index(a) for a in actions]
    assert valid.column("ts_ms").to_pylist() == ts
    assert valid.column("partition").to_pylist() == [2] * 4
    assert valid.column("offset").to_pylist() == [10, 11, 12, 13]


def test_arrow_input_extra_fields_and_per_value_partitions():
    vals = [
        ev(user_id=5, weight=0.5, surface="home"),
        ev(user_id=6, nested={"a": [1, 2]}),
        EngagementEvent(user_id=9, item_id=4, action="rate_2", ts_ms=3).value(),
    ]
    from_list = decode_values(vals, [0, 1, 3], [4, 5, 6], vocab=VOCAB, now_ms=NOW)
    from_arrow = decode_values(
        pa.array(vals, type=pa.binary()), np.array([0, 1, 3]), np.array([4, 5, 6]), vocab=VOCAB, now_ms=NOW
    )
    from_large = decode_values(
        pa.chunked_array([pa.array(vals, type=pa.large_binary())]), [0, 1, 3], [4, 5, 6], vocab=VOCAB, now_ms=NOW
    )
    for valid, invalid in (from_list, from_arrow, from_large):
        assert invalid.num_rows == 0
        assert valid.column("user_id").to_pylist() == [5, 6, 9]
        assert valid.column("partition").to_pylist() == [0, 1, 3]
    assert EngagementEvent(user_id=9, item_id=4, action="rate_2", ts_ms=3).key() == b"9"
    assert encode_keys([1, 2**62]) == [b"1", b"4611686018427387904"]


INVALID_CASES = [
    ("null_value", None, "tombstone"),
    ("null_value", b"", "empty value"),
    ("oversized", b'{"user_id":1,"pad":"' + b"x" * 5000 + b'"}', "5022 bytes > max_value_bytes 4096"),
    ("bad_json", b"{oops", "b'{oops'"),
    ("bad_json", b'{"user_id":1', "line 1"),
    ("bad_json", b"\xff\xfe", ""),
    ("not_object", b"[1,2]", "JSON array"),
    ("not_object", b"42", "JSON integer"),
    ("missing_field", ev(item_id=_DROP), "'item_id' is missing"),
    ("missing_field", ev(action=None), "'action' is missing or null"),
    ("missing_field", b"{}", "is missing"),
    ("wrong_type", ev(user_id=1.0), "user_id 1.0 is a JSON float"),
    ("wrong_type", ev(item_id="12"), "item_id '12' is a JSON string"),
    ("wrong_type", ev(user_id=True), "user_id True is a JSON boolean"),
    ("wrong_type", ev(ts_ms=[1]), "ts_ms [1] is a JSON array"),
    ("wrong_type", ev(action=3), "action 3 is a JSON integer, expected a string"),
    ("id_out_of_range", ev(user_id=-1), "user_id -1 is negative"),
    ("id_out_of_range", ev(item_id=-(2**63)), "is negative"),
    (
        "id_out_of_range",
        b'{"user_id":9223372036854775808,"item_id":2,"action":"rate_3","ts_ms":1}',
        "exceeds the int64 maximum",
    ),
    (
        "id_out_of_range",
        b'{"user_id":1,"item_id":123456789012345678901234,"action":"rate_3","ts_ms":1}',
        "outside the int64 range",
    ),
    ("bad_timestamp", ev(ts_ms=-5), "ts_ms -5 is negative"),
    ("bad_timestamp", b'{"user_id":1,"item_id":2,"action":"rate_3","ts_ms":18446744073709551615}', "outside 0..2^63-1"),
    ("future_timestamp", ev(ts_ms=NOW + 300_001), "max skew 300000 ms"),
    ("unknown_action", ev(action="rate_9"), "'rate_9' is not in the vocabulary"),
    ("unknown_action", ev(action=""), "'' is not in the vocabulary"),
]


@pytest.mark.parametrize(
    ("kind", "value", "detail"), INVALID_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(INVALID_CASES)]
)
def test_each_invalid_kind_is_separated_with_its_reason(kind, value, detail):
    good = ev(user_id=77)
    valid, invalid = decode_values([good, value, good], 1, [100, 101, 102], vocab=VOCAB, now_ms=NOW)
    assert valid.column("offset").to_pylist() == [100, 102]
    assert valid.column("user_id").to_pylist() == [77, 77]
    assert invalid.schema == INVALID_SCHEMA
    row = invalid.to_pylist()
    assert len(row) == 1, row
    assert row[0]["kind"] == kind
    assert row[0]["reason"].startswith(f"{kind}: ")
    assert detail in row[0]["reason"]
    assert (row[0]["partition"], row[0]["offset"], row[0]["value"]) == (1, 101, value)


def test_every_kind_is_covered_and_a_mixed_batch_keeps_order():
    assert {c[0] for c in INVALID_CASES} == set(INVALID_KINDS)
    vals = [v for _, v, _ in INVALID_CASES]
    good = [ev(user_id=i) for i in range(len(vals))]
    mixed = [x for pair in zip(good, vals) for x in pair]
    valid, invalid = decode_values(mixed, 0, np.arange(len(mixed)), vocab=VOCAB, now_ms=NOW)
    assert valid.column("user_id").to_pylist() == list(range(len(vals)))
    assert valid.column("offset").to_pylist() == list(range(0, len(mixed), 2))
    assert invalid.column("offset").to_pylist() == list(range(1, len(mixed), 2))
    assert invalid.column("kind").to_pylist() == [c[0] for c in INVALID_CASES]


def test_config_limits():
    cfg = DecodeConfig(max_value_bytes=80, max_future_skew_ms=0, max_user_id=100, max_item_id=10)
    vals = [ev(user_id=100, item_id=10), ev(user_id=101), ev(item_id=11), ev(ts_ms=NOW + 1), ev(pad="y" * 100)]
    valid, invalid = decode_values(vals, 0, range(5), vocab=VOCAB, now_ms=NOW, config=cfg)
    assert valid.column("offset").to_pylist() == [0]
    assert invalid.column("kind").to_pylist() == ["id_out_of_range", "id_out_of_range", "future_timestamp", "oversized"]
    assert "user_id 101 > max 100" in invalid.column("reason")[0].as_py()
    # No future check at all when the skew is None.
    valid, invalid = decode_values(
        [ev(ts_ms=INT64_MAX)], 0, [0], vocab=VOCAB, now_ms=NOW, config=DecodeConfig(max_future_skew_ms=None)
    )
    assert valid.num_rows == 1 and invalid.num_rows == 0


def test_now_defaults_to_the_wall_clock():
    now = time.time_ns() // 1_000_000
    valid, invalid = decode_values([ev(ts_ms=now), ev(ts_ms=now + 3_600_000)], 0, [0, 1], vocab=VOCAB)
    assert valid.column("offset").to_pylist() == [0]
    assert invalid.column("kind").to_pylist() == ["future_timestamp"]


def test_empty_batch():
    valid, invalid = decode_values([], 0, [], vocab=VOCAB)
    assert valid.num_rows == 0 and invalid.num_rows == 0
    assert valid.schema == VALID_SCHEMA and invalid.schema == INVALID_SCHEMA


def test_one_bad_value_does_not_change_the_others():
    rng = np.random.default_rng(0)
    n = 2_000
    vals = encode_values(
        rng.integers(0, 2**62, n),
        rng.integers(0, 2**62, n),
        [f"rate_{r}" for r in rng.integers(1, 6, n)],
        rng.integers(0, NOW, n),
    )
    clean, _ = decode_values(vals, 0, np.arange(n), vocab=VOCAB, now_ms=NOW)
    dirty = list(vals)
    dirty[777] = b'{"user_id":'
    valid, invalid = decode_values(dirty, 0, np.arange(n), vocab=VOCAB, now_ms=NOW)
    assert invalid.column("offset").to_pylist() == [777]
    keep = np.flatnonzero(np.arange(n) != 777)
    assert valid.equals(clean.take(pa.array(keep)))


def test_bad_vocab_config_and_arguments_are_refused():
    with pytest.raises(EventContractError, match=r"repeat \['a'\]"):
        ActionVocab(actions=("a", "b", "a"))
    with pytest.raises(EventContractError, match="non-empty tuple"):
        ActionVocab(actions=())
    with pytest.raises(EventContractError, match="'has space'"):
        ActionVocab(actions=("has space",))
    with pytest.raises(EventContractError, match="unknown action 'x'"):
        VOCAB.index("x")
    with pytest.raises(EventContractError, match=r"max_value_bytes \(1\)"):
        DecodeConfig(max_value_bytes=1)
    with pytest.raises(EventContractError, match=r"max_future_skew_ms \(-1\)"):
        DecodeConfig(max_future_skew_ms=-1)
    with pytest.raises(EventContractError, match=r"max_item_id \(True\)"):
        DecodeConfig(max_item_id=True)
    with pytest.raises(EventContractError, match=r"offsets has shape \(1,\), expected \(2,\)"):
        decode_values([ev(), ev()], 0, [1], vocab=VOCAB)
    with pytest.raises(EventContractError, match="binary or string Arrow array, got type int64"):
        decode_values(pa.array([1]), 0, [1], vocab=VOCAB)
    with pytest.raises(EventContractError, match="column lengths differ"):
        encode_values([1], [1, 2], ["rate_1"], [1])
    with pytest.raises(EventContractError, match="action 'a\"b'"):
        encode_values([1], [1], ['a"b'], [1])


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.sampled_from(VOCAB.actions),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            # stdlib json: orjson cannot write integers beyond 64 bits, and those must be refused too
            st.dictionaries(st.sampled_from(["user_id", "item_id", "action", "ts_ms", "x"]), json_scalars).map(
                lambda d: json.dumps(d).encode()
            ),
            st.builds(
                lambda u, i, a, t: encode_values([u], [i], [a], [t])[0],
                st.integers(0, INT64_MAX),
                st.integers(0, INT64_MAX),
                st.sampled_from(VOCAB.actions),
                st.integers(0, NOW),
            ),
        ),
        max_size=30,
    )
)
def test_any_bytes_split_into_valid_and_invalid_without_raising(values):
    valid, invalid = decode_values(values, 0, np.arange(len(values)), vocab=VOCAB, now_ms=NOW)
    assert valid.num_rows + invalid.num_rows == len(values)
    assert sorted(valid.column("offset").to_pylist() + invalid.column("offset").to_pylist()) == list(range(len(values)))
    for row in valid.to_pylist():
        obj = orjson.loads(values[row["offset"]])
        assert (obj["user_id"], obj["item_id"], obj["action"], obj["ts_ms"]) == (
            row["user_id"],
            row["item_id"],
            row["action"],
            row["ts_ms"],
        )
    assert set(invalid.column("kind").to_pylist()) <= set(INVALID_KINDS)
