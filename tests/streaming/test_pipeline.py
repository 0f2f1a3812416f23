"""The streaming job end to end, against the real broker, Ray and Feast (SQLite):

- correctness: ML-100K replayed through Kafka gives every user exactly their last `max_len` events
  (checked against pandas), and a full replay from offset 0 changes nothing;
- crash recovery: the CLI is SIGKILLed at every named crash point in turn, restarted each time;
  after every crash the state is a consistent prefix (no duplicates, no gaps), and the final state
  equals the crash-free one;
- bad input: every kind of invalid event lands in the DLQ with its reason, the valid ones around
  them are applied (broker DLQ topic and the log source's dead-letter files);
- broker restart: the job rides out its broker going away and coming back, then stops on SIGTERM;
- training feed: the job never waits for a trainer (it runs to idle and commits everything with
  nobody taking), and what it puts coalesces so that every event is a target exactly once, or
  counted as untrained when it rolled out of max_len first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from config.paths import REPO_ROOT
from features.sequence_batch import SequenceBatch
from features.sequences import SequenceStore, SequenceStoreConfig
from streaming.config import load_job_config
from streaming.pipeline import CRASH_POINTS, StreamJob
from streaming.recorded_log import events_to_log, write_log
from streaming.sequence_update import take_users
from streaming.sinks import OfflineStore
from tests.streaming.test_decode import BAD

ACTIONS = tuple(f"rate_{r}" for r in range(1, 6))
PY = sys.executable


# --- data and expectations ----------------------------------------------------------------------


def movielens(n: int | None = None) -> pd.DataFrame:
    from features.movielens import movielens_events

    events = movielens_events("ml-100k")
    return events if n is None else events.iloc[:n].reset_index(drop=True)


def log_frame(events: pd.DataFrame, partitions: int) -> tuple[pa.Table, pd.DataFrame]:
    """The recorded log of `events` and the events with their partition and offset."""
    table = events_to_log(events, topic="engagements", num_partitions=partitions)
    frame = events.assign(
        action=events["action"].map({a: i for i, a in enumerate(ACTIONS)}),
        partition=table.column("partition").to_numpy(),
        offset=table.column("offset").to_numpy(),
    )
    return table, frame


def expected_batch(frame: pd.DataFrame, max_len: int, users: np.ndarray) -> SequenceBatch:
    """Each user's last `max_len` events by (ts_ms, offset), computed directly with pandas."""
    tail = frame.sort_values(["user_id", "ts_ms", "offset"], kind="stable").groupby("user_id").tail(max_len)
    last = frame.loc[frame.groupby("user_id")["offset"].idxmax()].set_index("user_id")
    lengths = tail.groupby("user_id").size().reindex(users, fill_value=0).to_numpy()
    tail = tail.set_index("user_id").loc[users[lengths > 0]]
    return SequenceBatch(
        user_ids=users.astype(np.int64),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        item_ids=tail["item_id"].to_numpy(np.int64),
        actions=tail["action"].to_numpy(np.int64),
        timestamps_ms=tail["ts_ms"].to_numpy(np.int64),
        last_partition=last["partition"].reindex(users).fillna(-1).to_numpy(np.int64),
        last_offset=last["offset"].reindex(users).fillna(-1).to_numpy(np.int64),
    )


def assert_same(got: SequenceBatch, want: SequenceBatch, what: str) -> None:
    if got.equals(want):
        return
    for i in range(len(want)):
        g, w = got.sequence(i), want.sequence(i)
        if not (
            np.array_equal(g.item_ids, w.item_ids)
            and np.array_equal(g.timestamps_ms, w.timestamps_ms)
            and np.array_equal(g.actions, w.actions)
            and (g.last_partition, g.last_offset) == (w.last_partition, w.last_offset)
        ):
            raise AssertionError(f"{what}: user {w.user_id} has {g} but should have {w}")
    raise AssertionError(f"{what}: batches differ")


def feed_targets(examples: SequenceBatch) -> Counter:
    """The (user, item, ts_ms) of the events a feed batch marks new: each example's last `num_new`."""
    got: Counter = Counter()
    for seq in examples:
        start = len(seq.item_ids) - seq.num_new
        got.update(
            (seq.user_id, item, ts)
            for item, ts in zip(seq.item_ids[start:].tolist(), seq.timestamps_ms[start:].tolist())
        )
    return got


