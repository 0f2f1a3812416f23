"""Micro-batch planning is bounded and fair; the recorded-log source reads exact offset ranges."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from streaming.config import load_job_config
from streaming.recorded_log import events_to_log, write_log
from streaming.sources import BatchRange, LogMicroBatches, collect, open_source, plan_range


def test_plan_is_capped_and_shared_fairly():
    rng = plan_range({0: 0, 1: 5, 2: 0}, {0: 1000, 1: 8, 2: 1000}, max_events=103)
    assert rng.end == {0: 50, 1: 8, 2: 50} and rng.num_offsets == 103
    assert plan_range({0: 3}, {0: 3}, max_events=10) is None
    assert plan_range({0: 0, 1: 0}, {0: 4, 1: 2}, max_events=100).end == {0: 4, 1: 2}
    # A new partition (not in the position yet) starts at 0.
    assert plan_range({0: 2}, {0: 2, 1: 5}, max_events=10).start == {0: 2, 1: 0}


@pytest.fixture
def log_path(tmp_path):
    ev = pd.DataFrame(
        {
            "user_id": np.arange(40) % 9,
            "item_id": np.arange(40),
            "action": ["rate_3"] * 40,
            "ts_ms": np.arange(40) * 1000,
        }
    )
    path = tmp_path / "log.parquet"
    write_log(events_to_log(ev, topic="engagements", num_partitions=3), path, num_partitions=3)
    return path


def test_log_source_reads_exact_ranges(log_path, ray_address):
    source = open_source(load_job_config(overrides=[f"source=log://{log_path}"]))
    assert isinstance(source, LogMicroBatches)
    ends = source.end_offsets()
    assert sum(ends.values()) == 40 and source.beginning_offsets() == {0: 0, 1: 0, 2: 0}
    start = {p: 1 for p in ends}
    end = {p: min(ends[p], 4) for p in ends}
    table = collect(source.read(BatchRange(start=start, end=end)))
    got = sorted(zip(table.column("partition").to_pylist(), table.column("offset").to_pylist()))
    assert got == sorted((p, o) for p in ends for o in range(1, end[p]))
    # Reading on from where the last read stopped continues the same partitions.
    more = collect(source.read(BatchRange(start=end, end=ends)))
    assert more.num_rows == 40 - sum(end.values())
