"""benchmarks/drift.py: a tiny prequential run keeps its live memory flat from day to day."""

from __future__ import annotations

import pytest
import torch

from benchmarks import drift as drift_module
from benchmarks.drift import malloc_stats, second_half_slope
from infra.datasets.synthetic import SyntheticConfig

MB = 1_000_000


@pytest.fixture(scope="module")
def drift():
    return drift_module


@pytest.fixture(scope="module")
def tiny_run(drift) -> dict:
    days = 12
    stream = SyntheticConfig(
        num_users=80, num_items=300, num_events=200 * days, num_days=days, item_lifetime_days=3.0, seed=0
    )
    run = drift.DriftRun(
        name="bounded",
        capacity=60,
        eviction="lru",
        stream=stream,
        max_seq_len=20,
        dim=16,
        lr=2e-3,
        batch_size=32,
        eval_per_day=50,
        seed=0,
        threads=1,
    )
    return drift.run_variant(run)


def test_every_day_is_recorded_with_its_memory(tiny_run: dict) -> None:
    per_day = tiny_run["per_day"]
    assert [d["day"] for d in per_day] == list(range(12))
    assert tiny_run["malloc_trim"] is True
    assert all(d["rss"] > 0 and d["py_objects"] > 0 for d in per_day)


def test_python_objects_stay_flat_after_warm_up(tiny_run: dict) -> None:
    # Objects created by the days and still alive: anything kept per batch or per day (loss
    # tensors, autograd graphs, records holding tensors) makes this count climb.
    counts = [d["py_objects"] for d in tiny_run["per_day"]]
    half = len(counts) // 2
    assert max(counts[half:]) - counts[half] <= 2, counts


@pytest.mark.skipif(malloc_stats() is None, reason="needs glibc >= 2.33 (mallinfo2)")
def test_bytes_in_use_stay_flat_after_warm_up(tiny_run: dict) -> None:
    # Native live memory (tensors, arrays, optimizer state, the table): measured ~0.01 MB/day
    # here; keeping one training step's output alive per day adds far more.
    in_use = [d["malloc_in_use"] for d in tiny_run["per_day"]]
    slope = second_half_slope(in_use) / MB
    assert slope < 0.1, f"malloc in-use grows {slope:.3f} MB/day over days 7-12: {[round(v / MB, 2) for v in in_use]}"


def test_second_half_slope_ignores_warm_up() -> None:
    warm_then_flat = [100.0, 150.0, 180.0, 200.0, 200.0, 200.0, 200.0, 200.0]
    assert second_half_slope(warm_then_flat) == 0.0
    assert second_half_slope([0.0, 0.0, 0.0, 10.0, 12.5, 15.0]) == pytest.approx(2.5)
    assert second_half_slope([3.0]) == 0.0 and second_half_slope([]) == 0.0


@pytest.mark.skipif(malloc_stats() is None, reason="needs glibc >= 2.33 (mallinfo2)")
def test_malloc_stats_count_live_bytes() -> None:
    before = malloc_stats().in_use
    block = torch.ones(8 * MB // 4)  # 8 MB of float32, touched
    assert malloc_stats().in_use - before >= 8 * MB
    del block
    assert malloc_stats().in_use - before < 1 * MB