def frame_targets(frame: pd.DataFrame) -> Counter:
    return Counter(zip(frame["user_id"].tolist(), frame["item_id"].tolist(), frame["ts_ms"].tolist()))


def read_store(feast_dir: Path, max_len: int, users: np.ndarray) -> SequenceBatch:
    store = SequenceStore(SequenceStoreConfig(max_len=max_len, state_dir=feast_dir))
    try:
        return store.read_many(users.astype(np.int64))
    finally:
        store.close()


def assert_consistent_prefix(
    frame: pd.DataFrame, got: SequenceBatch, max_len: int, committed: dict[int, int], what: str
) -> None:
    """After a crash: each stored sequence holds exactly the user's events up to its watermark
    (in this time-ordered stream), and every committed event is applied."""
    by_user = {u: g for u, g in frame.sort_values(["user_id", "ts_ms", "offset"], kind="stable").groupby("user_id")}
    for s in got:
        events = by_user[s.user_id]
        if s.last_offset < 0:
            assert len(s.item_ids) == 0, f"{what}: user {s.user_id} has events but no watermark"
            upto = events.iloc[:0]
        else:
            upto = events[(events["partition"] == s.last_partition) & (events["offset"] <= s.last_offset)]
        assert s.item_ids.tolist() == upto["item_id"].tolist()[-max_len:], (
            f"{what}: user {s.user_id} (watermark {s.last_partition}/{s.last_offset}) holds {s.item_ids.tolist()}, "
            f"expected {upto['item_id'].tolist()[-max_len:]}"
        )
        p = int(events["partition"].iloc[0])
        below = events[events["offset"] < committed.get(p, 0)]
        if len(below):
            assert s.last_offset >= below["offset"].max(), (
                f"{what}: user {s.user_id} misses committed events (watermark {s.last_offset}, committed {committed})"
            )


def job_config(source: str, tmp_path: Path, *extra: str):
    return load_job_config(
        overrides=[
            f"source={source}",
            f"group_id=g-{tmp_path.name}",
            f"state_dir={tmp_path / 'job'}",
            f"feast.state_dir={tmp_path / 'feast'}",
            "interval_s=0.2",
            "progress_every_s=2",
            "stop_when_idle=true",
            *extra,
        ]
    )


def committed_offsets(bootstrap: str, topic: str, group: str, partitions: int) -> dict[int, int]:
    from streaming.offsets import KafkaGroupOffsets

    store = KafkaGroupOffsets(bootstrap, topic, group)
    try:
        return store.committed(list(range(partitions)))
    finally:
        store.close()


