"""The whole loop on one machine: Kafka -> streaming job -> Feast -> stream trainer -> registry ->
Ray Serve, with live traffic and a person watching the rankings change.

    python -m infra.loop --topic engagements [--minutes 3 | --forever] [--rate 20] [key=value ...]

It starts a local Ray cluster (`ray start --head`, 127.0.0.1, token authentication), runs
`trainer/stream_train.py` on it as a driver of its own (its log: `.state/loop/stream_train.log`),
deploys the Serve app (`serving.app:app`, following the registry the trainer publishes into, on
127.0.0.1), and starts a producer process that sends synthetic MovieLens-shaped events (the
dataset's users and items) at `--rate` events/s. Every `--every` seconds it prints one status
line (events in the topic, events trained, training lag, the latest version, serving latency)
and the top of `/rank` for a few users with the version that answered. At the end (after
`--minutes`, or Ctrl-C under `--forever`) it stops the producer, stops the trainer with SIGTERM
(it finishes its step, checkpoints and publishes), takes Serve and Ray down, writes
`.state/loop/timeline.png` (events, training lag, versions, serving latency) and prints a
summary as one JSON line. Exit 0 when every part stopped cleanly and serving answered.

`python -m infra.main_job` (the README's main command, `bash infra/run_main.sh`) replays the
dataset's recorded log first, then runs this.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from config.logs import setup_logging
from config.paths import REPO_ROOT, state_dir
from infra.producer import produce_at_rate
from infra.ray_cluster import LocalCluster, free_port

log = logging.getLogger("infra.loop")
# Popular MovieLens-100K movies, the candidates the status shows ranked (Star Wars, Fargo, ...).
CANDIDATES = (50, 100, 181, 258, 286, 288, 294, 300, 1, 121, 174, 127)
WATCH_USERS = (1, 13, 405)


@dataclass
class Sample:
    """One status tick: the topic, the trainer, the registry and serving at that moment."""

    time: float
    produced: int
    trained: int | None = None
    lag_events: int | None = None
    lag_s: float | None = None
    version: int | None = None
    latency_ms: list[float] = field(default_factory=list)
    answers: dict = field(default_factory=dict)


def topic_size(bootstrap: str, topic: str) -> int:
    """Events in `topic` now: the sum of its partitions' end offsets."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "loop-watch", "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions)
    finally:
        consumer.close()


