"""`python -m streaming.job`: Kafka engagement events -> rolling per-user sequences in Feast.

    python -m streaming.job --source kafka://127.0.0.1:9092/engagements --interval 1 \\
        --batch-size 50000 --max-len 200
    python -m streaming.job --source log://.state/logs/ml-100k.parquet --until-idle
    python -m streaming.job --config streaming/configs/synthetic_redis.yaml feed.enabled=true

Flags override the config file (default streaming/configs/default.yaml), and `key=value`
arguments override both (any field of streaming.config.StreamJobConfig, dotted for nested ones).
A progress line (events/s, lag, freshness) goes to stderr every `progress_every_s`; the run's
summary is printed as one JSON line on stdout when it ends. SIGTERM or Ctrl-C finishes the batch
in hand, commits what is durable, and exits 0. Exit code 2: a bad config; 1: the job failed; 3:
a broker or Redis server refused this job (wrong or missing credentials, TLS that does not match),
which no retry fixes: one `error: authentication failed: ...` line on stderr says why.

Kafka TLS/SASL and the Redis password are set under `kafka.security` and
`feast.redis_security` (streaming/kafka_security.py, features/redis_security.py).

`--crash-at POINT[@N]` SIGKILLs the job the N-th time it reaches POINT (fault-injection tests;
points in streaming.pipeline.CRASH_POINTS).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from config.loader import ConfigError
from config.logs import setup_logging
from features.redis_pipe import RedisAuthError
from features.redis_security import RedisSecurityError
from streaming.config import DEFAULT_CONFIG, load_job_config
from streaming.kafka_security import KafkaSecurityError


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m streaming.job", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file")
    parser.add_argument("--source", help="kafka://HOST:PORT/TOPIC or log://PATH.parquet")
    parser.add_argument("--interval", type=float, help="seconds between micro-batches once caught up")
    parser.add_argument("--batch-size", type=int, help="max events per micro-batch")
    parser.add_argument("--max-len", type=int, help="events kept per user sequence")
    parser.add_argument("--group", help="consumer group (Kafka) / offsets name (log)")
    parser.add_argument("--until-idle", action="store_true", help="exit once everything there is is applied")
    parser.add_argument("--crash-at", help="fault injection: POINT[@N] (see streaming.pipeline.CRASH_POINTS)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    flags = {
        "source": args.source,
        "interval_s": args.interval,
        "max_batch_events": args.batch_size,
        "max_len": args.max_len,
        "group_id": args.group,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.until_idle:
        overrides.append("stop_when_idle=true")
    return args, overrides + list(args.overrides)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args, overrides = parse_args(argv)
    from streaming.pipeline import CrashPlan, CrashPlanError, StreamJob

    try:
        config = load_job_config(args.config, overrides)
        crash = CrashPlan.parse(args.crash_at) if args.crash_at else None
    except (ConfigError, CrashPlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    job = StreamJob(config, crash=crash, handle_signals=True)
    try:
        summary = job.run()
    except (KafkaSecurityError, RedisSecurityError, RedisAuthError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 3
    print(json.dumps(summary.to_dict()), flush=True)
    return 0 if summary.stopped_by != "error" else 1


if __name__ == "__main__":
    sys.exit(main())
