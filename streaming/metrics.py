"""What the streaming job reports: Ray metrics (exported by Ray's metrics agent to Prometheus) and
a progress line on stderr.

Metrics (tags: `source`, `group`; `outcome` on the event counter):

    hstu_stream_events_total{outcome=valid|invalid|applied|skipped}   counter
    hstu_stream_batches_total                                         counter
    hstu_stream_retries_total                                         counter
    hstu_stream_lag_events                                            gauge: offsets not yet read
    hstu_stream_batch_seconds                                         histogram
    hstu_stream_freshness_seconds                                     histogram: record timestamp -> Feast write
                                                                      (wall clock, or the log's own: freshness_clock)
    hstu_stream_freshness_p99_seconds                                 gauge: of the last batch

The progress line, every `progress_every_s`:

    streaming: 12 batches | 51,204 ev/s | 3 dlq, 0 skipped | lag 120,431 | freshness p50 0.62 s p99 1.31 s | pending 0
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger("streaming.job")

FRESHNESS_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0]
BATCH_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]


class JobMetrics:
    """The job's Ray metrics; create after `ray.init`."""

    def __init__(self, *, source: str, group: str) -> None:
        from ray.util import metrics

        tags = {"source": source, "group": group}
        keys = ("source", "group")
        self.events = metrics.Counter(
            "hstu_stream_events_total", "Events seen by the streaming job, by outcome", tag_keys=keys + ("outcome",)
        )
        self.events.set_default_tags(tags)
        self.batches = metrics.Counter("hstu_stream_batches_total", "Micro-batches applied", tag_keys=keys)
        self.batches.set_default_tags(tags)
        self.retries = metrics.Counter(
            "hstu_stream_retries_total", "Batch or commit attempts that failed and were retried", tag_keys=keys
        )
        self.retries.set_default_tags(tags)
        self.lag_gauge = metrics.Gauge(
            "hstu_stream_lag_events", "Offsets between the job's position and the end", tag_keys=keys
        )
        self.lag_gauge.set_default_tags(tags)
        self.batch_seconds = metrics.Histogram(
            "hstu_stream_batch_seconds", "Time to apply one micro-batch", boundaries=BATCH_BOUNDARIES, tag_keys=keys
        )
        self.batch_seconds.set_default_tags(tags)
        self.freshness = metrics.Histogram(
            "hstu_stream_freshness_seconds",
            "Record timestamp to Feast write, per event",
            boundaries=FRESHNESS_BOUNDARIES,
            tag_keys=keys,
        )
        self.freshness.set_default_tags(tags)
        self.freshness_p99 = metrics.Gauge(
            "hstu_stream_freshness_p99_seconds", "p99 freshness of the last batch", tag_keys=keys
        )
        self.freshness_p99.set_default_tags(tags)

    def batch(
        self,
        *,
        records: int,
        valid: int,
        invalid: int,
        applied: int,
        skipped: int,
        seconds: float,
        freshness: np.ndarray,
    ) -> None:
        for outcome, n in (("valid", valid), ("invalid", invalid), ("applied", applied), ("skipped", skipped)):
            if n:
                self.events.inc(n, tags={"outcome": outcome})
        self.batches.inc()
        self.batch_seconds.observe(seconds)
        if len(freshness):
            # A histogram takes one value per call: observe the batch's percentiles, not every event.
            for q in (10, 25, 50, 75, 90, 99):
                self.freshness.observe(float(np.percentile(freshness, q)))
            self.freshness_p99.set(float(np.percentile(freshness, 99)))

    def lag(self, events: int) -> None:
        self.lag_gauge.set(events)

    def retry(self) -> None:
        self.retries.inc()


class ProgressLine:
    """Accumulates batches and logs one line every `every_s` seconds."""

    def __init__(self, *, every_s: float, clock: str = "wall") -> None:
        self.every_s = every_s
        self.label = "freshness" if clock == "wall" else f"freshness ({clock} clock)"
        self.t_last = time.monotonic()
        self._reset()

    def _reset(self) -> None:
        self.records = self.invalid = self.skipped = 0
        self.fresh: list[np.ndarray] = []

    def add(self, *, records: int, invalid: int, skipped: int, freshness: np.ndarray) -> None:
        self.records += records
        self.invalid += invalid
        self.skipped += skipped
        if len(freshness):
            self.fresh.append(freshness)

    def maybe_print(self, fields: dict) -> None:
        now = time.monotonic()
        if now - self.t_last < self.every_s:
            return
        rate = self.records / (now - self.t_last)
        if self.fresh:
            f = np.concatenate(self.fresh)
            fresh = f"{self.label} p50 {np.percentile(f, 50):.2f} s p99 {np.percentile(f, 99):.2f} s"
        else:
            fresh = f"{self.label} -"
        log.info(
            "streaming: %d batches | %s ev/s | %d dlq, %d skipped | lag %s | %s | pending %d",
            fields["batches"],
            f"{rate:,.0f}",
            self.invalid,
            self.skipped,
            f"{fields['lag']:,}",
            fresh,
            fields["pending"],
        )
        self.t_last = now
        self._reset()
