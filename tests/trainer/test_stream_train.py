"""trainer/stream_train.py against the real broker, Ray, Ray Train and Feast (SQLite), bounded:

- learning: the ML-100K log through the broker; versions are published and the prequential
  HR@10 rises over the run;
- a training worker SIGKILLed mid-run: Ray Train replaces it, the run finishes, and every event
  is trained at least once or counted untrained (checked against the log of trained events);
- a run whose checkpoints were all lost re-reads from where it began, also when nothing new comes;
- the streaming job SIGKILLed mid-run: it restarts, the features are exact, training resumes;
- a stop (SIGTERM's path) in a long take ends it after the step in hand; the next run re-reads it;
- two workers end with byte-identical models and tables after admissions and evictions;
- the CLI: a bad config exits 2 with the key; `--until-idle` on a recorded log exits 0;
- (`ray job submit` against a `ray start --head` cluster: tests/infra/test_two_nodes.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from config.loader import ConfigError
from config.paths import REPO_ROOT
from features.movielens import movielens_events
from features.sequence_batch import SequenceBatch
from features.sequences import SequenceStore, SequenceStoreConfig
from streaming.recorded_log import events_to_log, write_log
from trainer.registry import Registry
from trainer.stream import (
    STREAMING_ACTOR,
    StreamTrainConfig,
    StreamTrainer,
    load_stream_config,
    merge_examples,
    recovery_examples,
    training_window,
)

PY = sys.executable
SMALL = [
    "model.dim=16",
    "model.qk_dim=16",
    "model.v_dim=16",
    "model.max_seq_len=50",
    "model.num_time_buckets=32",
    "model.dropout=0.1",
    "model.input_dropout=0.1",
    "table.dim=16",
    "table.capacity=5000",
    "loss.num_negatives=32",
    "loss.temperature=0.1",
    "train.batch_size=64",
    "train.lr=3e-3",
    "train.cpus_per_worker=0.5",
    "train.context_events=30",
    "streaming.max_len=50",
    "streaming.interval_s=0.3",
    "streaming.progress_every_s=5",
    "train.progress_every_s=5",
    "eval.max_events=500",
    "ray_num_cpus=4",
]


def ml100k_log(path: Path, n: int, partitions: int = 2) -> tuple[Path, object]:
    """The first `n` ML-100K events in time order as a recorded log; returns (path, events)."""
    events = movielens_events("ml-100k").iloc[:n].reset_index(drop=True)
    write_log(events_to_log(events, topic="engagements", num_partitions=partitions), path, num_partitions=partitions)
    return path, events


def config_for(tmp_path: Path, source: str, *extra: str) -> StreamTrainConfig:
    return load_stream_config(
        REPO_ROOT / "trainer" / "configs" / "stream.yaml",
        [
            *SMALL,
            f"name={tmp_path.name}",
            f"storage_dir={tmp_path / 'run'}",
            f"publish.registry={tmp_path / 'registry'}",
            f"streaming.source={source}",
            f"streaming.group_id=g-{tmp_path.name}",
            f"streaming.state_dir={tmp_path / 'job'}",
            f"streaming.feast.state_dir={tmp_path / 'feast'}",
            f"streaming.feed.actor_name=feed-{tmp_path.name}",
            f"train.trained_log={tmp_path / 'trained'}",
            "stop.until_idle=true",
            *extra,
        ],
    )


def run_in_thread(config: StreamTrainConfig) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target() -> None:
        try:
            out["summary"] = StreamTrainer(config).run()
        except BaseException as exc:  # surfaced by the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def trained_events(folder: Path) -> Counter:
    """(user, item, ts_ms) of every event any rank trained on, with multiplicity."""
    got: Counter = Counter()
    for path in folder.glob("*.i64"):
        rows = np.fromfile(path, dtype=np.int64).reshape(-1, 3)
        got.update(map(tuple, rows.tolist()))
    return got


def assert_every_event_trained_or_counted(events, tmp_path: Path, summary: dict) -> None:
    produced = Counter(zip(events.user_id.tolist(), events.item_id.tolist(), events.ts_ms.tolist()))
    trained = trained_events(tmp_path / "trained")
    missing = sum((produced - trained).values())
    assert missing <= summary["untrained_events"], (missing, summary)
    assert summary["events_trained"] + summary["untrained_events"] >= len(events)


def prequential(tmp_path: Path) -> list[dict]:
    path = tmp_path / "run" / "prequential.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def kill_named(name: str) -> None:
    import ray

    try:
        ray.kill(ray.get_actor(name, namespace="hstu"))
    except ValueError:
        pass


# ------------------------------------------------------------------------------ unit level
def test_config_checks_conflicts_before_any_work() -> None:
    path = REPO_ROOT / "trainer" / "configs" / "stream.yaml"
    assert load_stream_config(path).model.layout == "interleaved"
    with pytest.raises(ConfigError, match=r"table.dim \(50\) must equal model.dim \(16\)"):
        load_stream_config(path, ["model.dim=16"])
    with pytest.raises(ConfigError, match=r"streaming.max_len \(300\) must be at most model.max_seq_len \+ 1"):
        load_stream_config(path, ["streaming.max_len=300"])
    with pytest.raises(ConfigError, match="encoder 'sasrec' supports layout 'items' only"):
        load_stream_config(path, ["model.encoder=sasrec"])
    with pytest.raises(ConfigError, match=r"unknown key 'train.wrokers'"):
        load_stream_config(path, ["train.wrokers=2"])


def test_training_window_keeps_new_events_and_bounded_context() -> None:
    examples = SequenceBatch.from_sequences(
        user_ids=[1, 2],
        item_ids=[list(range(10)), [7, 8]],
        actions=[[0] * 10, [0, 0]],
        timestamps_ms=[list(range(10)), [1, 2]],
        num_new=[3, 2],
    )
    cut = training_window(examples, context_events=4, max_events=6)
    assert cut.sequence(0).item_ids.tolist() == [3, 4, 5, 6, 7, 8, 9][-6:] and cut.num_new.tolist() == [3, 2]
    whole = training_window(examples, context_events=None, max_events=100)
    assert whole.equals(examples)
    merged = merge_examples(cut, examples)
    assert (
        merged.user_ids.tolist() == [1, 2] and merged.sequence(0).item_ids.tolist() == cut.sequence(0).item_ids.tolist()
    )


def test_recovery_reads_the_gap_and_takes_feast_sequences_up_to_their_watermarks(
    tmp_path, ray_address, monkeypatch
) -> None:
    """What a restarted trainer re-reads: events from its offsets on that Feast holds; also when
    the job applied more while the trainer read (Feast's watermarks past the end it read)."""
    import streaming.sources
    from streaming.pipeline import StreamJob

    log_path, events = ml100k_log(tmp_path / "ml.parquet", 2_000)
    config = config_for(tmp_path, f"log://{log_path}", "streaming.max_len=1000", "model.max_seq_len=1000")
    job = config.job_config()
    StreamJob(job).run()  # everything applied to Feast, nothing trained
    kill_named(job.feed.actor_name)
    store = SequenceStore(SequenceStoreConfig(max_len=1000, state_dir=tmp_path / "feast"))
    table = events_to_log(events, topic="engagements", num_partitions=2)  # rows in the events' order
    partition, offset = table["partition"].to_numpy(), table["offset"].to_numpy()
    start = {p: int(np.sort(offset[partition == p])[300]) for p in (0, 1)}
    examples, reread, untrained = recovery_examples(job, start, store=store)
    after = np.array([o >= start[p] for p, o in zip(partition.tolist(), offset.tolist())])
    assert reread == int(after.sum()) == 2_000 - 2 * 300 and untrained == 0
    targets: Counter = Counter()
    for seq in examples:
        first = len(seq.item_ids) - seq.num_new
        targets.update(
            zip([seq.user_id] * seq.num_new, seq.item_ids[first:].tolist(), seq.timestamps_ms[first:].tolist())
        )
    late = events[after]
    assert targets == Counter(zip(late.user_id.tolist(), late.item_id.tolist(), late.ts_ms.tolist()))

    # The source's end as it was before the job applied its last events: a read to "the end" stops
    # short of Feast's watermarks. The sequences' trailing events are then newer than the events
    # read; recovery reads on to the watermarks instead of taking those for the owed ones.
    read = streaming.sources.read_valid_events
    cut = {p: int(np.sort(offset[partition == p])[400]) for p in (0, 1)}

    def stale_end(config, begin, end=None, **kw):
        return read(config, begin, end if end is not None else cut, **kw)

    monkeypatch.setattr(streaming.sources, "read_valid_events", stale_end)
    examples, reread, untrained = recovery_examples(job, start, store=store)
    targets = Counter()
    for seq in examples:
        first = len(seq.item_ids) - seq.num_new
        targets.update(
            zip([seq.user_id] * seq.num_new, seq.item_ids[first:].tolist(), seq.timestamps_ms[first:].tolist())
        )
    touched = np.isin(events.user_id, events[after & (offset < np.where(partition == 0, cut[0], cut[1]))].user_id)
    owed = events[after & touched]  # every event from `start` on of the users read, up to their watermarks
    assert reread == len(owed) and untrained == 0
    assert targets == Counter(zip(owed.user_id.tolist(), owed.item_id.tolist(), owed.ts_ms.tolist()))


# ------------------------------------------------------------------------- the whole job
@pytest.mark.slow
@pytest.mark.kafka
@pytest.mark.timeout(600)
def test_learning_through_the_broker_publishes_versions_and_prequential_hr_rises(
    tmp_path, ray_address, kafka_bootstrap, new_topic
) -> None:
    from infra.recorded_log import replay_log

    log_path, events = ml100k_log(tmp_path / "ml.parquet", 30_000, partitions=2)
    topic = new_topic(partitions=2)
    replay_log(log_path, bootstrap=kafka_bootstrap, topic=topic)
    config = config_for(
        tmp_path,
        f"kafka://{kafka_bootstrap}/{topic}",
        "streaming.max_events_per_s=250",  # 120 s of stream: Ray Train takes up to ~70 s to start in CI
        "publish.every_s=10",
        "train.checkpoint_every_s=15",
        f"streaming.dlq_topic={topic}.dlq",
    )
    try:
        summary = StreamTrainer(config).run()
    finally:
        kill_named(config.streaming.feed.actor_name)
    # the trainer starts after the job (Ray Train takes tens of seconds here): its first take is
    # coalesced, and what rolled out of max_len (50) is counted, not lost
    assert summary["state"] == "idle" and summary["events_trained"] > 0.4 * len(events)
    assert summary["events_trained"] + summary["untrained_events"] >= len(events)
    registry = Registry(tmp_path / "registry")
    assert registry.latest() is not None and len(registry.versions()) >= 2
    latest = registry.load()
    assert latest.manifest.offsets == {int(p): o for p, o in summary["trained"].items()}
    assert "model_hr@10" in latest.manifest.metrics and latest.manifest.info["trainer"] == "stream"
    records = [r for r in prequential(tmp_path) if r["model_events"] >= 50]
    assert len(records) >= 6, records
    third = len(records) // 3
    early = np.mean([r["model_hr@10"] for r in records[:third]])
    late = np.mean([r["model_hr@10"] for r in records[-third:]])
    assert late > early + 0.01, (early, late)
    assert (tmp_path / "run" / "prequential.png").is_file()
    assert_every_event_trained_or_counted(events, tmp_path, summary)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_training_worker_is_replaced_and_no_event_is_lost(tmp_path, ray_address) -> None:
    # 120 s of stream: training must be under way before it ends (the worker group takes 20-70 s
    # to start here), so that the kill lands mid-run
    log_path, events = ml100k_log(tmp_path / "ml.parquet", 16_000)
    config = config_for(
        tmp_path,
        f"log://{log_path}",
        "streaming.max_events_per_s=130",
        "train.checkpoint_every_steps=1000",
        "train.checkpoint_every_s=8",
    )
    thread, out = run_in_thread(config)
    try:
        wait_for(lambda: len(prequential(tmp_path)) >= 2, 300, "two takes trained")
        (victim,) = [int(p.stem.split("-")[1]) for p in (tmp_path / "trained").glob("rank0-*.i64")]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(list((tmp_path / "trained").glob("rank0-*.i64"))) == 2, 300, "a new rank-0 worker")
        thread.join(480)
    finally:
        kill_named(config.streaming.feed.actor_name)
    assert "error" not in out, out.get("error")
    summary = out["summary"]
    assert summary["state"] == "idle"
    assert_every_event_trained_or_counted(events, tmp_path, summary)


