"""The streaming job's figures: sustained Kafka -> Feast throughput, and freshness at a fixed rate.

    # everything (~5 min); uses the checkout's running broker, else starts its own
    .venv/bin/python -m benchmarks.streaming
    .venv/bin/python -m benchmarks.streaming --only freshness --stores redis
    # the issue's 2M-event stream (~6 min more)
    .venv/bin/python -m benchmarks.streaming --synthetic-events 2000000 --synthetic-users 100000

Every figure is one JSON line on stdout ({"metric", "value", "unit", ...context}); progress and
the job's own log go to stderr. Figures:

- stream_throughput_events_per_s (per dataset and online store): the dataset's recorded log is
  produced into a fresh 4-partition topic first (untimed, confluent-kafka);
  then `streaming.pipeline.StreamJob` (the code behind `python -m streaming.job`) applies it all
  to Feast, and the figure is events / time from the first micro-batch's start to the last one's
  end (Ray and Feast start-up excluded: a warm-up job runs first in the same Ray instance).
  Datasets: the MovieLens-1M subset (users 1..2999, 487,650 events; not the full ML-1M) and the
  synthetic stream (infra/datasets/synthetic.py), by default 500k events over 25k users: the
  issue's 2M over 100k scaled down 4x with the same 20 events per user, to keep the default run
  within minutes. A 100k-event batch then touches ~25k users instead of ~49k, so the Feast load
  per event is about half the issue's: pass `--synthetic-events 2000000 --synthetic-users
  100000` for the issue's size (benchmarks/RESULTS.md has both). The context has the per-stage
  seconds, which show where the time goes.
- stream_freshness_p50_s / stream_freshness_p99_s (per store): a producer process sends synthetic
  events at a fixed rate (default 5k/s, for `--freshness-seconds`) while the job runs; freshness
  is, per event, the time its sequence write to Feast returned minus the record's Kafka
  timestamp (set by the producer when it sent it; same clock). Users are drawn from
  `--freshness-users` (100k), so nearly every event is a Feast read and write of its own.

`--stores sqlite,redis`: Redis runs as a local `redis-server` (Debian package) that the benchmark
starts on a free loopback port and stops again. The machine is shared and small: the context
records the cores and the load average at the start of each figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa

from config.paths import state_dir
from infra.producer import produce_at_rate, produce_log

log = logging.getLogger("benchmarks.streaming")
ML_ACTIONS = tuple(f"rate_{r}" for r in range(1, 6))
SYN_ACTIONS = ("skip", "view", "click", "like", "buy")


def emit(metric: str, value: float, unit: str, **context) -> None:
    print(json.dumps({"metric": metric, "value": round(float(value), 4), "unit": unit, **context}), flush=True)


def machine() -> dict:
    return {"cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}


# --- Redis ------------------------------------------------------------------------------------------


class RedisServer:
    """A throwaway `redis-server` on a free loopback port (no persistence)."""

    def __init__(self, folder: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed: apt-get install -y redis-server, or pass --stores sqlite")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise SystemExit(f"redis-server did not start on port {self.port}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def flush(self) -> None:
        """Empty the server between runs: sequences of another topic carry that topic's watermarks."""
        import redis

        redis.Redis(host="127.0.0.1", port=self.port).flushall()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- producing ---------------------------------------------------------------------------------------


def _paced_producer(
    bootstrap: str, topic: str, rate: float, seconds: float, num_users: int, seed: int, out: mp.Queue
) -> None:
    """`infra.producer.produce_at_rate` in its own process; the record timestamp is the send time."""
    out.put(
        produce_at_rate(
            bootstrap, topic, rate=rate, seconds=seconds, num_users=num_users, seed=seed, actions=SYN_ACTIONS
        )
    )


# --- the job -----------------------------------------------------------------------------------------


def job_config(
    bootstrap: str,
    topic: str,
    work: Path,
    store: str,
    redis: str,
    actions: tuple[str, ...],
    max_batch: int,
    interval: float,
    extra: tuple[str, ...] = (),
):
    from streaming.config import load_job_config

    return load_job_config(
        overrides=[
            f"source=kafka://{bootstrap}/{topic}",
            f"group_id=bench-{uuid.uuid4().hex[:8]}",
            f"actions=[{', '.join(actions)}]",
            f"state_dir={work / 'job'}",
            f"feast.state_dir={work / 'feast'}",
            f"feast.online_store={store}",
            f"feast.redis_address={redis or '127.0.0.1:6379'}",
            f"max_batch_events={max_batch}",
            f"interval_s={interval}",
            "max_len=200",
            "progress_every_s=5",
            "max_future_skew_ms=null",
            *extra,
        ]
    )


