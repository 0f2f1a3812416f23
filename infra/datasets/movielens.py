"""MovieLens as a recorded Kafka log (action `rate_<r>`, key = user id, partitioned by user with
Kafka's default partitioner, offsets in time order).

    >>> from infra.datasets.movielens import write_movielens_log
    >>> write_movielens_log("ml-100k", ".state/logs/ml-100k.parquet", num_partitions=4)
    100000

or `python -m infra.datasets movielens --dataset ml-100k --out .state/logs/ml-100k.parquet`. The
ratings themselves are read by `features.movielens`.
"""

from __future__ import annotations

from pathlib import Path

from features.movielens import movielens_events
from streaming.recorded_log import events_to_log, write_log


def write_movielens_log(
    name: str,
    path: str | Path,
    *,
    num_partitions: int = 4,
    topic: str = "engagements",
    data_dir: Path | None = None,
) -> int:
    """Write dataset `name` as a recorded Kafka log at `path`; returns the number of events."""
    table = events_to_log(movielens_events(name, data_dir), topic=topic, num_partitions=num_partitions)
    write_log(table, path, num_partitions=num_partitions)
    return table.num_rows