@pytest.mark.slow
@pytest.mark.kafka
@pytest.mark.timeout(600)
def test_a_run_whose_checkpoints_were_all_lost_re_reads_from_where_it_began(
    tmp_path, ray_address, kafka_bootstrap, new_topic
) -> None:
    """Ray Train registers a checkpoint only once its controller takes the report: a worker killed
    right after its first take may leave none. The run's start offsets (written before training
    anything) bring the next worker group back to the beginning, not to where the feed is now.

    Its first take holds the whole topic (the job applies it while Ray Train starts), trained two
    users a step: versions are published between its steps, not only after it, each saying the
    offsets it trained to for certain (where the take began)."""
    import shutil

    from infra.recorded_log import replay_log

    log_path, events = ml100k_log(tmp_path / "ml.parquet", 2_500)
    topic = new_topic(partitions=2)
    replay_log(log_path, bootstrap=kafka_bootstrap, topic=topic)
    config = config_for(
        tmp_path,
        f"kafka://{kafka_bootstrap}/{topic}",
        f"streaming.dlq_topic={topic}.dlq",
        "train.batch_size=2",
        "publish.every_s=0.1",
        "publish.keep=1000",
    )
    first = StreamTrainer(config).run()
    kill_named(config.streaming.feed.actor_name)
    assert first["events_trained"] + first["untrained_events"] == len(events)
    assert json.loads((tmp_path / "run" / "start_offsets.json").read_text()) == {"0": 0, "1": 0}
    registry = Registry(tmp_path / "registry")
    manifests = [registry.manifest(v) for v in registry.versions()]
    assert manifests[0].info["within_take"] and manifests[0].info["takes"] == 0, manifests[0].info
    assert manifests[0].offsets == {0: 0, 1: 0}  # published inside the first take: nothing certain yet
    assert manifests[-1].offsets == {int(p): o for p, o in first["trained"].items()}
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if no report had been registered
    shutil.rmtree(tmp_path / "trained")
    # Nothing new: the job resumes at its committed 2,500 and never puts into the (new) feed. The
    # trainer must not wait for a put, nor stop idle, before re-reading what it owes.
    again = StreamTrainer(config).run()
    kill_named(config.streaming.feed.actor_name)
    assert again["state"] == "idle"
    assert again["recovered_events"] >= len(events)  # re-read from the start offsets, not from 2,500
    assert again["trained"] == first["trained"], (again["trained"], first["trained"])
    assert_every_event_trained_or_counted(events, tmp_path, again)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_streaming_job_restarts_features_stay_exact_and_training_resumes(tmp_path, ray_address) -> None:
    import ray

    from tests.streaming.test_pipeline import assert_same, expected_batch, log_frame

    log_path, events = ml100k_log(tmp_path / "ml.parquet", 20_000)
    # 120 s of stream, so that three takes come before it ends (Ray Train takes up to ~70 s to start)
    config = config_for(tmp_path, f"log://{log_path}", "streaming.max_events_per_s=170")
    thread, out = run_in_thread(config)
    try:
        wait_for(lambda: len(prequential(tmp_path)) >= 3, 300, "three takes trained")
        actor = ray.get_actor(STREAMING_ACTOR, namespace="hstu")
        pid = ray.get(actor.pid.remote())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _pid_of(actor) not in (None, pid), 120, "the streaming job to restart")
        thread.join(480)
    finally:
        kill_named(config.streaming.feed.actor_name)
    assert "error" not in out, out.get("error")
    summary = out["summary"]
    assert summary["state"] == "idle"
    _, frame = log_frame(events, partitions=2)
    users = np.unique(frame["user_id"].to_numpy())
    store = SequenceStore(SequenceStoreConfig(max_len=50, state_dir=tmp_path / "feast"))
    assert_same(store.read_many(users), expected_batch(frame, 50, users), "after the streaming job's restart")
    assert_every_event_trained_or_counted(events, tmp_path, summary)


