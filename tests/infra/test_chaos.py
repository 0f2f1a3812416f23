"""Chaos over the whole loop (infra/loop.py): a broker of the test's own, a `ray start --head`
cluster, `trainer/stream_train.py` (streaming job -> Feast, Ray Train, registry), the Serve app
with 2 replicas, a producer at a steady rate, and clients posting `/rank` all the time.

In turn: the streaming job's process is SIGKILLed; a training worker is SIGKILLed; the broker is
restarted (on its data, port and config); a Serve replica is SIGKILLed; the Serve replicas are
stopped gracefully (a redeploy: Serve's controller takes each out of routing, lets its requests
finish and replaces it). After each fault the loop recovers on its own: the part comes back,
training progresses past where it was, `/rank` answers. At the end, with the producer stopped
and everything caught up:

- serving: no non-2xx answer at all, through the graceful replica stop included; at the replica
  SIGKILL, at most the requests the killed process held (one per client): Serve retries a
  request only while no replica has accepted it (ray/serve/_private/router.py), so what was in
  flight on the dead process gets a 500;
- features: Feast's sequences equal a pandas computation over everything in the topic;
- training: it resumed from its own checkpointed offsets, trained up to the topic's end, and
  every event in the topic was trained at least once or counted untrained;
- model versions: each client saw them in non-decreasing order.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from features.movielens import movielens_events
from features.sequences import SequenceStore, SequenceStoreConfig
from infra.loop import Loop, add_arguments, topic_size
from infra.producer import produce_log
from infra.recorded_log import read_topic
from streaming.recorded_log import events_to_log
from tests.infra.test_e2e import SMALL
from tests.streaming.test_pipeline import assert_same, expected_batch, restart_broker
from tests.trainer.test_stream_train import trained_events

TOPIC = "chaos"
PARTITIONS = 2
MAX_LEN = 50  # streaming.max_len in SMALL
ACTIONS = tuple(f"rate_{r}" for r in range(1, 6))
CANDIDATES = [50, 100, 181, 258, 286, 288, 294, 300, 1, 121, 174, 127, 98, 56, 7, 117, 172, 222, 313, 1682]
CLIENTS = 3
RECOVERY_S = 300  # each fault's bound on recovering
REPLICA = "ray::ServeReplica:hstu:Recommender"
T_START = time.time()


def loop_args(*overrides: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # live events at 15/s from ML-100K's users and items; the producer stops itself after 30 min
    args = parser.parse_args(["--rate", "15", "--minutes", "30", "--publish-every", "8", "--ray-cpus", "6"])
    args.topic = TOPIC
    args.overrides = list(overrides)
    return args


# ------------------------------------------------------------------------------ serving load
def rank(url: str, user: int) -> tuple[int, int | None, str]:
    """(HTTP status or 0 for no answer, the answering version, the error's body) of one /rank."""
    body = json.dumps({"user_id": user, "candidates": CANDIDATES, "top_k": 5}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())["version"], ""
    except urllib.error.HTTPError as error:
        return error.code, None, error.read().decode(errors="replace")[:300]
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        return 0, None, repr(error)


@dataclass
class Client:
    """One client posting /rank in a loop: (sent, answered, HTTP status or 0 for no answer, version,
    error) per request."""

    seed: int
    answers: list[tuple[float, float, int, int | None, str]] = field(default_factory=list)

    def run(self, url: str, stop: threading.Event) -> None:
        rng = random.Random(self.seed)
        while not stop.is_set():
            sent = time.time()
            status, version, error = rank(url, rng.randint(1, 943))
            self.answers.append((sent, time.time(), status, version, error))
            stop.wait(0.05)

    def failures(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, int, str]]:
        """Non-2xx answers to requests in flight at some moment of [since, until] (a request sent
        before a fault and answered after it was in flight through it), by the time they were sent."""
        return [
            (round(sent - T_START, 1), s, e)
            for sent, answered, s, _, e in self.answers
            if sent <= until and answered >= since and not 200 <= s < 300
        ]

    def outside(self, since: float, until: float) -> list[tuple[float, int, str]]:
        """Non-2xx answers to requests not in flight at any moment of [since, until]."""
        return [
            (round(sent - T_START, 1), s, e)
            for sent, answered, s, _, e in self.answers
            if not (sent <= until and answered >= since) and not 200 <= s < 300
        ]

    def answered_since(self, since: float) -> bool:
        return any(sent > since and 200 <= s < 300 for sent, _, s, _, _ in self.answers)


