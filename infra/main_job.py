"""The main job on the embedded default, end to end with what the project has today.

    python -m infra.main_job [--dataset ml-100k] [--bootstrap HOST:PORT] [--minutes 3 | --forever] [key=value ...]

1. Converts the MovieLens dataset to a recorded Kafka log (`.state/logs/<dataset>.parquet`).
2. Replays it into the local broker's `engagements` topic (skipped when the topic already
   holds exactly that log, so a re-run does not duplicate events).
3. Consumes the topic back, decodes every event and prints counts (events per partition,
   users, items, actions, dead letters), checking them against the log.
4. Runs the loop (infra/loop.py) on the topic for `--minutes` (default 3; `--forever`: until
   Ctrl-C): a local Ray cluster; the main job, `trainer/stream_train.py`, whose streaming job
   (Ray Data micro-batches) turns the events into rolling per-user sequences in the SQLite Feast
   store and whose Ray Train workers train HSTU on what they have not trained yet (prequential
   HR@10 beside popularity), publishing model versions into `.state/registry`; the Serve app,
   following that registry; and live synthetic events at `--rate`/s. Every few seconds it prints
   the rankings of a few users with the version that answered; at the end it stops everything,
   writes `.state/loop/timeline.png` and prints a summary. A re-run finds the log's events
   applied and trained already and resumes from the checkpoint's offsets.

`bash infra/run_main.sh` sets up, starts the broker when none is running, and runs this.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np

from config.logs import setup_logging
from config.paths import state_dir
from features.movielens import DATASETS
from infra.datasets.movielens import write_movielens_log
from infra.kafka.broker import read_info
from infra.loop import add_arguments, run_loop
from infra.recorded_log import read_topic, replay_log
from streaming.events import ActionVocab, decode_values
from streaming.recorded_log import read_log

log = logging.getLogger("infra.main_job")
TOPIC = "engagements"


def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = sorted(consumer.partitions_for_topic(topic) or ())
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.main_job", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="ml-100k", choices=sorted(DATASETS))
    parser.add_argument("--bootstrap", help="broker address (default: the one `python -m infra.kafka start` runs)")
    add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for trainer/stream_train.py")
    args = parser.parse_args(argv)
    setup_logging()

    bootstrap = args.bootstrap or (read_info().bootstrap if read_info() else None)
    if bootstrap is None:
        print("error: no broker: run `python -m infra.kafka start` or pass --bootstrap", file=sys.stderr)
        return 1

    path = state_dir("logs") / f"{args.dataset}.parquet"
    t0 = time.monotonic()
    n = write_movielens_log(args.dataset, path, num_partitions=4, topic=TOPIC)
    recorded = read_log(path)
    log.info("1/4 %s -> %s: %d events in %.1f s", args.dataset, path, n, time.monotonic() - t0)

    expected = recorded.partition_counts()
    ends = _end_offsets(bootstrap, TOPIC)
    if ends == expected:
        log.info("2/4 %s already holds this log (%s); not replaying", TOPIC, ends)
    elif any(ends.values()):
        print(
            f"error: topic {TOPIC!r} on {bootstrap} holds other events (end offsets {ends}, the log has "
            f"{expected}); restart the broker (`python -m infra.kafka stop && python -m infra.kafka start`)",
            file=sys.stderr,
        )
        return 1
    else:
        result = replay_log(recorded, bootstrap=bootstrap, topic=TOPIC)
        log.info("2/4 replayed %d events into %s at %.0f events/s", result.count, TOPIC, result.rate)

    t0 = time.monotonic()
    table = read_topic(bootstrap, TOPIC)
    valid, invalid = decode_values(
        table.column("value"),
        table.column("partition"),
        table.column("offset"),
        vocab=ActionVocab.movielens(),
        now_ms=int(time.time() * 1000),
    )
    seconds = time.monotonic() - t0
    log.info("3/4 consumed and decoded %d events in %.1f s", table.num_rows, seconds)

    parts = np.bincount(table.column("partition").to_numpy(), minlength=4)
    actions = valid.column("action").to_pandas().value_counts().sort_index()
    counts = {
        "events": table.num_rows,
        "per_partition": {int(p): int(c) for p, c in enumerate(parts)},
        "users": int(len(np.unique(valid.column("user_id").to_numpy()))),
        "items": int(len(np.unique(valid.column("item_id").to_numpy()))),
        "actions": {str(k): int(v) for k, v in actions.items()},
        "dead_letters": invalid.num_rows,
        "consume_events_per_s": round(table.num_rows / seconds),
    }
    print(json.dumps(counts, indent=2))
    if table.num_rows != n or counts["per_partition"] != expected or invalid.num_rows:
        print(f"error: the topic does not give back the log: {table.num_rows} events vs {n}", file=sys.stderr)
        return 1

    log.info("4/4 the loop: %s -> Feast -> HSTU on Ray Train -> registry -> Ray Serve", TOPIC)
    # The topic starts with a recorded log (timestamps from 1997-98): freshness on the log's clock.
    args.overrides = ["streaming.freshness_clock=log", *args.overrides]
    args.topic = TOPIC
    return run_loop(args, bootstrap)


if __name__ == "__main__":
    sys.exit(main())
