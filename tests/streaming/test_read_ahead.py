"""streaming/pipeline.py's read-ahead: a read started for the next range is handed over only to
the batch that starts where it starts; a repeated start does not read (or build) twice; a stale
one is waited for and dropped; closing waits for what is in flight."""

from __future__ import annotations

import pyarrow as pa
import pytest

from streaming.decode import DECODED_SCHEMA
from streaming.pipeline import _ReadAhead
from streaming.sources import BatchRange


def _dataset(n: int):
    import ray.data

    return ray.data.from_arrow(
        pa.Table.from_pylist([{name: None for name in DECODED_SCHEMA.names}] * n, schema=DECODED_SCHEMA)
    )


@pytest.mark.timeout(120)
def test_read_ahead_hands_over_only_the_matching_range(ray_address):
    ahead = _ReadAhead(settle_timeout_s=60)
    builds: list[int] = []

    def build(n: int):
        def make():
            builds.append(n)
            return _dataset(n)

        return make

    first = BatchRange(start={0: 10, 1: 0}, end={0: 20, 1: 5})
    ahead.start(first, build(3))
    stale = ahead._pending[1]
    ahead.start(first, build(99))  # a retried batch asks again: same read, nothing built
    assert builds == [3] and ahead._pending[1] is stale

    assert ahead.take({0: 0, 1: 0}) is None  # another position: dropped once it has settled
    assert stale.done()
    assert ahead.take({0: 10, 1: 0}) is None  # ... and gone

    ahead.start(first, build(3))
    taken = ahead.take({0: 10, 1: 0})
    assert taken is not None and taken[0] == first
    assert taken[1].result(timeout=60).num_rows == 3
    assert ahead.take({0: 10, 1: 0}) is None  # handed over once

    second = BatchRange(start={0: 20, 1: 5}, end={0: 30, 1: 5})
    ahead.start(second, build(2))
    replaced = ahead._pending[1]
    ahead.start(BatchRange(start={0: 20, 1: 5}, end={0: 25, 1: 5}), build(1))  # replaces it
    assert replaced.done()
    assert ahead.take({0: 20, 1: 5})[1].result(timeout=60).num_rows == 1

    ahead.start(second, build(4))
    in_flight = ahead._pending[1]
    ahead.close()
    assert in_flight.done() and in_flight.result().num_rows == 4  # close waited for it
    assert ahead._pending is None