def warm_up(bootstrap: str, work: Path) -> None:
    """A tiny job in the same Ray instance, so worker processes exist before anything is timed."""
    from kafka import KafkaAdminClient

    from features.movielens import movielens_events
    from streaming.pipeline import StreamJob
    from streaming.recorded_log import events_to_log

    topic = f"bench-warm-{uuid.uuid4().hex[:8]}"
    table = events_to_log(movielens_events("ml-100k").iloc[:2000], topic=topic, num_partitions=4)
    produce_log(table, bootstrap, topic, 4)
    cfg = job_config(
        bootstrap, topic, work / "warm", "sqlite", "127.0.0.1:6379", ML_ACTIONS, 1000, 0.1, ("stop_when_idle=true",)
    )
    StreamJob(cfg).run()
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.delete_topics([topic])
    admin.close()


def dataset_log(name: str, args) -> tuple[pa.Table, tuple[str, ...], dict]:
    from features.movielens import movielens_events
    from infra.datasets.synthetic import SyntheticConfig, generate_events
    from streaming.recorded_log import events_to_log

    if name == "ml-1m-subset":
        events, actions = movielens_events("ml-1m-subset"), ML_ACTIONS
    else:
        cfg = SyntheticConfig(
            num_users=args.synthetic_users,
            num_items=args.synthetic_items,
            num_events=args.synthetic_events,
            num_days=30,
            seed=0,
        )
        t0 = time.monotonic()
        events, actions = generate_events(cfg), SYN_ACTIONS
        log.info("generated %d synthetic events in %.1f s", len(events), time.monotonic() - t0)
    table = events_to_log(events, topic="engagements", num_partitions=4)
    return table, actions, {"events": len(events), "users": int(events.user_id.nunique())}


def bench_throughput(args, bootstrap: str, work: Path, redis: RedisServer | None) -> None:
    from kafka import KafkaAdminClient

    from streaming.pipeline import StreamJob

    for name in args.datasets:
        table, actions, info = dataset_log(name, args)
        topic = f"bench-{name}-{uuid.uuid4().hex[:8]}"
        try:
            produce_rate = produce_log(table, bootstrap, topic, 4)
            for store in args.stores:
                if redis is not None:
                    redis.flush()
                load = machine()
                cfg = job_config(
                    bootstrap,
                    topic,
                    work / f"{name}-{store}",
                    store,
                    redis.address if redis else "",
                    actions,
                    args.max_batch_events,
                    0.1,
                    ("stop_when_idle=true", *args.job),
                )
                summary = StreamJob(cfg).run()
                if summary.records != table.num_rows:
                    raise RuntimeError(f"the job applied {summary.records} of {table.num_rows} events")
                emit(
                    "stream_throughput_events_per_s",
                    summary.events_per_s,
                    "events/s",
                    dataset=name,
                    online_store=store,
                    **info,
                    batches=summary.batches,
                    max_batch_events=args.max_batch_events,
                    active_seconds=round(summary.active_seconds, 2),
                    users_written=summary.users_written,
                    stage_seconds=summary.stage_seconds,
                    produce_events_per_s=round(produce_rate),
                    target=50_000,
                    reader=cfg.kafka.reader,
                    feast_bulk_io=cfg.feast.bulk_io,
                    read_ahead=cfg.read_ahead,
                    read_ahead_batches=summary.read_ahead_batches,
                    sequence_cache_events=cfg.sequence_cache_events,
                    users_read_cached=summary.users_read_cached,
                    users_read_feast=summary.users_read_feast,
                    **load,
                )
        finally:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap)
            admin.delete_topics([topic])
            admin.close()