def read_dlq(bootstrap: str, topic: str, timeout_s: float = 30) -> list:
    """Every letter in the (single-partition) dead-letter topic."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    end = consumer.end_offsets([tp])[tp]
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < end and time.monotonic() < deadline:
        got += consumer.poll(timeout_ms=500).get(tp, [])
    consumer.close()
    assert len(got) == end, f"the DLQ holds {end} letters, {len(got)} were read"
    return got


def replay(table: pa.Table, path: Path, bootstrap: str, topic: str, partitions: int) -> None:
    from infra.recorded_log import replay_log

    write_log(table, path, num_partitions=partitions)
    replay_log(path, bootstrap=bootstrap, topic=topic, progress=False)


# --- correctness ---------------------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ml100k_through_kafka_matches_pandas(kafka_bootstrap, new_topic, ray_address, tmp_path):
    max_len = 50
    events = movielens()
    table, frame = log_frame(events, partitions=4)
    topic, dlq = new_topic(partitions=4), new_topic(partitions=1, prefix="dlq")
    replay(table, tmp_path / "ml.parquet", kafka_bootstrap, topic, 4)

    cfg = job_config(
        f"kafka://{kafka_bootstrap}/{topic}",
        tmp_path,
        f"max_len={max_len}",
        "max_batch_events=25000",
        f"dlq_topic={dlq}",
    )
    summary = StreamJob(cfg).run()
    assert summary.stopped_by == "idle"
    assert (summary.records, summary.valid_events, summary.invalid_events) == (100_000, 100_000, 0)
    assert summary.batches >= 4 and summary.skipped_events == 0
    # Every batch after the first was behind a full one, so it was read ahead (and applied right).
    assert summary.read_ahead_batches == summary.batches - 1
    # Users come back batch after batch: those were read from the job's write-through cache.
    assert summary.users_read_cached > 0
    ends = frame.groupby("partition")["offset"].max() + 1
    assert summary.committed == {int(p): int(o) for p, o in ends.items()}
    assert committed_offsets(kafka_bootstrap, topic, cfg.group_id, 4) == summary.committed

    users = np.unique(frame["user_id"].to_numpy())
    assert len(users) == 943
    want = expected_batch(frame, max_len, users)
    assert_same(read_store(tmp_path / "feast", max_len, users), want, "after ML-100K")
    offline = OfflineStore(tmp_path / "job" / "offline", actions=ACTIONS).read()
    assert offline.num_rows == 100_000
    assert offline.group_by(["partition", "offset"]).aggregate([]).num_rows == 100_000

    # A second job with a fresh consumer group reads everything again: the watermarks and the
    # offline store's file names make that replay change nothing.
    again = StreamJob(
        job_config(
            f"kafka://{kafka_bootstrap}/{topic}",
            tmp_path,
            f"max_len={max_len}",
            "max_batch_events=50000",
            f"dlq_topic={dlq}",
            f"group_id=g2-{tmp_path.name}",
            "read_ahead=false",
            "sequence_cache_events=0",
        )
    ).run()
    assert (again.skipped_events, again.applied_events, again.users_written, again.offline_rows) == (100_000, 0, 0, 0)
    assert again.batches >= 2 and again.read_ahead_batches == 0
    assert again.users_read_cached == 0 and again.users_read_feast > 943
    assert_same(read_store(tmp_path / "feast", max_len, users), want, "after a full replay")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("failure", ["mid_feast_write", "offline_append"])
def test_a_failed_batch_clears_the_cache_and_the_retry_is_exact(failure, ray_address, tmp_path, monkeypatch):
    """A batch that fails halfway through its Feast write (Feast ahead of the cache), or after
    the cache took the new sequences (the offline append fails), is retried: the final state and
    the training examples are exactly those of a run without the failure."""
    from features.sequence_cache import SequenceCache
    from streaming.training_feed import FeedConsumer

    max_len = 1000  # no truncation: every event is a training target exactly once
    table, frame = log_frame(movielens(12_000), partitions=2)
    write_log(table, tmp_path / "ml.parquet", num_partitions=2)
    calls, clears = {"n": 0}, {"n": 0}
    real_write, real_append, real_clear = SequenceStore.write_many, OfflineStore.append, SequenceCache.clear

    def flaky_write(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # the third batch: half its users land, then the connection drops
            real_write(self, take_users(batch, np.arange(len(batch) // 2)))
            raise ConnectionError("injected: the store went away mid-write")
        return real_write(self, batch)

    def flaky_append(self, events):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionError("injected: the offline store failed after the Feast write")
        return real_append(self, events)

    def counting_clear(self):
        clears["n"] += 1
        return real_clear(self)

    if failure == "mid_feast_write":
        monkeypatch.setattr(SequenceStore, "write_many", flaky_write)
    else:
        monkeypatch.setattr(OfflineStore, "append", flaky_append)
    monkeypatch.setattr(SequenceCache, "clear", counting_clear)
    feed_name = f"feed-{failure}"
    job = StreamJob(
        job_config(
            f"log://{tmp_path / 'ml.parquet'}",
            tmp_path,
            f"max_len={max_len}",
            "max_batch_events=2000",
            "retry_backoff_s=0",
            "feed.enabled=true",
            f"feed.actor_name={feed_name}",
        )
    )
    result = {}
    runner = threading.Thread(target=lambda: result.update(summary=job.run()), daemon=True)
    runner.start()
    consumer = FeedConsumer(actor_name=feed_name, namespace="hstu")
    targets: Counter = Counter()
    try:
        while True:  # until the job, idle and fully committed, closes the feed and it is drained
            took = consumer.take()
            targets.update(feed_targets(took.examples))
            if took.producer_done:
                break
            time.sleep(0.3)
    finally:
        kill_actor(feed_name)
    runner.join(timeout=60)
    summary = result["summary"]
    assert summary.stopped_by == "idle" and summary.retries == 1, summary
    assert clears["n"] == 2  # once at start, once for the failed attempt
    assert summary.users_read_cached > 0
    users = np.unique(frame["user_id"].to_numpy())
    assert_same(
        read_store(tmp_path / "feast", max_len, users),
        expected_batch(frame, max_len, users),
        f"after a failure ({failure}) and its retry",
    )
    assert targets == frame_targets(frame), "every event must reach the feed as a target exactly once"


# --- crash recovery -------------------------------------------------------------------------------
# --- crash recovery -------------------------------------------------------------------------------


def run_cli(args: list[str], env: dict, timeout_s: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [PY, "-m", "streaming.job", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    return proc


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sigkill_at_every_crash_point_then_restart(kafka_bootstrap, new_topic, ray_address, tmp_path):
    max_len, partitions = 8, 3
    events = movielens(6_000)
    table, frame = log_frame(events, partitions=partitions)
    # A few dead letters among the valid events, on partition 1.
    bad_values = [BAD["bad_json"], BAD["unknown_action"], BAD["null_value"]]
    topic, dlq = new_topic(partitions=partitions), new_topic(partitions=1, prefix="dlq")
    replay(table, tmp_path / "crash.parquet", kafka_bootstrap, topic, partitions)
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    bad_offsets = [producer.send(topic, key=b"x", value=v, partition=1).get(timeout=30).offset for v in bad_values]
    producer.close()

    group = f"g-{tmp_path.name}"
    env = {**os.environ, "HSTU_STATE_DIR": str(tmp_path / "state")}
    common = [
        "--source",
        f"kafka://{kafka_bootstrap}/{topic}",
        "--group",
        group,
        "--batch-size",
        "900",
        "--max-len",
        str(max_len),
        "--interval",
        "0.2",
        f"dlq_topic={dlq}",
        f"ray.address={ray_address}",
        f"feast.state_dir={tmp_path / 'feast'}",
        f"state_dir={tmp_path / 'job'}",
        "progress_every_s=30",
    ]
    users = np.unique(frame["user_id"].to_numpy())
    plan = [
        "after_read@2",
        "mid_feast_write@2",
        "after_feast_write@1",
        "after_sinks@2",
        "during_commit@1",
        "after_commit@1",
    ]
    assert {p.split("@")[0] for p in plan} == set(CRASH_POINTS)
    for point in plan:
        proc = run_cli([*common, "--crash-at", point], env)
        assert proc.returncode == -signal.SIGKILL, f"--crash-at {point}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert f"crash point {point.split('@')[0]} reached" in proc.stderr
        committed = committed_offsets(kafka_bootstrap, topic, group, partitions)
        assert_consistent_prefix(
            frame, read_store(tmp_path / "feast", max_len, users), max_len, committed, f"after SIGKILL at {point}"
        )

    proc = run_cli([*common, "--until-idle"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["stopped_by"] == "idle"
    ends = {p: int(frame[frame["partition"] == p]["offset"].max()) + 1 for p in range(partitions)}
    ends[1] = bad_offsets[-1] + 1
    assert committed_offsets(kafka_bootstrap, topic, group, partitions) == ends
    assert_same(
        read_store(tmp_path / "feast", max_len, users),
        expected_batch(frame, max_len, users),
        "after the crashes and the final run",
    )
    offline = OfflineStore(tmp_path / "job" / "offline", actions=ACTIONS).read()
    pairs = list(zip(offline.column("partition").to_pylist(), offline.column("offset").to_pylist()))
    assert sorted(pairs) == sorted(zip(frame["partition"], frame["offset"])), "offline store has duplicates or gaps"
    # Dead letters are at-least-once: each invalid record is there, none is missing.
    letters = read_dlq(kafka_bootstrap, dlq)
    assert {int(dict(r.headers)["source_offset"]) for r in letters} == set(bad_offsets)


# --- bad input ------------------------------------------------------------------------------------


def mixed_stream() -> tuple[list[tuple[bytes, bytes | None]], pd.DataFrame]:
    """(key, value) records of user 5..8, every invalid kind between valid events, and the valid ones."""
    records, valid = [], []
    now = int(time.time() * 1000)
    for i, bad in enumerate(BAD.values()):
        for j in range(3):
            u, item, ts = 5 + (i + j) % 4, 100 * i + j, now - 10_000 + 10 * i + j
            records.append(
                (b"%d" % u, b'{"user_id":%d,"item_id":%d,"action":"rate_%d","ts_ms":%d}' % (u, item, 1 + j, ts))
            )
            valid.append(
                {"user_id": u, "item_id": item, "action": j, "ts_ms": ts, "partition": 0, "offset": len(records) - 1}
            )
        records.append((b"5", bad))
    return records, pd.DataFrame(valid)


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["kafka", "log"])
def test_every_invalid_event_goes_to_the_dlq_with_its_reason(kind, kafka_bootstrap, new_topic, ray_address, tmp_path):
    records, valid = mixed_stream()
    if kind == "kafka":
        from kafka import KafkaProducer

        topic, dlq = new_topic(partitions=1), new_topic(partitions=1, prefix="dlq")
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=1 << 20)
        for key, value in records:
            producer.send(topic, key=key, value=value, partition=0)
        producer.flush()
        producer.close()
        source = f"kafka://{kafka_bootstrap}/{topic}"
    else:
        n = len(records)
        log = pa.table(
            {
                "topic": ["engagements"] * n,
                "partition": pa.array([0] * n, pa.int32()),
                "offset": pa.array(range(n), pa.int64()),
                "timestamp_ms": pa.array([0] * n, pa.int64()),
                "key": pa.array([k for k, _ in records], pa.binary()),
                "value": pa.array([v for _, v in records], pa.binary()),
            }
        )
        write_log(log, tmp_path / "mixed.parquet", num_partitions=1)
        source, dlq = f"log://{tmp_path / 'mixed.parquet'}", "unused"
    summary = StreamJob(job_config(source, tmp_path, "max_len=100", "max_batch_events=7", f"dlq_topic={dlq}")).run()
    assert (summary.valid_events, summary.invalid_events) == (len(valid), len(BAD))

    users = np.array([5, 6, 7, 8])
    assert_same(read_store(tmp_path / "feast", 100, users), expected_batch(valid, 100, users), "valid events")
    bad_offsets = [i * 4 + 3 for i in range(len(BAD))]
    if kind == "kafka":
        letters = read_dlq(kafka_bootstrap, dlq)
        got = [(int(dict(r.headers)["source_offset"]), dict(r.headers)["kind"].decode(), r.value) for r in letters]
        reasons = [dict(r.headers)["reason"].decode() for r in letters]
    else:
        table = pq_read_all(tmp_path / "job" / "dlq")
        got = list(
            zip(table.column("offset").to_pylist(), table.column("kind").to_pylist(), table.column("value").to_pylist())
        )
        reasons = table.column("reason").to_pylist()
    assert got == [(o, k, v) for o, (k, v) in zip(bad_offsets, BAD.items())]
    assert all(r.startswith(k + ": ") for r, k in zip(reasons, BAD))


def pq_read_all(folder: Path) -> pa.Table:
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))])
    return table.sort_by("offset")


# --- broker restart -------------------------------------------------------------------------------


def restart_broker(state: Path) -> None:
    """Stop the test's broker and start it again on the same data, port and config (a real restart:
    `broker.start` would format fresh storage)."""
    from infra.kafka import broker

    info = broker.read_info()
    os.killpg(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while broker.is_running(info) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not broker.is_running(info), "the broker did not stop"
    time.sleep(3)  # the job sees the broker gone
    root = state / "kafka"
    java = shutil.which("java")
    cmd = [
        java,
        "-Xmx512m",
        "-Xms256m",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={broker.LOG4J_CONFIG}",
        f"-Dkafka.logs.dir={root}",
        "-cp",
        broker.classpath(),
        "kafka.Kafka",
        str(root / "server.properties"),
    ]
    with open(root / "stdout.log", "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=root
        )
    (root / "broker.json").write_text(json.dumps({**info.__dict__, "pid": proc.pid}))
    deadline = time.monotonic() + 120
    while not broker.is_running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert broker.is_running(), "the broker did not come back"


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # the broker may be restarting
            pass
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_job_survives_a_broker_restart(ray_address, tmp_path, monkeypatch):
    from infra.kafka import broker

    max_len, partitions = 30, 2
    events = movielens(4_000)
    table, frame = log_frame(events, partitions=partitions)
    first, second = table.slice(0, 2_000), table.slice(2_000)
    monkeypatch.setenv("HSTU_STATE_DIR", str(tmp_path / "broker-state"))
    info = broker.start(broker.BrokerConfig(port=0))
    job = None
    try:
        bootstrap = info.bootstrap
        replay(first, tmp_path / "a.parquet", bootstrap, "engagements", partitions)
        env = {**os.environ, "HSTU_STATE_DIR": str(tmp_path / "job-state")}
        group = f"g-{tmp_path.name}"
        job = subprocess.Popen(
            [
                PY,
                "-m",
                "streaming.job",
                "--source",
                f"kafka://{bootstrap}/engagements",
                "--group",
                group,
                "--batch-size",
                "500",
                "--max-len",
                str(max_len),
                "--interval",
                "0.5",
                f"ray.address={ray_address}",
                f"feast.state_dir={tmp_path / 'feast'}",
                f"state_dir={tmp_path / 'job'}",
                "retry_backoff_s=1",
                "kafka.read_timeout_s=5",
                "progress_every_s=5",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / "job.log", "w"),
            text=True,
        )
        first_ends = {p: int(o) + 1 for p, o in frame.iloc[:2_000].groupby("partition")["offset"].max().items()}
        wait_for(
            lambda: committed_offsets(bootstrap, "engagements", group, partitions) == first_ends,
            300,
            "the first half to be committed",
        )
        restart_broker(tmp_path / "broker-state")
        replay(second, tmp_path / "b.parquet", bootstrap, "engagements", partitions)
        all_ends = {p: int(o) + 1 for p, o in frame.groupby("partition")["offset"].max().items()}
        wait_for(
            lambda: committed_offsets(bootstrap, "engagements", group, partitions) == all_ends,
            300,
            "everything to be committed after the restart",
        )
        job.send_signal(signal.SIGTERM)
        out, _ = job.communicate(timeout=120)
        log = (tmp_path / "job.log").read_text()
        assert job.returncode == 0, log[-3000:]
        summary = json.loads(out.strip().splitlines()[-1])
        # SIGTERM finished the batch in hand and exited cleanly. (Whether the outage surfaced as
        # retried batches or was absorbed by the Kafka client's reconnects depends on timing.)
        assert summary["stopped_by"] == "SIGTERM", log[-3000:]
        users = np.unique(frame["user_id"].to_numpy())
        assert_same(
            read_store(tmp_path / "feast", max_len, users),
            expected_batch(frame, max_len, users),
            "after the broker restart",
        )
    finally:
        if job is not None and job.poll() is None:
            job.kill()
            job.wait()
        broker.stop()


# --- training feed --------------------------------------------------------------------------------


def kill_actor(name: str) -> None:
    import ray

    try:
        ray.kill(ray.get_actor(name, namespace="hstu"))
    except ValueError:
        pass


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_features_never_wait_for_training_and_the_feed_coalesces(ray_address, tmp_path):
    from streaming.offsets import FileOffsets
    from streaming.training_feed import FeedConsumer

    events = movielens(3_000)
    table, frame = log_frame(events, partitions=2)
    write_log(table, tmp_path / "feed.parquet", num_partitions=2)
    ends = {int(p): int(o) + 1 for p, o in frame.groupby("partition")["offset"].max().items()}
    try:
        # Nobody takes from the feed while the job runs: it still applies everything and commits.
        summary = StreamJob(
            job_config(
                f"log://{tmp_path / 'feed.parquet'}",
                tmp_path,
                "max_len=1000",
                "max_batch_events=400",
                "feed.enabled=true",
                "feed.actor_name=feed-test",
            )
        ).run()
        assert summary.stopped_by == "idle" and summary.valid_events == 3_000 and summary.batches >= 8
        assert FileOffsets(tmp_path / "job" / "offsets.json", topic="engagements").committed([0, 1]) == ends
        took = FeedConsumer(actor_name="feed-test", namespace="hstu").take()
        # one example per user, every event a target exactly once, the whole log's offsets covered
        assert len(took.examples) == frame["user_id"].nunique() and took.untrained_events == 0
        assert feed_targets(took.examples) == frame_targets(frame)
        assert took.from_offsets == {0: 0, 1: 0} and took.to_offsets == ends and took.producer_done
        again = FeedConsumer(actor_name="feed-test", namespace="hstu").take()
        assert len(again.examples) == 0 and again.from_offsets == ends
    finally:
        kill_actor("feed-test")
    # With a short max_len, what rolls out before a take is counted, not lost: targets + untrained
    # cover every event.
    max_len = 5
    try:
        StreamJob(
            job_config(
                f"log://{tmp_path / 'feed.parquet'}",
                tmp_path / "short",
                f"max_len={max_len}",
                "max_batch_events=400",
                "feed.enabled=true",
                "feed.actor_name=feed-short",
            )
        ).run()
        took = FeedConsumer(actor_name="feed-short", namespace="hstu").take()
        assert took.num_events == frame.groupby("user_id").size().clip(upper=max_len).sum()
        assert took.num_events + took.untrained_events == 3_000
    finally:
        kill_actor("feed-short")
