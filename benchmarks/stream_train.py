"""The stream trainer's figures: throughput, freshness to the model, lag under load, quality.

    .venv/bin/python -m benchmarks.stream_train                         # everything, small sizes (~25 min)
    .venv/bin/python -m benchmarks.stream_train --only throughput freshness
    .venv/bin/python -m benchmarks.stream_train --only lag --lag-seconds 600       # the issue's 10 minutes
    .venv/bin/python -m benchmarks.stream_train --only replay --replay-events 0    # the whole ML-1M subset

Every figure is one JSON line on stdout ({"metric", "value", "unit", ...conditions}); the runs'
own progress goes to stderr. It uses the checkout's running broker, or starts and stops one; it
starts one local Ray for all runs (`trainer.stream.init_ray`), and each run is a real
`trainer.stream.StreamTrainer` (streaming job actor, training feed, Ray Train workers, registry).

- `stream_train_events_per_s` (`workers` 1 and 2, 1 torch thread each): events trained (targets)
  per second of training (`train_seconds`: wall time inside training steps) from a pre-filled topic
  of the synthetic stream; `tokens_per_s` rides along.
- `model_freshness_p50_s` / `model_freshness_p95_s`: a producer process sends synthetic events at
  1,000/s from 10,000 users (record timestamp = send time) while the trainer runs and publishes
  every 10 s; an event's model freshness is the creation time of the first version whose
  manifest offsets cover it, minus its send time.
- `training_lag_events` and `untrained_fraction`: 5,000 events/s from 100,000 users for
  `--lag-seconds` (`--lag-context`, `--lag-workers`: other than BASE's training context and one
  worker); the lag (untrained events in the feed and in hand) over the run (max, median, last,
  its growth over the second half, PNG), and untrained / produced at the end.
- `prequential_ndcg@10` / `prequential_hr@10` (`model` hstu, sasrec or popularity; `table` bounded
  or unbounded; `dataset`): the drifting synthetic stream (infra/datasets/synthetic.py) replayed in
  time order (paced), scored before training on each take, averaged over the scored events after
  the first `--warmup` fraction of them; the bounded table holds 25% of the distinct items; HSTU
  in the shipped interleaved layout and in SASRec's items-only layout (`layout`). PNG.
- replay: the ML-1M subset in time order; its final prequential HR@10 (the last 10% of scored
  events) beside the offline trainer's test HR@10 (`--offline-hr`, from benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from config.logs import setup_logging
from config.paths import REPO_ROOT, state_dir
from infra.datasets.synthetic import SyntheticConfig, generate_events
from infra.producer import produce_at_rate
from streaming.recorded_log import events_to_log, write_log
from trainer.registry import Registry
from trainer.stream import StreamTrainConfig, StreamTrainer, init_ray, load_stream_config

log = logging.getLogger("benchmarks.stream_train")
SYN_ACTIONS = ("skip", "view", "click", "like", "buy")
BASE = [  # the shipped config at CPU-sized dimensions; every run states its overrides
    "model.dim=32",
    "model.qk_dim=32",
    "model.v_dim=32",
    "table.dim=32",
    "model.max_seq_len=100",
    "streaming.max_len=100",
    "train.context_events=32",
    "train.cpus_per_worker=1",
    "train.threads=1",
    "train.progress_every_s=10",
    "streaming.progress_every_s=30",
    "ray_num_cpus=6",
]


def emit(metric: str, value: float, unit: str, **context) -> None:
    print(json.dumps({"metric": metric, "value": value, "unit": unit, **context}), flush=True)


def machine() -> dict:
    return {"cores": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2), "device": "cpu"}


def run(work: Path, name: str, source: str, *overrides: str) -> tuple[dict, StreamTrainConfig]:
    """One StreamTrainer run in its own folders; its summary and config."""
    folder = work / name
    config = load_stream_config(
        REPO_ROOT / "trainer" / "configs" / "stream.yaml",
        [
            *BASE,
            f"name={name}",
            f"storage_dir={folder / 'run'}",
            f"publish.registry={folder / 'registry'}",
            f"streaming.source={source}",
            f"streaming.group_id=bench-{name}-{uuid.uuid4().hex[:6]}",
            f"streaming.state_dir={folder / 'job'}",
            f"streaming.feast.state_dir={folder / 'feast'}",
            f"streaming.feed.actor_name=feed-{name}",
            *overrides,
        ],
    )
    t0 = time.monotonic()
    try:
        summary = StreamTrainer(config).run()
    finally:
        _kill(f"feed-{name}")
    log.info(
        "%s: %s in %.0f s",
        name,
        {k: summary.get(k) for k in ("events_trained", "untrained_events")},
        time.monotonic() - t0,
    )
    return summary, config


def _kill(actor: str) -> None:
    import ray

    try:
        ray.kill(ray.get_actor(actor, namespace="hstu"))
    except ValueError:
        pass


def synthetic_log(path: Path, cfg: SyntheticConfig) -> tuple[Path, int, int]:
    events = generate_events(cfg)
    write_log(events_to_log(events, topic="engagements", num_partitions=4), path, num_partitions=4)
    return path, len(events), int(events.item_id.nunique())


def _producer(bootstrap: str, topic: str, rate: float, seconds: float, users: int, out: mp.Queue) -> None:
    out.put(produce_at_rate(bootstrap, topic, rate=rate, seconds=seconds, num_users=users, actions=SYN_ACTIONS))


def start_producer(bootstrap: str, topic: str, rate: float, seconds: float, users: int):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_producer, args=(bootstrap, topic, rate, seconds, users, out))
    proc.start()
    return proc, out


def new_topic(bootstrap: str, partitions: int = 4) -> str:
    from infra.kafka.broker import TopicSpec, ensure_topics

    topic = f"bench-train-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, (TopicSpec(name=topic, partitions=partitions),))
    return topic


def live_overrides() -> list[str]:
    return [f"streaming.actions=[{', '.join(SYN_ACTIONS)}]", "streaming.interval_s=0.5"]


# ---------------------------------------------------------------------------------- figures
def bench_throughput(args, bootstrap: str, work: Path) -> None:
    path, n, _ = synthetic_log(
        work / "throughput.parquet",
        SyntheticConfig(
            num_users=args.throughput_users, num_items=20_000, num_events=args.throughput_events, num_days=10, seed=1
        ),
    )
    for workers in (1, 2):
        summary, _ = run(
            work,
            f"throughput-{workers}",
            f"log://{path}",
            f"train.workers={workers}",
            "stop.until_idle=true",
            "eval.enabled=false",
            "publish.every_s=600",
            f"streaming.actions=[{', '.join(SYN_ACTIONS)}]",
        )
        emit(
            "stream_train_events_per_s",
            summary["events_per_s"],
            "events/s",
            workers=workers,
            threads=1,
            tokens_per_s=summary["tokens_per_s"],
            events_trained=summary["events_trained"],
            train_seconds=summary["train_seconds"],
            events=n,
            users=args.throughput_users,
            **machine(),
        )


def run_live(work: Path, name: str, bootstrap: str, rate: float, seconds: float, users: int, *overrides: str):
    """A producer process at `rate` for `seconds` while a StreamTrainer runs on its topic; the
    trainer is stopped (SIGTERM's path: finish, checkpoint, publish) `drain_s` after the producer."""
    import threading

    import ray

    from trainer.stream import CONTROL_ACTOR

    topic = new_topic(bootstrap)
    holder: dict = {}
    runner = threading.Thread(
        target=lambda: holder.update(
            result=run(
                work,
                name,
                f"kafka://{bootstrap}/{topic}",
                *live_overrides(),
                f"streaming.dlq_topic={topic}.dlq",
                *overrides,
            )
        ),
        daemon=True,
    )
    runner.start()
    started = time.time()
    producer, out = start_producer(bootstrap, topic, rate, seconds, users)
    producer.join(seconds + 300)
    sent = {**out.get(timeout=60), "started_at": started}
    time.sleep(30)  # the last events reach the trainer
    ray.get_actor(CONTROL_ACTOR, namespace="hstu").request_stop.remote("benchmark done")
    runner.join(900)
    summary, config = holder["result"]
    return topic, sent, summary, config


def bench_freshness(args, bootstrap: str, work: Path) -> None:
    from infra.recorded_log import read_topic

    topic, sent, summary, config = run_live(
        work,
        "freshness",
        bootstrap,
        args.freshness_rate,
        args.freshness_seconds,
        10_000,
        "publish.every_s=10",
        "publish.keep=1000",
    )
    records = read_topic(bootstrap, topic)
    part = records.column("partition").to_numpy().astype(np.int64)
    offset = records.column("offset").to_numpy()
    sent_ms = records.column("timestamp_ms").to_numpy()
    registry = Registry(config.registry_dir())
    fresh = np.full(len(part), np.nan)
    for version in registry.versions():  # ascending: the first version to cover an event wins
        manifest = registry.manifest(version)
        limit = np.zeros(int(part.max()) + 1, dtype=np.int64)
        for p, o in manifest.offsets.items():
            if p < len(limit):
                limit[p] = o
        covered = (offset < limit[part]) & np.isnan(fresh)
        fresh[covered] = (manifest.created_ms - sent_ms[covered]) / 1000
    done = fresh[~np.isnan(fresh)]
    context = dict(
        rate=args.freshness_rate,
        users=10_000,
        produced=sent["events"],
        covered=int(len(done)),
        versions=len(registry.versions()),
        publish_every_s=10,
        target_p50_s=60,
        events_trained=summary["events_trained"],
        untrained_events=summary["untrained_events"],
        **machine(),
    )
    emit("model_freshness_p50_s", round(float(np.percentile(done, 50)), 2), "s", **context)
    emit("model_freshness_p95_s", round(float(np.percentile(done, 95)), 2), "s", **context)


def bench_lag(args, bootstrap: str, work: Path) -> None:
    _, sent, summary, config = run_live(
        work,
        "lag",
        bootstrap,
        args.lag_rate,
        args.lag_seconds,
        100_000,
        "publish.every_s=30",
        "streaming.max_batch_events=20000",
        *([f"train.context_events={args.lag_context}"] if args.lag_context is not None else []),
        f"train.workers={args.lag_workers}",
    )
    progress = [json.loads(line) for line in (config.run_dir() / "progress.jsonl").read_text().splitlines()]
    lags = [p["lag_events"] for p in progress]
    plot_lag(
        progress,
        Path(args.png_dir) / "stream_train_lag.png",
        rate=args.lag_rate,
        context=config.train.context_events,
        workers=config.train.workers,
        start=sent["started_at"],
        seconds=args.lag_seconds,
    )
    context = dict(
        rate=args.lag_rate,
        users=100_000,
        seconds=args.lag_seconds,
        context_events=config.train.context_events,
        workers=config.train.workers,
        lag_growth_events_per_s=lag_growth(progress, start=sent["started_at"], seconds=args.lag_seconds),
        produced=sent["events"],
        events_trained=summary["events_trained"],
        untrained_events=summary["untrained_events"],
        **machine(),
    )
    emit(
        "training_lag_events",
        int(max(lags)),
        "events",
        stat="max over the run",
        last=int(lags[-1]),
        median=int(np.median(lags)),
        **context,
    )
    emit("untrained_fraction", round(summary["untrained_events"] / max(sent["events"], 1), 4), "fraction", **context)


def lag_growth(progress: list[dict], *, start: float, seconds: float) -> float | None:
    """The lag's slope (events/s, least squares) over the second half of the producer's run (it
    began at `start`, epoch seconds): about 0 when training keeps up, the produced rate minus the
    trained rate when it does not; None (JSON null) with fewer than 3 progress lines there."""
    points = [(p["time"] - start, p["lag_events"]) for p in progress if seconds / 2 <= p["time"] - start <= seconds]
    if len(points) < 3:
        return None
    t, lag = np.array(points, dtype=float).T
    return round(float(np.polyfit(t, lag, 1)[0]), 1)


def plot_lag(
    progress: list[dict], path: Path, *, rate: float, context: int | None, workers: int, start: float, seconds: float
) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    ax.axvspan(0, seconds, color="0.92", label="producer sending")
    since = [p["time"] - start for p in progress]  # seconds since the producer started
    ax.plot(since, [p["lag_events"] for p in progress], label="lag (events)")
    ax.plot(since, [p["untrained_events"] for p in progress], label="untrained (total)")
    title = f"training lag at {rate:,.0f} events/s, training context {context} events, {workers} worker(s)"
    ax.set(xlabel="seconds since the producer started", ylabel="events", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def prequential_means(config: StreamTrainConfig, warmup: float, *, tail: float | None = None) -> dict:
    """Event-weighted means of the prequential metrics after the warm-up (or over the last `tail`)."""
    records = [json.loads(line) for line in (config.run_dir() / "prequential.jsonl").read_text().splitlines()]
    weights = np.array([r["model_events"] for r in records], dtype=float)
    cum = np.cumsum(weights) / max(weights.sum(), 1)
    keep = cum > (1 - tail if tail is not None else warmup)
    out = {}
    for name in ("model_ndcg@10", "model_hr@10", "popularity_ndcg@10", "popularity_hr@10"):
        values = np.array([r[name] for r in records], dtype=float)
        ok = keep & ~np.isnan(values)
        out[name] = float(np.average(values[ok], weights=weights[ok])) if ok.any() else float("nan")
    out["scored_events"] = int(weights[keep].sum())
    return out


def bench_quality(args, bootstrap: str, work: Path) -> None:
    cfg = SyntheticConfig(
        num_users=args.quality_users,
        num_items=args.quality_items,
        num_events=args.quality_events,
        num_days=20,
        item_lifetime_days=6.0,
        seed=0,
    )
    path, n, distinct = synthetic_log(work / "drift.parquet", cfg)
    bounded = max(1, round(0.25 * distinct))
    common = [
        "stop.until_idle=true",
        f"streaming.max_events_per_s={args.quality_rate}",
        "publish.every_s=600",
        f"streaming.actions=[{', '.join(SYN_ACTIONS)}]",
        "eval.max_events=3000",
        "streaming.interval_s=0.5",
    ]
    # (model, table, training context, layout): the shipped context (train.context_events=32 at
    # these sizes) beside the whole sequence, to show what the shorter context costs; HSTU in the
    # shipped interleaved layout (next item + action) and in SASRec's items-only layout.
    runs = {
        ("hstu", "unbounded", "32", "interleaved"): [f"table.capacity={distinct}"],
        ("hstu", "unbounded", "all", "interleaved"): [f"table.capacity={distinct}", "train.context_events=null"],
        ("hstu", "bounded", "32", "interleaved"): [f"table.capacity={bounded}"],
        ("sasrec", "unbounded", "32", "items"): [
            f"table.capacity={distinct}",
            "model.encoder=sasrec",
            "model.layout=items",
            "model.num_time_buckets=0",
            "model.position_bias=false",
        ],
        ("hstu", "unbounded", "32", "items"): [f"table.capacity={distinct}", "model.layout=items"],
    }
    if args.quality_runs:
        runs = {key: extra for key, extra in runs.items() if "-".join(key) in args.quality_runs}
    curves = {}
    for (model, table, context_events, layout), extra in runs.items():
        summary, config = run(
            work, f"quality-{model}-{table}-ctx{context_events}-{layout}", f"log://{path}", *common, *extra
        )
        means = prequential_means(config, args.warmup)
        curves[(model, table, context_events, layout)] = config.run_dir() / "prequential.jsonl"
        context = dict(
            context_events=context_events,
            layout=layout,
            dataset="synthetic-drift",
            events=n,
            distinct_items=distinct,
            capacity=extra[0].split("=")[1],
            warmup=args.warmup,
            scored_events=means["scored_events"],
            rate=args.quality_rate,
            **machine(),
        )
        for metric in ("ndcg@10", "hr@10"):
            emit(
                f"prequential_{metric}",
                round(means[f"model_{metric}"], 5),
                "ratio",
                model=model,
                table=table,
                **context,
            )
            if (model, table, context_events, layout) == ("hstu", "unbounded", "32", "interleaved"):
                emit(
                    f"prequential_{metric}",
                    round(means[f"popularity_{metric}"], 5),
                    "ratio",
                    model="popularity",
                    table=table,
                    **context,
                )
    plot_quality(curves, Path(args.png_dir) / "stream_train_quality.png")


def plot_quality(curves: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    for (model, table, context_events, layout), jsonl in curves.items():
        records = [json.loads(line) for line in jsonl.read_text().splitlines()]
        x = [r["events_trained"] for r in records]
        label = f"{model} ({table}, context {context_events}, {layout})"
        ax.plot(x, [r["model_ndcg@10"] for r in records], label=label)
        if (model, table, context_events, layout) == ("hstu", "unbounded", "32", "interleaved"):
            ax.plot(
                [r["events_trained"] for r in records],
                [r["popularity_ndcg@10"] for r in records],
                label="popularity",
                linestyle="--",
            )
    ax.set(xlabel="events trained", ylabel="prequential NDCG@10 (per take)", title="drifting synthetic stream")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def bench_replay(args, bootstrap: str, work: Path) -> None:
    from features.movielens import movielens_events

    events = movielens_events("ml-1m-subset")
    if args.replay_events:
        events = events.iloc[: args.replay_events]
    path = work / "ml1m.parquet"
    write_log(events_to_log(events, topic="engagements", num_partitions=4), path, num_partitions=4)
    summary, config = run(
        work,
        "replay-ml1m",
        f"log://{path}",
        "stop.until_idle=true",
        "publish.every_s=600",
        f"streaming.max_events_per_s={args.replay_rate}",
        "streaming.interval_s=0.5",
    )
    final = prequential_means(config, 0.0, tail=0.1)
    emit(
        "prequential_hr@10",
        round(final["model_hr@10"], 5),
        "ratio",
        model="hstu",
        table="unbounded",
        dataset="ml-1m-subset",
        events=len(events),
        stat="last 10% of scored events",
        **{"offline_test_hr@10": args.offline_hr, "popularity_hr@10": round(final["popularity_hr@10"], 5)},
        ratio_to_offline=round(final["model_hr@10"] / args.offline_hr, 3),
        **machine(),
    )


PARTS = {
    "throughput": bench_throughput,
    "freshness": bench_freshness,
    "lag": bench_lag,
    "quality": bench_quality,
    "replay": bench_replay,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.stream_train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    parser.add_argument("--bootstrap", help="a running broker (default: the checkout's, else one started here)")
    parser.add_argument("--throughput-events", type=int, default=60_000)
    parser.add_argument("--throughput-users", type=int, default=3_000)
    parser.add_argument("--freshness-rate", type=float, default=1000.0)
    parser.add_argument("--freshness-seconds", type=float, default=180.0)
    parser.add_argument("--lag-rate", type=float, default=5000.0)
    parser.add_argument("--lag-seconds", type=float, default=120.0)
    parser.add_argument("--lag-context", type=int, help="train.context_events of the lag run (default: BASE's)")
    parser.add_argument("--lag-workers", type=int, default=1, help="train.workers of the lag run")
    parser.add_argument("--quality-events", type=int, default=40_000)
    parser.add_argument("--quality-users", type=int, default=1_000)
    parser.add_argument("--quality-items", type=int, default=3_000)
    parser.add_argument("--quality-rate", type=float, default=500.0)
    parser.add_argument(
        "--quality-runs",
        nargs="+",
        metavar="MODEL-TABLE-CONTEXT-LAYOUT",
        help="only these quality runs (e.g. hstu-unbounded-32-items); default all",
    )
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of scored events left out at the start")
    parser.add_argument("--replay-events", type=int, default=100_000, help="0: the whole ML-1M subset")
    parser.add_argument("--replay-rate", type=float, default=1500.0)
    parser.add_argument(
        "--offline-hr",
        type=float,
        default=0.3294,
        help="the offline trainer's test HR@10, HSTU on the ML-1M subset (RESULTS history, seed 42)",
    )
    parser.add_argument("--png-dir", default=str(state_dir("benchmarks")))
    args = parser.parse_args(argv)
    setup_logging()
    from infra.kafka import broker

    started = False
    bootstrap = args.bootstrap or (broker.read_info().bootstrap if broker.is_running() else None)
    with tempfile.TemporaryDirectory(prefix="bench-stream-train-", dir=state_dir("bench")) as tmp:
        work = Path(tmp)
        if bootstrap is None and any(p in args.only for p in ("freshness", "lag")):
            os.environ["HSTU_STATE_DIR"] = str(work / "broker-state")  # a broker of our own
            bootstrap = broker.start(broker.BrokerConfig(port=0)).bootstrap
            started = True
        init_ray(load_stream_config(REPO_ROOT / "trainer" / "configs" / "stream.yaml", BASE))
        try:
            for name in args.only:
                log.info("--- %s", name)
                PARTS[name](args, bootstrap, work)
        finally:
            import ray

            ray.shutdown()
            if started:
                broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