def bench_freshness(args, bootstrap: str, work: Path, redis: RedisServer | None) -> None:
    from kafka import KafkaAdminClient

    from infra.kafka.broker import TopicSpec, ensure_topics
    from streaming.pipeline import StreamJob

    for store in args.stores:
        topic = f"bench-fresh-{uuid.uuid4().hex[:8]}"
        ensure_topics(bootstrap, (TopicSpec(name=topic, partitions=4),))
        try:
            if redis is not None:
                redis.flush()
            cfg = job_config(
                bootstrap,
                topic,
                work / f"fresh-{store}",
                store,
                redis.address if redis else "",
                SYN_ACTIONS,
                args.max_batch_events,
                args.freshness_interval,
                tuple(args.job),
            )
            job = StreamJob(cfg)
            runner = threading.Thread(target=job.run, daemon=True)
            runner.start()
            while not hasattr(job, "frontier"):  # the job is up and has read its offsets
                time.sleep(0.2)
            load = machine()
            out: mp.Queue = mp.get_context("spawn").Queue()
            producer = mp.get_context("spawn").Process(
                target=_paced_producer,
                args=(bootstrap, topic, args.freshness_rate, args.freshness_seconds, args.freshness_users, 1, out),
            )
            producer.start()
            producer.join()
            sent = out.get(timeout=30)
            deadline = time.monotonic() + 120
            while job.summary.valid_events < sent["events"] and time.monotonic() < deadline:
                time.sleep(0.2)
            job.stop("benchmark done")
            runner.join(timeout=120)
            s = job.summary
            if s.valid_events < sent["events"]:
                # The latest (slowest) events would be missing from the percentiles.
                raise RuntimeError(f"the job applied {s.valid_events} of {sent['events']} events within 120 s")
            context = dict(
                online_store=store,
                produce_rate=args.freshness_rate,
                achieved_rate=round(sent["events"] / sent["seconds"], 1),
                events=sent["events"],
                applied=s.valid_events,
                interval_s=args.freshness_interval,
                batches=s.batches,
                stage_seconds=s.stage_seconds,
                target_p99_s=2.0,
                reader=cfg.kafka.reader,
                read_ahead=cfg.read_ahead,
                read_ahead_batches=s.read_ahead_batches,
                sequence_cache_events=cfg.sequence_cache_events,
                users_read_cached=s.users_read_cached,
                feast_bulk_io=cfg.feast.bulk_io,
                users=args.freshness_users,
                **load,
            )
            emit("stream_freshness_p50_s", s.freshness_p50_s, "s", **context)
            emit("stream_freshness_p99_s", s.freshness_p99_s, "s", **context)
        finally:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap)
            admin.delete_topics([topic])
            admin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--bootstrap",
        default=None,
        help="broker (default: the checkout's running broker, else one it starts and stops)",
    )
    parser.add_argument("--only", choices=["throughput", "freshness"], help="one figure family")
    parser.add_argument("--datasets", default="ml-1m-subset,synthetic")
    parser.add_argument("--stores", default="sqlite,redis")
    parser.add_argument(
        "--synthetic-events",
        type=int,
        default=500_000,
        help="synthetic stream size (default 500k; the issue's figure is 2,000,000)",
    )
    parser.add_argument(
        "--synthetic-users",
        type=int,
        default=25_000,
        help="synthetic users (default 25k; the issue's figure is 100,000)",
    )
    parser.add_argument("--synthetic-items", type=int, default=50_000)
    parser.add_argument("--max-batch-events", type=int, default=100_000)
    parser.add_argument("--freshness-rate", type=float, default=5_000.0)
    parser.add_argument("--freshness-seconds", type=float, default=30.0)
    parser.add_argument("--freshness-interval", type=float, default=0.25)
    parser.add_argument(
        "--freshness-users",
        type=int,
        default=100_000,
        help="users the paced producer draws from (most events touch a user of their own)",
    )
    parser.add_argument(
        "--job",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra job config overrides, e.g. kafka.reader=ray-read-kafka",
    )
    args = parser.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.stores = [s for s in args.stores.split(",") if s]
    unknown = set(args.datasets) - {"ml-1m-subset", "synthetic"} or set(args.stores) - {"sqlite", "redis"}
    if unknown:
        parser.error(f"unknown datasets or stores: {sorted(unknown)}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)

    from infra.kafka import broker
    from infra.kafka.broker import read_info
    from streaming.config import RayConfig, StreamJobConfig
    from streaming.pipeline import init_ray

    own_broker = None
    bootstrap = args.bootstrap
    if bootstrap is None and read_info() is not None and broker.is_running():
        bootstrap = read_info().bootstrap
    if bootstrap is None:
        # No broker given or running: start one of our own, in its own state folder, and stop it after.
        os.environ["HSTU_STATE_DIR"] = tempfile.mkdtemp(prefix="stream-bench-broker-")
        own_broker = broker.start(broker.BrokerConfig(port=0))
        bootstrap = own_broker.bootstrap
    work = Path(tempfile.mkdtemp(prefix="stream-bench-", dir=state_dir("bench")))
    redis = RedisServer(work) if "redis" in args.stores else None
    init_ray(StreamJobConfig(ray=RayConfig(num_cpus=4, object_store_mb=1024)))
    try:
        warm_up(bootstrap, work)
        if args.only in (None, "throughput"):
            bench_throughput(args, bootstrap, work, redis)
        if args.only in (None, "freshness"):
            bench_freshness(args, bootstrap, work, redis)
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(work, ignore_errors=True)
        import ray

        ray.shutdown()
        if own_broker is not None:
            broker.stop()
            shutil.rmtree(os.environ.pop("HSTU_STATE_DIR"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