def _pid_of(actor) -> int | None:
    import ray

    try:
        return ray.get(actor.pid.remote(), timeout=5)
    except Exception:
        return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_stop_ends_a_take_after_the_step_in_hand_and_the_rest_is_trained_on_resume(tmp_path, ray_address) -> None:
    """SIGTERM's path (the control actor's stop) during a long take: the run stops after the step
    in hand, not after the take; its checkpoint and last version keep the offsets where the take
    began, and the next run re-reads the take (its feed is new and nothing new comes)."""
    log_path, events = ml100k_log(tmp_path / "ml.parquet", 20_000)  # 215 users: one step each
    config = config_for(tmp_path, f"log://{log_path}", "train.batch_size=1", "stop.until_idle=false")
    trainer = StreamTrainer(config)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(summary=trainer.run()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: sum(p.stat().st_size for p in (tmp_path / "trained").glob("*.i64")) > 0, 300, "the first step")
        trainer.request_stop("test")
        thread.join(300)
    finally:
        kill_named(config.streaming.feed.actor_name)
    first = out["summary"]
    assert first["state"] == "test" and 0 < first["steps"] < 215, first
    latest = Registry(tmp_path / "registry").load()
    assert latest.manifest.info["within_take"], latest.manifest.info  # stopped inside the take
    assert latest.manifest.offsets == {int(p): o for p, o in first["trained"].items()}
    assert sum(first["trained"].values()) < len(events)  # where the take began: the take is owed

    again = StreamTrainer(dataclasses.replace(config, stop=dataclasses.replace(config.stop, until_idle=True))).run()
    kill_named(config.streaming.feed.actor_name)
    assert again["state"] == "idle" and again["recovered_events"] > 0
    assert sum(again["trained"].values()) == len(events)
    assert_every_event_trained_or_counted(events, tmp_path, again)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_keep_identical_tables_through_admissions_and_evictions(tmp_path, ray_address) -> None:
    log_path, events = ml100k_log(tmp_path / "ml.parquet", 12_000)
    config = config_for(
        tmp_path,
        f"log://{log_path}",
        "train.workers=2",
        "table.capacity=300",
        "streaming.max_events_per_s=600",
        "train.checkpoint_every_s=5",
    )
    try:
        summary = StreamTrainer(config).run()
    finally:
        kill_named(config.streaming.feed.actor_name)
    assert summary["state"] == "idle"
    # every checkpoint all-gathers the ranks' model digests (table id map included) and refuses to
    # go on if they differ; the last one is in the summary
    assert len(summary["model_digests"]) == 2 and len(set(summary["model_digests"])) == 1
    assert summary["table"]["evicted"] > 0 and summary["table"]["admitted"] > 300
    trained = trained_events(tmp_path / "trained")
    assert len(list((tmp_path / "trained").glob("rank1-*.i64"))) == 1 and sum(trained.values()) > 0


# ------------------------------------------------------------------------------------ CLI
def test_cli_refuses_a_bad_config_with_the_key() -> None:
    out = subprocess.run(
        [PY, "trainer/stream_train.py", "train.batch_size=0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "train.batch_size (0) must be >= 1" in out.stderr


# `ray job submit --working-dir . -- python trainer/stream_train.py ...` against `ray start --head`:
# tests/infra/test_two_nodes.py (a head and a second node; the job's workers land on both).
