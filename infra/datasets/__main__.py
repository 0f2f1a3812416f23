"""Turn a dataset into a recorded Kafka log (see streaming/recorded_log.py).

    python -m infra.datasets movielens --dataset ml-100k --out .state/logs/ml-100k.parquet [--partitions 4]
    python -m infra.datasets synthetic --users 10000 --items 50000 --events 2000000 --days 30 --seed 0 \\
        --out .state/logs/synthetic.parquet [--partitions 4] [--sparse-ids]

Prints one summary line (events, users, items, partitions, seconds) and exits non-zero with the
reason on a bad argument or a damaged dataset.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from features.movielens import DATASETS, DatasetError, movielens_events
    from infra.datasets.synthetic import SyntheticConfig, SyntheticConfigError, generate_events
    from streaming.recorded_log import RecordedLogError, events_to_log, write_log

    parser = argparse.ArgumentParser(
        prog="python -m infra.datasets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="the log file to write (.parquet)")
    common.add_argument("--partitions", type=int, default=4, help="the topic's partition count (default 4)")
    common.add_argument("--topic", default="engagements")
    p_ml = sub.add_parser("movielens", parents=[common], help="MovieLens ratings from ../shared/data")
    p_ml.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p_syn = sub.add_parser("synthetic", parents=[common], help="the non-stationary synthetic stream")
    p_syn.add_argument("--users", type=int, default=SyntheticConfig.num_users)
    p_syn.add_argument("--items", type=int, default=SyntheticConfig.num_items)
    p_syn.add_argument("--events", type=int, default=SyntheticConfig.num_events)
    p_syn.add_argument("--days", type=int, default=SyntheticConfig.num_days)
    p_syn.add_argument("--seed", type=int, default=SyntheticConfig.seed)
    p_syn.add_argument("--sparse-ids", action="store_true", help="random int64 ids instead of 1..N")
    args = parser.parse_args(argv)

    t0 = time.monotonic()
    try:
        if args.command == "movielens":
            events = movielens_events(args.dataset)
        else:
            cfg = SyntheticConfig(
                num_users=args.users,
                num_items=args.items,
                num_events=args.events,
                num_days=args.days,
                seed=args.seed,
                sparse_ids=args.sparse_ids,
            )
            events = generate_events(cfg)
        print(f"{len(events):,} events made in {time.monotonic() - t0:.1f} s; writing {args.out}", file=sys.stderr)
        table = events_to_log(events, topic=args.topic, num_partitions=args.partitions)
        write_log(table, args.out, num_partitions=args.partitions)
    except (DatasetError, SyntheticConfigError, RecordedLogError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = np.bincount(table.column("partition").to_numpy(), minlength=args.partitions)
    print(
        f"wrote {args.out}: {len(events):,} events, {events.user_id.nunique():,} users, "
        f"{events.item_id.nunique():,} items, topic {args.topic!r}, partitions {counts.tolist()}, "
        f"{time.monotonic() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
