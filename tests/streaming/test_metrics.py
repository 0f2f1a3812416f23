"""The progress line carries events/s, lag and freshness; the Ray metrics accept a batch."""

from __future__ import annotations

import logging

import numpy as np

from streaming.metrics import JobMetrics, ProgressLine


def test_progress_line(caplog):
    line = ProgressLine(every_s=0.0)
    line.add(records=1000, invalid=2, skipped=3, freshness=np.array([0.5, 1.0, 1.5]))
    with caplog.at_level(logging.INFO, logger="streaming.job"):
        line.maybe_print({"batches": 4, "lag": 12345, "pending": 1})
    text = caplog.records[-1].getMessage()
    assert "4 batches" in text and "ev/s" in text and "2 dlq, 3 skipped" in text and "lag 12,345" in text
    assert "freshness p50 1.00 s" in text and "pending 1" in text
    with caplog.at_level(logging.INFO, logger="streaming.job"):
        line.maybe_print({"batches": 4, "lag": 0, "pending": 0})
    assert "freshness -" in caplog.records[-1].getMessage()  # the window was reset


def test_ray_metrics_accept_a_batch(ray_address):
    metrics = JobMetrics(source="kafka://127.0.0.1:9092/engagements", group="g")
    metrics.batch(records=10, valid=9, invalid=1, applied=8, skipped=1, seconds=0.2, freshness=np.array([0.1, 0.3]))
    metrics.lag(42)
    metrics.retry()
