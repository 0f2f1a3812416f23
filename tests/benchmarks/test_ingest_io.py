"""benchmarks/ingest_io.py: the Feast batch I/O figures and their synthetic sequences."""

from __future__ import annotations

import numpy as np

from benchmarks.ingest_io import measure_batch_io, synthetic_batch


def test_benchmark_function_reports_each_figure_and_checks_exactness(tmp_path):
    figures = measure_batch_io(num_users=40, seq_len=5, repeats=1, work_dir=tmp_path)
    assert [f["metric"] for f in figures] == [
        "feast_write_rows_per_s",
        "feast_read_rows_per_s",
        "feast_push_write_rows_per_s",
    ]
    assert all(f["unit"] == "rows/s" and f["value"] > 0 and f["num_users"] == 40 for f in figures)
    assert list(tmp_path.iterdir()) == []  # its temp repository is gone


def test_synthetic_batch_is_valid_and_above_2_53():
    batch = synthetic_batch(num_users=5, seq_len=3)
    assert batch.lengths.tolist() == [3] * 5
    assert (batch.user_ids > 2**53).all() and (batch.item_ids >= 2**53).all()
    assert len(np.unique(batch.user_ids)) == 5
