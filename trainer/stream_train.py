"""Train HSTU continuously from the stream; publish model versions. The system's main job.

    python trainer/stream_train.py --source log://.state/logs/ml-100k.parquet --until-idle
    python trainer/stream_train.py --source kafka://127.0.0.1:9092/engagements --workers 2
    python trainer/stream_train.py --attach --max-events 100000          # a streaming job runs already
    ray job submit --working-dir . -- python trainer/stream_train.py --config trainer/configs/stream.yaml

Runs the streaming job (Kafka or a recorded log -> Feast, and the training feed), Ray Train
workers that train on what the feed coalesces, and publishes versions into the registry (see
trainer/stream.py). Plain `python` starts a local Ray; under `ray job submit` (RAY_ADDRESS set)
it joins that cluster. Flags override the config file, and `key=value` arguments override both
(any field of trainer.stream.StreamTrainConfig, dotted). Runs until stopped: SIGTERM or Ctrl-C
finishes the step, checkpoints, publishes and exits 0; `--until-idle` stops once everything the
source holds is trained, `--max-events N` after N events. Rank 0 prints a progress line (events
and tokens trained per second, loss, lag in events and seconds, untrained events, the last
version, prequential HR@10 beside popularity); the run's summary is one JSON line on stdout.
Exit code 2: a bad config; 1: the run failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python trainer/stream_train.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.loader import ConfigError  # noqa: E402
from config.logs import setup_logging  # noqa: E402
from config.paths import REPO_ROOT  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT / "trainer" / "configs" / "stream.yaml"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="trainer/stream_train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="YAML config (default trainer/configs/stream.yaml)"
    )
    parser.add_argument("--source", help="kafka://HOST:PORT/TOPIC or log://PATH.parquet")
    parser.add_argument("--workers", type=int, help="Ray Train workers")
    parser.add_argument("--attach", action="store_true", help="use the feed of a streaming job that runs already")
    parser.add_argument("--until-idle", action="store_true", help="stop once everything there is has been trained")
    parser.add_argument("--max-events", type=int, help="stop after training this many events")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.batch_size=64")
    args = parser.parse_args(argv)
    overrides = []
    if args.source:
        overrides.append(f"streaming.source={args.source}")
    if args.workers is not None:
        overrides.append(f"train.workers={args.workers}")
    if args.attach:
        overrides.append("attach=true")
    if args.until_idle:
        overrides.append("stop.until_idle=true")
    if args.max_events is not None:
        overrides.append(f"stop.max_events={args.max_events}")
    return args, overrides + list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args, overrides = parse_args(argv)
    from trainer.stream import StreamTrainer, load_stream_config

    try:
        config = load_stream_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = StreamTrainer(config).run(handle_signals=True)
    except Exception as exc:  # the cause is in the log above; say it once more, briefly
        print(f"error: the stream trainer failed: {exc!r}"[:2000], file=sys.stderr)
        return 1
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
