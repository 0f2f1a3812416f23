"""The progress line carries events/s, lag and freshness; the Ray metrics record a batch."""

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


def test_ray_metrics_record_a_batch(ray_address, monkeypatch):
    from ray.util import metrics as ray_metrics

    calls: list[tuple[str, str, float, dict | None]] = []

    def record(cls, method):
        real = getattr(cls, method)

        def wrapped(self, value=1.0, tags=None):
            calls.append((self._name, method, value, tags))
            return real(self, value, tags=tags)

        monkeypatch.setattr(cls, method, wrapped)

    record(ray_metrics.Counter, "inc")
    record(ray_metrics.Gauge, "set")
    record(ray_metrics.Histogram, "observe")

    metrics = JobMetrics(source="kafka://127.0.0.1:9092/engagements", group="g")
    metrics.batch(records=10, valid=9, invalid=1, applied=8, skipped=1, seconds=0.2, freshness=np.array([0.1, 0.3]))
    metrics.lag(42)
    metrics.retry()

    def values(name, method):
        return [(value, tags) for n, m, value, tags in calls if n == name and m == method]

    events = {tags["outcome"]: value for value, tags in values("hstu_stream_events_total", "inc")}
    assert events == {"valid": 9, "invalid": 1, "applied": 8, "skipped": 1}
    assert [v for v, _ in values("hstu_stream_batches_total", "inc")] == [1.0]
    assert [v for v, _ in values("hstu_stream_retries_total", "inc")] == [1.0]
    assert [v for v, _ in values("hstu_stream_lag_events", "set")] == [42]
    assert [v for v, _ in values("hstu_stream_batch_seconds", "observe")] == [0.2]
    # One observation per percentile (10, 25, 50, 75, 90, 99) of the batch's freshness.
    fresh = [v for v, _ in values("hstu_stream_freshness_seconds", "observe")]
    assert np.allclose(fresh, np.percentile([0.1, 0.3], [10, 25, 50, 75, 90, 99]))
    (p99,) = [v for v, _ in values("hstu_stream_freshness_p99_seconds", "set")]
    assert p99 == np.percentile([0.1, 0.3], 99)
    # Default tags name the source and group on every metric.
    assert metrics.batches.info["default_tags"] == {"source": "kafka://127.0.0.1:9092/engagements", "group": "g"}
