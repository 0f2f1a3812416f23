"""Record and replay against the real broker: a replayed log records back identically."""

from __future__ import annotations

import subprocess
import sys
import uuid

import numpy as np
import pyarrow as pa
import pytest

from config.paths import REPO_ROOT
from infra.datasets.synthetic import SyntheticConfig, write_synthetic_log
from infra.recorded_log import _send_order, read_topic, record_topic, replay_log
from streaming.recorded_log import RecordedLogError, read_log, validate_log_table, write_log


@pytest.fixture(scope="module")
def log_12k(tmp_path_factory):
    path = tmp_path_factory.mktemp("logs") / "syn12k.parquet"
    write_synthetic_log(
        SyntheticConfig(num_users=400, num_items=2_000, num_events=12_000, num_days=5, seed=11), path, num_partitions=4
    )
    return path


def per_partition(table: pa.Table) -> dict[int, dict[str, list]]:
    out = {}
    part = table.column("partition").to_numpy()
    for p in np.unique(part):
        rows = table.take(pa.array(np.flatnonzero(part == p)))
        out[int(p)] = {c: rows.column(c).to_pylist() for c in ("offset", "timestamp_ms", "key", "value")}
    return out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "infra.recorded_log", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.kafka
def test_replay_then_record_gives_the_log_back(log_12k, kafka_bootstrap, new_topic, tmp_path):
    log = read_log(log_12k)
    assert len(log) >= 10_000 and all(c > 1_000 for c in log.partition_counts().values())
    topic = new_topic(partitions=4, prefix="roundtrip")
    assert replay_log(log, bootstrap=kafka_bootstrap, topic=topic, progress=False).count == 12_000
    res = record_topic(kafka_bootstrap, topic, tmp_path / "rec.parquet", progress=False)
    assert res.count == 12_000
    back = read_log(tmp_path / "rec.parquet")
    assert (back.topic, back.num_partitions) == (topic, 4)
    # Every key, value, timestamp and offset, in order, per partition (the topic was empty).
    assert per_partition(back.table) == per_partition(log.table)


@pytest.mark.kafka
def test_cli_round_trip_offset_range_and_partition_subset(log_12k, kafka_bootstrap, new_topic, tmp_path):
    topic = new_topic(partitions=4, prefix="cli")
    rep = run_cli("replay", "--bootstrap", kafka_bootstrap, "--log", str(log_12k), "--topic", topic)
    assert rep.returncode == 0, rep.stderr
    assert "replayed 12,000 records" in rep.stdout
    assert "records (" in rep.stderr  # the progress line with a rate
    out = tmp_path / "part.parquet"
    rec = run_cli(
        "record",
        "--bootstrap",
        kafka_bootstrap,
        "--topic",
        topic,
        "--out",
        str(out),
        "--partitions",
        "1,3",
        "--from-offset",
        "100",
        "--to-offset",
        "600",
    )
    assert rec.returncode == 0, rec.stderr
    assert "recorded 1,000 records" in rec.stdout
    got = per_partition(read_log(out).table)
    want = per_partition(read_log(log_12k).table)
    assert sorted(got) == [1, 3]
    for p in (1, 3):
        assert got[p]["offset"] == list(range(100, 600))
        for col in ("timestamp_ms", "key", "value"):
            assert got[p][col] == want[p][col][100:600]
    info = run_cli("info", str(out))
    assert info.returncode == 0 and "1,000 records, 4 partitions [0, 500, 0, 500]" in info.stdout


@pytest.mark.kafka
def test_paced_replay_keeps_partition_order_and_creates_the_topic(kafka_bootstrap, tmp_path):
    # Timestamps are not monotone within partition 0; pacing must still not reorder it.
    table = pa.table(
        {
            "topic": ["paced"] * 6,
            "partition": pa.array([0, 1, 0, 1, 0, 0], pa.int32()),
            "offset": [0, 0, 1, 1, 2, 3],
            "timestamp_ms": [1_000, 1_100, 900, 1_300, 1_250, 1_400],
            "key": [b"a", b"b", b"a", b"b", b"a", b"a"],
            "value": [b"v0", b"w0", b"v1", b"w1", b"v2", b"v3"],
        }
    )
    log = write_log(validate_log_table(table).table, tmp_path / "paced.parquet", num_partitions=2)
    topic = f"paced-{uuid.uuid4().hex[:12]}"
    try:
        res = replay_log(log, bootstrap=kafka_bootstrap, topic=topic, speedup=2.0, progress=False)
        assert res.count == 6
        back = read_topic(kafka_bootstrap, topic, progress=False)
        assert per_partition(back) == per_partition(log.table)
        with pytest.raises(RecordedLogError, match="has 2 partitions but the log has 3"):
            replay_log(
                write_log(table, tmp_path / "p3.parquet", num_partitions=3),
                bootstrap=kafka_bootstrap,
                topic=topic,
                progress=False,
            )
    finally:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        admin.delete_topics([topic], timeout_ms=15_000)
        admin.close()
    missing = f"missing-{uuid.uuid4().hex[:12]}"
    with pytest.raises(RecordedLogError, match=f"topic '{missing}' does not exist"):
        replay_log(log, bootstrap=kafka_bootstrap, topic=missing, create_topic=False, progress=False)
    with pytest.raises(RecordedLogError, match=f"topic '{missing}' does not exist"):
        read_topic(kafka_bootstrap, missing, progress=False, timeout_s=1)
    bad = run_cli(
        "replay",
        "--bootstrap",
        kafka_bootstrap,
        "--log",
        str(tmp_path / "paced.parquet"),
        "--topic",
        missing,
        "--no-create",
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_paced_schedule_is_scaled_and_never_reorders_a_partition():
    table = pa.table(
        {
            "topic": ["t"] * 5,
            "partition": pa.array([0, 1, 0, 0, 1], pa.int32()),
            "offset": [0, 0, 1, 2, 1],
            "timestamp_ms": [5_000, 6_000, 4_000, 9_000, 7_000],
            "key": [b"k"] * 5,
            "value": [b"v"] * 5,
        }
    )
    log = validate_log_table(table)
    order, due = _send_order(log, 1000.0)
    assert order.tolist() == [0, 2, 1, 4, 3]  # row 2 (ts 4000) waits behind row 0 of its partition
    assert due.tolist() == [0.0, 0.0, 0.001, 0.002, 0.004]
    order, due = _send_order(log, None)
    assert order.tolist() == [0, 1, 2, 3, 4] and due is None
    with pytest.raises(RecordedLogError, match=r"speedup \(0\.0\) must be > 0"):
        replay_log(log, bootstrap="127.0.0.1:1", speedup=0.0)


def test_info_cli_refuses_a_bad_file(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"junk")
    res = run_cli("info", str(tmp_path / "bad.parquet"))
    assert res.returncode == 2
    assert "not a readable Parquet file" in res.stderr