def post(url: str, body: dict, timeout: float = 10.0) -> tuple[int, dict | None, float]:
    """(status, JSON answer or None, milliseconds) of one POST."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            payload = json.loads(answer.read())
            return answer.status, payload, (time.perf_counter() - t0) * 1000
    except urllib.error.HTTPError as error:
        return error.code, None, (time.perf_counter() - t0) * 1000
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return 0, None, (time.perf_counter() - t0) * 1000


def _produce(bootstrap: str, topic: str, rate: float, seconds: float, users: int, items: int) -> None:
    produce_at_rate(
        bootstrap, topic, rate=rate, seconds=seconds, num_users=users, num_items=items, seed=int(time.time())
    )


class Loop:
    """The loop's parts, started in order and stopped in reverse; `run` drives them for a while."""

    def __init__(self, args: argparse.Namespace, bootstrap: str) -> None:
        self.args = args
        self.bootstrap = bootstrap
        self.out = state_dir("loop")
        self.cluster: LocalCluster | None = None
        self.trainer: subprocess.Popen | None = None
        self.producer: mp.Process | None = None
        self.serve_port = args.serve_port or free_port()
        self.replicas = 1  # Serve replicas of the app (serving/config.yaml autoscales 1..2)
        self.samples: list[Sample] = []
        self.stop_event = threading.Event()
        self.started = time.time()
        from trainer.stream import load_stream_config

        # The trainer's config as it will run: where it publishes and writes its progress.
        self.config = load_stream_config(REPO_ROOT / "trainer" / "configs" / "stream.yaml", args.overrides)

    # -------------------------------------------------------------------------- parts
    def start_cluster(self) -> None:
        self.cluster = LocalCluster("loop", num_cpus=self.args.ray_cpus).start()
        log.info("ray: a local cluster at %s (127.0.0.1 only, token authentication)", self.cluster.address)

    def start_trainer(self) -> None:
        command = [
            sys.executable,
            "trainer/stream_train.py",
            "--source",
            f"kafka://{self.bootstrap}/{self.args.topic}",
            f"publish.every_s={self.args.publish_every}",
            *self.args.overrides,
        ]
        self.trainer_log = self.out / "stream_train.log"
        env = {**self.cluster.env, "RAY_ADDRESS": self.cluster.address}
        with open(self.trainer_log, "w") as fh:
            self.trainer = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        log.info("stream trainer: pid %d, its log %s", self.trainer.pid, self.trainer_log)

    def start_serving(self) -> None:
        """The Serve app, deployed by a driver of its own (infra/serve_app.py) that exits once
        the app answers; it follows the registry the trainer publishes into."""
        app_args = [f"registry={self.config.registry_dir()}", "poll_interval_s=1.0"]
        if self.config.streaming.feast.state_dir is not None:
            app_args.append(f"features.state_dir={self.config.streaming.feast.state_dir}")
        deploy = subprocess.run(
            [
                sys.executable,
                "-m",
                "infra.serve_app",
                "--port",
                str(self.serve_port),
                "--replicas",
                str(self.replicas),
                *app_args,
            ],
            cwd=REPO_ROOT,
            env={**self.cluster.env, "RAY_ADDRESS": self.cluster.address},
            capture_output=True,
            text=True,
            timeout=600,
        )
        if deploy.returncode != 0:
            raise RuntimeError(f"deploying the Serve app failed: {deploy.stderr[-3000:]}")
        log.info(
            "serving: http://127.0.0.1:%d (/rank, /retrieve, /version, /docs), %d replica(s)",
            self.serve_port,
            self.replicas,
        )

    def start_producer(self) -> None:
        if self.args.rate <= 0:  # no live traffic: the topic holds what it holds
            return
        seconds = 10 * 365 * 86400 if self.args.forever else self.args.minutes * 60
        ctx = mp.get_context("spawn")
        self.producer = ctx.Process(
            target=_produce,
            args=(self.bootstrap, self.args.topic, self.args.rate, seconds, self.args.users, self.args.items),
            daemon=True,
        )
        self.producer.start()
        log.info(
            "producer: %.0f events/s from %d users over %d items", self.args.rate, self.args.users, self.args.items
        )

    # -------------------------------------------------------------------------- watching
    def progress(self) -> dict | None:
        """The trainer's latest progress record of this run (trainer/stream.py writes them)."""
        path = self.config.run_dir() / "progress.jsonl"
        if not path.is_file():
            return None
        last = None
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["time"] >= self.started:
                last = record
        return last

    def tick(self) -> Sample:
        sample = Sample(time=time.time(), produced=topic_size(self.bootstrap, self.args.topic))
        record = self.progress()
        if record:
            sample.trained = record["events_trained"]
            sample.lag_events, sample.lag_s = record["lag_events"], record["lag_s"]
        url = f"http://127.0.0.1:{self.serve_port}/rank"
        for user in WATCH_USERS:
            status, answer, ms = post(url, {"user_id": user, "candidates": list(CANDIDATES), "top_k": 3})
            if status == 200 and answer:
                sample.latency_ms.append(ms)
                sample.version = answer.get("version")
                sample.answers[user] = [item["item_id"] for item in answer["items"]]
            else:
                sample.answers[user] = f"HTTP {status or 'down'}"
        self.samples.append(sample)
        return sample

    def show(self, s: Sample, file=None) -> None:
        """One status line (on stdout, or `file`: a benchmark keeps its stdout for figures)."""
        trained = f"{s.trained:,}" if s.trained is not None else "-"
        lag = f"{s.lag_events:,} events, {s.lag_s:.1f} s" if s.lag_events is not None else "-"
        latency = f"{max(s.latency_ms):.0f} ms" if s.latency_ms else "-"
        version = f"v{s.version}" if s.version is not None else "no version yet"
        ranks = "  ".join(
            f"user {u}: {' '.join(map(str, a)) if isinstance(a, list) else a}" for u, a in s.answers.items()
        )
        print(
            f"[{s.time - self.started:5.0f} s] topic {s.produced:,} | trained {trained} | lag {lag} | "
            f"{version} | /rank {latency} | {ranks}",
            file=file or sys.stdout,
            flush=True,
        )

    def run(self) -> int:
        deadline = None if self.args.forever else time.monotonic() + self.args.minutes * 60
        while not self.stop_event.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            if self.trainer.poll() is not None:
                log.error("the stream trainer exited early (%d): see %s", self.trainer.returncode, self.trainer_log)
                return 1
            self.show(self.tick())
            self.stop_event.wait(self.args.every)
        return 0

    # -------------------------------------------------------------------------- stopping
    def stop(self) -> dict:
        """Stop everything started, last first; what each part said on the way out."""
        result: dict = {}
        if self.producer is not None and self.producer.is_alive():
            self.producer.terminate()
            self.producer.join(10)
        if self.trainer is not None:
            if self.trainer.poll() is None:
                log.info("stopping the stream trainer (SIGTERM: finish the step, checkpoint, publish)")
                self.trainer.send_signal(signal.SIGTERM)
            try:
                result["trainer_exit"] = self.trainer.wait(timeout=300)
            except subprocess.TimeoutExpired:
                self.trainer.kill()
                result["trainer_exit"] = "killed after 300 s"
        if self.cluster is not None:  # Serve's controller, proxy and replicas go with it
            self.cluster.stop()
        return result

    def summary(self, stopped: dict) -> dict:
        latencies = sorted(ms for s in self.samples for ms in s.latency_ms)
        versions = [s.version for s in self.samples if s.version is not None]
        last = self.progress()
        return {
            "seconds": round(time.time() - self.started, 1),
            "events_in_topic": self.samples[-1].produced if self.samples else None,
            "events_trained": last["events_trained"] if last else None,
            "untrained_events": last["untrained_events"] if last else None,
            "versions_served": sorted(set(versions)),
            "rank_requests_ok": len(latencies),
            "rank_requests_failed": sum(isinstance(a, str) for s in self.samples for a in s.answers.values()),
            "rank_p50_ms": round(latencies[len(latencies) // 2], 1) if latencies else None,
            "timeline": str(self.out / "timeline.png"),
            **stopped,
        }

    def plot(self, path: Path) -> None:
        from matplotlib.figure import Figure

        from trainer.registry import Registry

        t = [s.time - self.started for s in self.samples]
        fig = Figure(figsize=(9, 8))
        events, lag, versions, latency = fig.subplots(4, 1, sharex=True)
        events.plot(t, [s.produced for s in self.samples], label="in the topic")
        events.plot(t, [s.trained if s.trained is not None else float("nan") for s in self.samples], label="trained")
        events.set(ylabel="events")
        events.legend(loc="upper left")
        lag.plot(t, [s.lag_events if s.lag_events is not None else float("nan") for s in self.samples])
        lag.set(ylabel="training lag (events)")
        registry = Registry(self.config.registry_dir())
        published = [
            (registry.manifest(v).created_ms / 1000 - self.started, v)
            for v in registry.versions()
            if registry.manifest(v).created_ms / 1000 >= self.started
        ]
        if published:
            versions.step([x for x, _ in published], [v for _, v in published], where="post", marker="o")
        versions.plot(
            t, [s.version if s.version is not None else float("nan") for s in self.samples], "x", label="answering"
        )
        versions.set(ylabel="model version")
        latency.plot(t, [max(s.latency_ms) if s.latency_ms else float("nan") for s in self.samples], ".")
        latency.set(ylabel="/rank latency (ms)", xlabel="seconds since start")
        fig.suptitle("the loop: events, training lag, published versions, serving latency")
        fig.tight_layout()
        fig.savefig(path, dpi=100)


def run_loop(args: argparse.Namespace, bootstrap: str) -> int:
    """Start the loop's parts, watch them, stop them; 0 when all went well."""
    loop = Loop(args, bootstrap)

    def interrupt(signum, frame) -> None:
        loop.stop_event.set()

    previous = signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    code = 1
    try:
        loop.start_cluster()
        loop.start_trainer()
        loop.start_serving()
        loop.start_producer()
        code = loop.run()
    finally:
        stopped = loop.stop()
        signal.signal(signal.SIGINT, previous)
    if loop.samples:
        loop.plot(loop.out / "timeline.png")
    summary = loop.summary(stopped)
    print(json.dumps(summary), flush=True)
    if stopped.get("trainer_exit") != 0:
        log.error("the stream trainer did not stop cleanly (%s): see %s", stopped.get("trainer_exit"), loop.trainer_log)
        code = code or 1
    if not summary["rank_requests_ok"]:
        log.error("serving never answered /rank")
        code = code or 1
    return code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=3.0, help="how long the loop runs (default 3)")
    parser.add_argument("--forever", action="store_true", help="run until Ctrl-C")
    parser.add_argument("--rate", type=float, default=20.0, help="live events per second (default 20; 0: none)")
    parser.add_argument("--users", type=int, default=943, help="live events' users 1..N (default ML-100K's)")
    parser.add_argument("--items", type=int, default=1682, help="live events' items 1..N (default ML-100K's)")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between status lines")
    parser.add_argument("--publish-every", type=float, default=20.0, help="seconds between model versions")
    parser.add_argument("--serve-port", type=int, help="serving's port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--ray-cpus", type=int, default=8, help="logical CPUs of the local Ray (default 8)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.loop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", help="the broker (default: the one `python -m infra.kafka start` runs)")
    parser.add_argument("--topic", default="engagements")
    add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for trainer/stream_train.py")
    args = parser.parse_args(argv)
    setup_logging()
    from infra.kafka.broker import read_info

    info = read_info()
    bootstrap = args.bootstrap or (info.bootstrap if info else None)
    if bootstrap is None:
        print("error: no broker: run `python -m infra.kafka start` or pass --bootstrap", file=sys.stderr)
        return 2
    return run_loop(args, bootstrap)


if __name__ == "__main__":
    raise SystemExit(main())
