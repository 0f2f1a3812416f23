"""benchmarks/drift.py: a tiny prequential run keeps its live memory flat from day to day."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from infra.datasets.synthetic import SyntheticConfig
from trainer.memory import malloc_stats, second_half_slope

DRIFT = Path(__file__).resolve().parents[2] / "benchmarks" / "drift.py"
MB = 1_000_000


@pytest.fixture(scope="module")
def drift():
    """benchmarks/drift.py as a module (benchmarks/ holds scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_drift", DRIFT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_run(drift) -> dict:
    days = 12
    stream = SyntheticConfig(
        num_users=80, num_items=300, num_events=200 * days, num_days=days, item_lifetime_days=3.0, seed=0
    )
    run = drift.DriftRun(
        name="bounded", capacity=60, eviction="lru", stream=stream, max_seq_len=20, dim=16, lr=2e-3,
        batch_size=32, eval_per_day=50, seed=0, threads=1,
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