# ------------------------------------------------------------------------------ the parts
def cluster_processes(loop: Loop, title: str) -> list[psutil.Process]:
    """This cluster's processes whose title (Ray sets `ray::<Class>[.<method>]`) starts with
    `title`: descendants of the processes started with the cluster's temp folder (other Ray
    instances of this machine are left alone)."""
    mark = str(loop.cluster.temp)
    roots = [p for p in psutil.process_iter(["cmdline"]) if mark in " ".join(p.info["cmdline"] or [])]
    found = {}
    for root in roots:
        try:
            for proc in root.children(recursive=True):
                cmdline = proc.cmdline()
                if cmdline and cmdline[0].startswith(title) and proc.status() != psutil.STATUS_ZOMBIE:
                    found[proc.pid] = proc
        except psutil.Error:
            continue
    return list(found.values())


def pids(loop: Loop, title: str) -> set[int]:
    return {p.pid for p in cluster_processes(loop, title)}


def trained_now(loop: Loop) -> int:
    record = loop.progress()
    return record["events_trained"] if record else 0


def progress_after(loop: Loop, since: float) -> dict | None:
    record = loop.progress()
    return record if record and record["time"] > since else None


SAID: list[tuple[float, str]] = []  # (time since T_START, message): where a failure falls


def say(message: str) -> None:
    SAID.append((time.time() - T_START, message))
    print(f"[chaos {time.time() - T_START:6.1f} s] {message}", flush=True)


def during(failures: list[tuple[float, int, str]]) -> list[str]:
    """Each failure with what the test had last said before it (the phase it fell in)."""
    out = []
    for t, status, error in failures:
        said = [(at, m) for at, m in SAID if at <= t]
        phase = f"{t - said[-1][0]:.1f} s after {said[-1][1]!r}" if said else "before anything"
        out.append(f"{t} s, {status} {error!r}: {phase}")
    return out


def wait_for(what, timeout_s: float, message: str, every_s: float = 1.0):
    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        value = what()
        if value:
            say(f"{message}: after {time.monotonic() - started:.0f} s")
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {message}")


def loop_topic_size(loop: Loop) -> int:
    try:
        return topic_size(loop.bootstrap, TOPIC)
    except Exception:  # the broker is not back yet
        return -1


def topic_frame(bootstrap: str) -> pd.DataFrame:
    """Every event in the topic with its partition and offset (all of them are valid)."""
    table = read_topic(bootstrap, TOPIC, progress=False)
    rows = [json.loads(v) for v in table.column("value").to_pylist()]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "action", "ts_ms"])
    return frame.assign(
        action=frame["action"].map({a: i for i, a in enumerate(ACTIONS)}).astype(np.int64),
        partition=table.column("partition").to_numpy().astype(np.int64),
        offset=table.column("offset").to_numpy().astype(np.int64),
    )


