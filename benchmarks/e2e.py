"""The whole loop's figures: freshness to a ranking, and the steady state with everything at once.

    .venv/bin/python -m benchmarks.e2e                      # ~6 min: 200 events/s, 4 minutes measured
    .venv/bin/python -m benchmarks.e2e --rate 1000 --users 10000 --minutes 10

It runs infra/loop.py's parts on this machine: a `ray start --head` cluster, the stream trainer
(`trainer/stream_train.py`: streaming job -> Feast, Ray Train, registry) and the Serve app (2
replicas by default), with a producer process sending synthetic events at `--rate` from `--users`
users, and `wrk` (a separate process, closed loop) sending `/rank` requests with 100 candidates.

- `feature_freshness_p50_s` / `_p95_s`: every `--probe-every` seconds a probe event is produced
  for a user no one has seen; the time from its production (the record's send time) to the first
  `/rank` answer conditioned on it (`cold_start` false, the event in `history_events`), polled
  every 100 ms.
- `model_freshness_p50_s` / `_p95_s`: for the same probes, the time from production to the first
  `/rank` answer by a version whose manifest offsets cover the probe's offset (the version trained
  on it).
- `ingest_events_per_s`: events the producer sent per second over the measured window (the
  streaming job keeps up when the feature freshness stays flat); `trained_events_per_s`: events
  the trainer trained per second over the window (its progress records);
- `serving_qps` and `serving_p99_ms`: wrk's figures for `/rank` (100 candidates, `--connections`)
  while the producer and the trainer run.

A PNG timeline (events, training lag, versions, serving latency) goes next to the figures
(`--png`). Every figure is one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from config.logs import setup_logging
from config.paths import state_dir
from infra.loop import Loop, add_arguments, post

log = logging.getLogger("benchmarks.e2e")
PROBE_BASE = 50_000_000  # probe users: ids no producer uses
CANDIDATES = list(range(1, 101))
TRAINER = [  # the shipped model at CPU-sized dimensions, as benchmarks/stream_train.py runs it
    "model.dim=32",
    "model.qk_dim=32",
    "model.v_dim=32",
    "table.dim=32",
    "model.max_seq_len=100",
    "streaming.max_len=100",
    "train.context_events=32",
    "train.cpus_per_worker=1",
    "streaming.interval_s=0.5",
    "train.progress_every_s=5",
    "streaming.actions=[rate_1, rate_2, rate_3, rate_4, rate_5]",
]


def emit(metric: str, value: float, unit: str, **context) -> None:
    print(json.dumps({"metric": metric, "value": value, "unit": unit, **context}), flush=True)


class Probes:
    """Probe events and what serving answers for their users, polled from a thread."""

    def __init__(self, bootstrap: str, topic: str, url: str) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self.url = url
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        self.probes: list[dict] = []
        self.versions_seen: list[tuple[float, int]] = []  # (time, version) of every probe answer
        self.lock = threading.Lock()

    def send(self, k: int) -> None:
        from streaming.events import encode_values

        user = PROBE_BASE + k
        sent = time.time()
        value = encode_values([user], [1 + k % 100], ["rate_5"], [int(sent * 1000)])[0]
        meta = self.producer.send(self.topic, key=b"%d" % user, value=value, timestamp_ms=int(sent * 1000)).get(30)
        with self.lock:
            self.probes.append(
                {"user": user, "sent": sent, "partition": meta.partition, "offset": meta.offset, "features": None}
            )

    def poll(self) -> None:
        with self.lock:
            waiting = [p for p in self.probes if p["features"] is None]
        for probe in waiting:
            status, answer, _ = post(self.url, {"user_id": probe["user"], "candidates": CANDIDATES[:10]})
            if status == 200 and answer:
                now = time.time()
                self.versions_seen.append((now, answer["version"]))
                if not answer["cold_start"] and answer["history_events"] >= 1:
                    probe["features"] = now - probe["sent"]

    def close(self) -> None:
        self.producer.close()


def model_freshness(probes: list[dict], registry, versions_seen: list[tuple[float, int]]) -> list[float]:
    """Per probe: the first time serving answered with a version that trained on it, minus its
    send time (probes no answering version covered yet are left out)."""
    first_served: dict[int, float] = {}
    for t, v in versions_seen:
        first_served.setdefault(v, t)
    covering = []
    for version in registry.versions():
        offsets = registry.manifest(version).offsets
        covering.append((version, offsets))
    out = []
    for probe in probes:
        for version, offsets in covering:  # ascending: the first version that trained on it
            if offsets.get(probe["partition"], 0) > probe["offset"]:
                served = [t for v, t in first_served.items() if v >= version]
                if served:
                    out.append(min(served) - probe["sent"])
                break
    return out


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local users = {}
for i = 1, 500 do users[i] = i end
counter = 0
request = function()
  counter = counter + 1
  local body = '{"user_id": ' .. users[(counter % 500) + 1] .. ', "candidates": [@CANDIDATES@]}'
  return wrk.format(nil, "/rank", nil, body)
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %f %f %f\\n", summary.requests, summary.errors.status
    + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def run_wrk(port: int, seconds: float, connections: int, work: Path) -> dict:
    script = work / "rank.lua"
    script.write_text(WRK_SCRIPT.replace("@CANDIDATES@", ", ".join(map(str, CANDIDATES))))
    out = subprocess.run(
        [
            "wrk",
            f"-t{min(connections, 2)}",
            f"-c{connections}",
            f"-d{int(seconds)}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    match = re.search(r"RESULT (\d+) (\d+) ([\d.]+) ([\d.]+) ([\d.]+)", out.stdout)
    if not match:
        raise RuntimeError(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")
    requests, errors, duration, p50, p99 = match.groups()
    return {
        "requests": int(requests),
        "errors": int(errors),
        "qps": int(requests) / float(duration),
        "p50_ms": float(p50),
        "p99_ms": float(p99),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    parser.add_argument("--warmup", type=float, default=90.0, help="seconds before measuring (first versions)")
    parser.add_argument("--probe-every", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=2, help="wrk's concurrent connections")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--png", default=str(state_dir("benchmarks") / "e2e_timeline.png"))
    parser.set_defaults(minutes=4.0, rate=200.0, users=5000, items=20000, publish_every=10.0)
    args = parser.parse_args(argv)
    args.overrides = list(TRAINER)
    setup_logging()
    from infra.kafka import broker
    from trainer.registry import Registry

    with tempfile.TemporaryDirectory(prefix="bench-e2e-", dir=state_dir("bench")) as tmp:
        work = Path(tmp)
        os.environ["HSTU_STATE_DIR"] = str(work / "state")  # the cluster, trainer and Serve inherit it
        started = not broker.is_running()
        bootstrap = broker.start(broker.BrokerConfig(port=0)).bootstrap if started else broker.read_info().bootstrap
        from infra.kafka.broker import TopicSpec, ensure_topics

        args.topic = f"bench-e2e-{uuid.uuid4().hex[:8]}"
        ensure_topics(bootstrap, (TopicSpec(name=args.topic, partitions=4),))
        args.overrides += [f"streaming.group_id={args.topic}", f"streaming.dlq_topic={args.topic}.dlq"]
        loop = Loop(args, bootstrap)
        loop.replicas = args.replicas
        try:
            loop.start_cluster()
            loop.start_trainer()
            loop.start_serving()
            loop.start_producer()
            probes = Probes(bootstrap, args.topic, f"http://127.0.0.1:{loop.serve_port}/rank")
            log.info("warming up for %.0f s (the first versions)", args.warmup)
            time.sleep(args.warmup)
            t_start = time.time()
            start_record = loop.progress()
            start_produced = loop.tick().produced
            wrk_result: dict = {}
            wrk = threading.Thread(
                target=lambda: wrk_result.update(
                    run_wrk(loop.serve_port, args.minutes * 60 - args.warmup - 10, args.connections, work)
                ),
                daemon=True,
            )
            wrk.start()
            k = 0
            next_probe = time.monotonic()
            while time.time() - t_start < args.minutes * 60 - args.warmup:
                if time.monotonic() >= next_probe:
                    probes.send(k)
                    k += 1
                    next_probe += args.probe_every
                probes.poll()
                if len(loop.samples) == 0 or time.time() - loop.samples[-1].time > 5:
                    loop.show(loop.tick(), file=sys.stderr)
                time.sleep(0.1)
            wrk.join(300)
            t_end = time.time()
            end_record = loop.progress()
            end_produced = loop.tick().produced
            # The probes of the last seconds still wait: give them a minute to reach a version.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and any(p["features"] is None for p in probes.probes):
                probes.poll()
                time.sleep(0.1)
            tail = time.monotonic() + 60
            registry = Registry(loop.config.registry_dir())
            while time.monotonic() < tail:
                probes.poll()  # answers record the versions serving has swapped in
                status, answer, _ = post(probes.url, {"user_id": 1, "candidates": CANDIDATES[:10]})
                if status == 200:
                    probes.versions_seen.append((time.time(), answer["version"]))
                if len(model_freshness(probes.probes, registry, probes.versions_seen)) == len(probes.probes):
                    break
                time.sleep(0.5)
            probes.close()
        finally:
            stopped = loop.stop()
            if started:
                broker.stop()
        if loop.samples:
            loop.plot(Path(args.png))
        features = np.array([p["features"] for p in probes.probes if p["features"] is not None])
        model = np.array(model_freshness(probes.probes, registry, probes.versions_seen))
        window = t_end - t_start
        context = dict(
            rate=args.rate,
            users=args.users,
            minutes=args.minutes,
            warmup_s=args.warmup,
            probes=len(probes.probes),
            replicas=args.replicas,
            publish_every_s=args.publish_every,
            trainer_exit=stopped.get("trainer_exit"),
            cores=os.cpu_count(),
            device="cpu",
        )
        for name, values in (("feature", features), ("model", model)):
            for q in (50, 95):
                emit(
                    f"{name}_freshness_p{q}_s",
                    round(float(np.percentile(values, q)), 2) if len(values) else None,
                    "s",
                    reached=int(len(values)),
                    **context,
                )
        emit("ingest_events_per_s", round((end_produced - start_produced) / window, 1), "events/s", **context)
        trained = (end_record["events_trained"] - start_record["events_trained"]) / (
            end_record["time"] - start_record["time"]
        )
        emit("trained_events_per_s", round(trained, 1), "events/s", **context)
        emit(
            "serving_qps",
            round(wrk_result["qps"], 1),
            "requests/s",
            candidates=100,
            connections=args.connections,
            errors=wrk_result["errors"],
            **context,
        )
        emit(
            "serving_p99_ms",
            round(wrk_result["p99_ms"], 1),
            "ms",
            candidates=100,
            connections=args.connections,
            p50_ms=round(wrk_result["p50_ms"], 1),
            **context,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