def serve_log_errors(loop: Loop, keep: Path) -> list[str]:
    """Copy this cluster's Serve logs to `keep` (the cluster's temp folder goes with it) and return
    their error lines and non-2xx access lines: what a failing run prints to say why."""
    logs = loop.cluster.temp / "session_latest" / "logs" / "serve"
    if not logs.is_dir():
        return [f"no Serve logs at {logs}"]
    shutil.copytree(logs, keep, dirs_exist_ok=True)
    marks = re.compile(r"ERROR|Traceback|Exception|Error:| 5\d\d |died|unavailable", re.IGNORECASE)
    lines = []
    for path in sorted(keep.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if marks.search(line):
                lines.append(f"{path.name}: {line[:400]}")
    return lines


def trainer_summary(log_path: Path) -> dict:
    """The run's summary: the JSON object the trainer prints last (progress bars may precede it
    on its line)."""
    text = log_path.read_text(errors="replace")
    at = text.rfind('{"state": ')
    if at < 0:
        raise AssertionError(f"the trainer printed no summary: see {log_path}")
    return json.JSONDecoder().raw_decode(text, at)[0]


@pytest.mark.slow
@pytest.mark.kafka
@pytest.mark.timeout(1200)
def test_the_loop_recovers_from_each_fault_under_serving_load(tmp_path, monkeypatch):
    from infra.kafka import broker

    # The broker, the cluster, the trainer and Serve all keep their state under the test's folder;
    # the broker is the test's own (restarting the session's broker would disturb other tests).
    state = tmp_path / "state"
    monkeypatch.setenv("HSTU_STATE_DIR", str(state))
    info = broker.start(
        broker.BrokerConfig(
            port=0,
            topics=(
                broker.TopicSpec(name=TOPIC, partitions=PARTITIONS),
                broker.TopicSpec(name=f"{TOPIC}.dlq", partitions=1),
            ),
        )
    )
    bootstrap = info.bootstrap
    events = movielens_events("ml-100k").iloc[:5_000].reset_index(drop=True)
    produce_log(events_to_log(events, topic=TOPIC, num_partitions=PARTITIONS), bootstrap, TOPIC, PARTITIONS)
    trained_dir = tmp_path / "trained"
    loop = Loop(
        loop_args(
            *SMALL,
            f"storage_dir={tmp_path / 'run'}",
            f"publish.registry={tmp_path / 'registry'}",
            f"streaming.state_dir={tmp_path / 'job'}",
            f"streaming.feast.state_dir={tmp_path / 'feast'}",
            "streaming.group_id=chaos",
            f"streaming.dlq_topic={TOPIC}.dlq",
            "streaming.feed.actor_name=feed-chaos",
            "streaming.freshness_clock=log",
            "streaming.retry_backoff_s=1",
            "streaming.kafka.read_timeout_s=5",
            f"train.trained_log={trained_dir}",
            "train.checkpoint_every_s=10",
        ),
        bootstrap,
    )
    loop.replicas = 2
    stop_clients = threading.Event()
    clients = [Client(seed=i) for i in range(CLIENTS)]
    threads: list[threading.Thread] = []
    timeline: dict[str, float] = {}
    windows: dict[str, tuple[float, float]] = {}
    stopped: dict = {}
    try:
        say("broker up, log produced")
        loop.start_cluster()
        loop.start_trainer()
        say("cluster up, trainer started")
        loop.start_serving()
        say("serving deployed")
        url = f"http://127.0.0.1:{loop.serve_port}/rank"
        # both replicas have loaded a version: 20 answers in a row (Serve spreads them over both)
        wait_for(
            lambda: all(rank(url, 1)[0] == 200 for _ in range(20)),
            300,
            f"a first version to answer /rank (see {loop.trainer_log})",
        )
        assert len(pids(loop, REPLICA)) == 2
        loop.start_producer()
        threads = [threading.Thread(target=c.run, args=(url, stop_clients), daemon=True) for c in clients]
        for thread in threads:
            thread.start()
        wait_for(lambda: trained_now(loop) > 0, 300, "training to progress")

        def recovered(name: str, fault_t: float, trained_before: int, check=lambda: True) -> None:
            """The part is back, training progressed past where it was, /rank answered since."""
            wait_for(
                lambda: (
                    check()
                    and (progress_after(loop, fault_t) or {}).get("events_trained", -1) > trained_before
                    and all(c.answered_since(fault_t) for c in clients)
                ),
                RECOVERY_S,
                f"the loop to recover from {name} (see {loop.trainer_log})",
            )
            timeline[name] = round(time.time() - fault_t, 1)
            assert loop.trainer.poll() is None, f"the trainer exited after {name}: see {loop.trainer_log}"

        def kill_and_recover(title: str, name: str) -> None:
            """SIGKILL this cluster's one process titled `title`; a new one replaces it."""
            (victim,) = pids(loop, title)
            before, fault_t = trained_now(loop), time.time()
            say(f"SIGKILL {victim}")
            os.kill(victim, signal.SIGKILL)
            recovered(name, fault_t, before, lambda: pids(loop, title) - {victim})

        # 1. the streaming job's process: Ray restarts the actor; it resumes from its committed offsets
        kill_and_recover("ray::StreamingJobActor", "streaming job SIGKILL")
        # 2. a training worker: Ray Train restarts the group from the last checkpoint
        kill_and_recover("ray::RayTrainWorker", "training worker SIGKILL")

        # 3. the broker: stopped, then started again on the same data, port and config; once it is
        # back, the producer's new events reach training
        say("restarting the broker")
        fault_t = time.time()
        restart_broker(state)
        size, before, back_t = loop_topic_size(loop), trained_now(loop), time.time()
        say(f"the broker is back after {back_t - fault_t:.0f} s")
        recovered("broker restart", back_t, before, lambda: loop_topic_size(loop) > size)
        timeline["broker restart"] = round(time.time() - fault_t, 1)

        # 4. a Serve replica SIGKILLed under load: the controller replaces it
        victim = min(pids(loop, REPLICA))
        before, fault_t = trained_now(loop), time.time()
        say(f"SIGKILL {victim}")
        os.kill(victim, signal.SIGKILL)
        recovered("Serve replica SIGKILL", fault_t, before, lambda: len(pids(loop, REPLICA) - {victim}) == 2)
        windows["Serve replica SIGKILL"] = (fault_t, time.time())

        # 5. Serve replicas stopped gracefully: the loop's deploy again (a new code version), so the
        # controller takes each replica out of routing, lets its requests finish, stops it and
        # starts a new one
        old = pids(loop, REPLICA)
        before, fault_t = trained_now(loop), time.time()
        say(f"redeploying: replicas {sorted(old)} stop gracefully")
        loop.start_serving()
        recovered(
            "Serve replicas stopped gracefully",
            fault_t,
            before,
            lambda: len(pids(loop, REPLICA)) == 2 and not pids(loop, REPLICA) & old,
        )
        windows["Serve replicas stopped gracefully"] = (fault_t, time.time())

        # The end: no more events; everything produced reaches Feast and training.
        loop.producer.terminate()
        loop.producer.join(30)
        time.sleep(2)
        say("producer stopped")
        frame = topic_frame(bootstrap)
        users = np.unique(frame["user_id"].to_numpy())
        want = expected_batch(frame, MAX_LEN, users)
        store = SequenceStore(SequenceStoreConfig(max_len=MAX_LEN, state_dir=tmp_path / "feast"))
        wait_for(lambda: store.read_many(users).equals(want), 300, "Feast to hold every event", every_s=3)
        caught_up = time.time()
        wait_for(
            lambda: (progress_after(loop, caught_up) or {}).get("lag_events", -1) == 0,
            300,
            "training to catch up",
        )
        stop_clients.set()
        for thread in threads:
            thread.join(60)
    finally:
        stop_clients.set()
        if any(c.failures() for c in clients):
            for line in serve_log_errors(loop, tmp_path / "serve-logs")[-60:]:
                say(line)
        stopped = loop.stop()
        broker.stop()
    say(f"recovery times (s): {timeline}")
    problems: list[str] = []
    if stopped.get("trainer_exit") != 0:
        problems.append(f"the trainer did not stop cleanly ({stopped.get('trainer_exit')}): see {loop.trainer_log}")

    # serving: every answer 2xx, except the requests a SIGKILLed replica held: Serve retries a
    # request only while no replica has accepted it (ray/serve/_private/router.py), so those few
    # in flight on the killed process get a 500
    answers = sum(len(c.answers) for c in clients)
    kill_t, _ = windows["Serve replica SIGKILL"]
    lost = [f for c in clients for f in c.failures(kill_t, kill_t + 10)]
    other = [f for c in clients for f in c.outside(kill_t, kill_t + 10)]
    say(f"{answers} /rank answers; {len(lost)} non-2xx at the replica SIGKILL, {len(other)} elsewhere")
    if len(lost) > CLIENTS:
        problems.append(f"{len(lost)} non-2xx at the replica SIGKILL, more than the {CLIENTS} requests in flight")
    graceful = [f for c in clients for f in c.failures(*windows["Serve replicas stopped gracefully"])]
    if graceful:
        problems.append(f"{len(graceful)} non-2xx through the graceful replica stop: {during(graceful[:10])}")
    if other:
        problems.append(f"{len(other)} of {answers} answers were not 2xx outside the SIGKILL: {during(other[:10])}")

    # features: exact against pandas over everything in the topic
    got = store.read_many(users)
    if not got.equals(want):
        try:
            assert_same(got, want, "after the chaos")
        except AssertionError as error:
            problems.append(str(error)[:2000])

    # training: resumed from its checkpoint's offsets, trained to the end, nothing lost uncounted
    summary = trainer_summary(loop.trainer_log)
    log_text = loop.trainer_log.read_text(errors="replace")
    if "rank 0 resumed at step" not in log_text:
        problems.append("the restarted worker group did not resume from a checkpoint")
    ends = {str(p): int(o) + 1 for p, o in frame.groupby("partition")["offset"].max().items()}
    if summary["trained"] != ends:
        problems.append(f"trained up to {summary['trained']}, the topic ends at {ends}")
    produced = Counter(zip(frame.user_id.tolist(), frame.item_id.tolist(), frame.ts_ms.tolist()))
    missing = sum((produced - trained_events(trained_dir)).values())
    say(
        f"{len(frame)} events produced; trained {summary['events_trained']}, untrained {summary['untrained_events']}, "
        f"never trained {missing}"
    )
    if missing > summary["untrained_events"] or summary["events_trained"] + summary["untrained_events"] < len(frame):
        problems.append(f"{missing} events never trained, {summary['untrained_events']} counted untrained: {summary}")

    # model versions: never backwards for any client
    for client in clients:
        seen = [(t, v) for t, _, s, v, _ in client.answers if s == 200]
        backwards = [(round(a[0] - T_START, 1), a[1], b[1]) for a, b in zip(seen, seen[1:]) if b[1] < a[1]]
        say(f"client {client.seed}: versions {seen[0][1]}..{seen[-1][1]} over {len(seen)} answers")
        if backwards:
            problems.append(f"client {client.seed} saw versions go back (s, from, to): {backwards[:10]}")
    assert not problems, "\n".join(problems)
