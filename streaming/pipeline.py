"""The micro-batch loop: Kafka (or a recorded log) -> Ray Data -> Feast, offline store, DLQ, feed.

One iteration:

1. plan a bounded range from the job's position to each partition's current end, capped at
   `max_batch_events` (streaming/sources.py);
2. read and decode it with Ray Data: one read task per partition, which decodes its block
   (`decode_block`) before handing it over. While the job is behind (this batch was capped at
   `max_batch_events`), the range after it (to the partitions' ends at that moment) is read ahead
   in a background thread as soon as this batch is in hand, so its Ray Data execution overlaps
   steps 3-7 of this batch (`read_ahead`);
3. split valid events from dead letters and order the events by (user, ts_ms, offset);
4. read the touched users' sequences from Feast in one batched call, apply the events
   (watermarks skip what was applied before), write the changed sequences in one batched call.
   Users this job wrote recently are read from its write-through cache instead
   (features/sequence_cache.py; `sequence_cache_events`), which a failed batch clears;
5. append the valid events to the offline store, send the dead letters and flush them;
6. hand the training examples to the feed (streaming/training_feed.py), which coalesces them
   per user and never makes the job wait: features never wait for training;
7. commit the offsets that every sink made durable.

A crash anywhere replays from the committed offsets; the watermarks in Feast and the offline
store's file names make the replay change nothing (see tests/streaming/test_pipeline.py, which
SIGKILLs the job at each point of `CRASH_POINTS`). Transient failures (broker down, a read task
that times out, a locked SQLite file) retry the same range after `retry_backoff_s`.

    >>> from streaming.config import load_job_config
    >>> from streaming.pipeline import StreamJob
    >>> job = StreamJob(load_job_config(overrides=["source=log://.state/logs/ml-100k.parquet",
    ...                                            "stop_when_idle=true"]))
    >>> summary = job.run()
    >>> summary.valid_events
    100000
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from config.logs import third_party_deprecations
from features.redis_pipe import RedisAuthError
from features.redis_security import RedisSecurityError
from features.redis_security import describe as describe_redis
from features.sequence_batch import take_users
from features.sequence_cache import SequenceCache
from features.sequences import SequenceStore, SequenceStoreConfig
from streaming.config import StreamJobConfig
from streaming.decode import DECODED_SCHEMA, decode_block, order_events, split_decoded
from streaming.events import DecodeConfig
from streaming.kafka_security import check_broker, classify_client_error, security_cause
from streaming.kafka_security import describe as describe_kafka
from streaming.kafka_source import KafkaSourceError
from streaming.metrics import JobMetrics, ProgressLine
from streaming.offsets import CommitFrontier, FileOffsets, KafkaGroupOffsets, Offsets, OffsetStore
from streaming.sequence_update import apply_events, touched_users, training_examples
from streaming.sinks import FileDeadLetters, KafkaDeadLetters, OfflineStore
from streaming.sources import BatchRange, MicroBatchSource, collect, open_source, plan_range

log = logging.getLogger("streaming.job")

# Named points where `--crash-at POINT[@N]` makes the job SIGKILL itself (the N-th time it gets
# there): the crash-recovery tests use every one of them.
CRASH_POINTS = (
    "after_read",  # batch read and decoded, nothing written
    "mid_feast_write",  # half of the changed users' sequences written
    "after_feast_write",  # all sequences written; offline store, DLQ and commit not yet
    "after_sinks",  # offline store and DLQ durable too; offsets not committed
    "during_commit",  # half of the partitions' offsets committed
    "after_commit",  # offsets committed
)


class CrashPlanError(ValueError):
    """A `--crash-at` value that names no crash point."""


@dataclass(frozen=True)
class CrashPlan:
    """Kill the process with SIGKILL the `at`-th time it reaches `point` (fault injection)."""

    point: str
    at: int = 1

    @classmethod
    def parse(cls, text: str) -> CrashPlan:
        """`after_feast_write` or `after_feast_write@3`."""
        point, _, at = text.partition("@")
        if point not in CRASH_POINTS:
            raise CrashPlanError(f"crash point {point!r} is not one of {list(CRASH_POINTS)}")
        if at and (not at.isdigit() or int(at) < 1):
            raise CrashPlanError(f"crash count {at!r} in {text!r} must be a positive integer")
        return cls(point=point, at=int(at) if at else 1)


class _Crasher:
    def __init__(self, plan: CrashPlan | None) -> None:
        self.plan = plan
        self.hits = 0

    def due(self, point: str) -> bool:
        if self.plan is None or point != self.plan.point:
            return False
        self.hits += 1
        return self.hits == self.plan.at

    def kill(self) -> None:
        log.warning("crash point %s reached (hit %d): SIGKILL", self.plan.point if self.plan else "?", self.hits)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def point(self, point: str) -> None:
        if self.due(point):
            self.kill()


@dataclass
class JobSummary:
    """What a run did; `run()` returns it and the CLI prints it as one JSON line."""

    batches: int = 0
    records: int = 0
    valid_events: int = 0
    invalid_events: int = 0
    applied_events: int = 0
    skipped_events: int = 0
    partition_moves: int = 0
    users_written: int = 0
    offline_rows: int = 0
    examples: int = 0
    read_ahead_batches: int = 0  # batches whose records were read while the previous one was applied
    users_read_cached: int = 0  # touched users whose sequence came from the job's write-through cache
    users_read_feast: int = 0  # touched users read from Feast
    retries: int = 0
    seconds: float = 0.0
    active_seconds: float = 0.0  # from the start of the first batch to the end of the last
    committed: Offsets = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    freshness_p50_s: float | None = None
    freshness_p99_s: float | None = None
    freshness_clock: str = ""  # "wall" or "log" (see StreamJobConfig.freshness_clock)
    stopped_by: str = ""

    @property
    def events_per_s(self) -> float:
        """Records per second of active processing (start-up and idle time excluded)."""
        return self.records / self.active_seconds if self.active_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["committed"] = {str(p): o for p, o in sorted(self.committed.items())}
        out["events_per_s"] = round(self.events_per_s, 1)
        return out


def _retryable() -> tuple[type[BaseException], ...]:
    from kafka.errors import KafkaError
    from ray.exceptions import RayError

    kinds: list[type[BaseException]] = [
        KafkaError,
        RayError,
        KafkaSourceError,
        ConnectionError,
        TimeoutError,
        sqlite3.OperationalError,
    ]
    try:
        import redis

        kinds.append(redis.exceptions.ConnectionError)
    except ImportError:  # redis is only needed for the Redis online store
        pass
    return tuple(kinds)


def init_ray(config: StreamJobConfig) -> bool:
    """Start (or join) Ray as the config says, unless this process already did; True if it did now."""
    import ray

    if ray.is_initialized():
        return False
    if config.ray.address:
        ray.init(address=config.ray.address, namespace=config.feed.namespace, log_to_driver=False)
    else:
        ray.init(
            num_cpus=config.ray.num_cpus,
            object_store_memory=config.ray.object_store_mb * 2**20,
            include_dashboard=False,
            namespace=config.feed.namespace,
            log_to_driver=False,
        )
    return True


def _quiet_ray_data() -> None:
    import ray.data

    with third_party_deprecations():  # Ray Data 2.60's DataContext warns about its own defaults
        ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


class StreamJob:
    """The streaming job: build it from a config, `run()` it; `stop()` (or SIGTERM) ends it after
    the batch in hand."""

    def __init__(
        self, config: StreamJobConfig, *, crash: CrashPlan | None = None, handle_signals: bool = False
    ) -> None:
        """handle_signals: SIGTERM and SIGINT call `stop()` (the CLI; main thread only). They are
        installed after `ray.init`, which installs its own SIGTERM handler."""
        self.config = config
        self._handle_signals = handle_signals
        self._crash = _Crasher(crash)
        self._stop = threading.Event()
        self._stop_reason = ""
        self.summary = JobSummary()
        self._freshness: list[np.ndarray] = []
        self._log_clock_ms = np.iinfo(np.int64).min  # newest record timestamp applied (freshness_clock "log")
        self._first_batch_at: float | None = None
        self.metrics: JobMetrics | None = None
        self._read_ahead: _ReadAhead | None = None
        self._pace_start: float | None = None
        self._paced_records = 0

    # --- control --------------------------------------------------------------------------------
    def stop(self, reason: str = "stop()") -> None:
        """Finish the batch in hand, commit what is durable, then return from `run()`."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            log.info("%s received: finishing the batch in hand", signal.Signals(signum).name)
            self.stop(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # --- setup ----------------------------------------------------------------------------------
    def _open(self) -> None:
        cfg = self.config
        spec = cfg.source_spec()
        self.source: MicroBatchSource = open_source(cfg)
        self.source_kind = spec.kind
        self.freshness_clock = "log" if spec.kind == "log" else cfg.freshness_clock
        self.summary.freshness_clock = self.freshness_clock
        state = cfg.job_state_dir()
        self.offline = OfflineStore(state / "offline", actions=cfg.actions, writers=cfg.offline_writers)
        if spec.kind == "kafka":
            security = cfg.kafka.security
            self.offsets: OffsetStore = KafkaGroupOffsets(
                spec.bootstrap,
                spec.topic,
                cfg.group_id,
                request_timeout_ms=cfg.kafka.request_timeout_ms,
                security=security,
            )
            self.dlq = KafkaDeadLetters(
                spec.bootstrap,
                cfg.dlq_topic,
                source_topic=spec.topic,
                request_timeout_ms=cfg.kafka.request_timeout_ms,
                security=security,
            )
        else:
            self.offsets = FileOffsets(state / "offsets.json", topic=self.source.topic)
            self.dlq = FileDeadLetters(state / "dlq", source_topic=self.source.topic)
        self.store = SequenceStore(
            SequenceStoreConfig(
                max_len=cfg.max_len,
                online_store=cfg.feast.online_store,
                redis_address=cfg.feast.redis_address,
                state_dir=cfg.feast.state_dir,
                bulk_io=cfg.feast.bulk_io,
                redis_security=cfg.feast.redis_security,
            )
        )
        _ = self.store.feature_store  # apply the Feast repository now, not inside the first batch
        self.cache = SequenceCache(max_events=cfg.sequence_cache_events)
        self.feed = None
        if cfg.feed.enabled:
            from streaming.training_feed import TrainingFeed

            self.feed = TrainingFeed(
                actor_name=cfg.feed.actor_name, namespace=cfg.feed.namespace, max_users=cfg.feed.max_users
            )
        self.decode = DecodeConfig(max_value_bytes=cfg.max_value_bytes, max_future_skew_ms=cfg.max_future_skew_ms)
        self.metrics = JobMetrics(source=self.source.description, group=cfg.group_id)
        self.progress = ProgressLine(every_s=cfg.progress_every_s, clock=self.freshness_clock)

    def _start_position(self) -> Offsets:
        parts = self.source.list_parts()
        committed = self.offsets.committed(parts)
        fallback = (
            self.source.beginning_offsets() if self.config.start_from == "earliest" else self.source.end_offsets()
        )
        position = {p: committed.get(p, fallback[p]) for p in parts}
        log.info(
            "%s: resuming group %r at %s (%d partitions committed)",
            self.source.description,
            self.config.group_id,
            position,
            len(committed),
        )
        return position

    def _check_security(self, exc: BaseException | None = None) -> None:
        """Raise the security error behind a failure, if there is one: the job stops on it at once
        (no retry fixes a wrong password). `exc` None: probe the broker before the first use
        (streaming/kafka_security.py `check_broker`), so that a broker which refuses this client
        says why instead of timing out."""
        cause = security_cause(exc) if exc is not None else None
        if cause is not None:
            raise cause from exc
        if exc is not None and isinstance(exc, (RedisSecurityError, RedisAuthError)):
            raise exc
        spec = self.config.source_spec()
        if spec.kind != "kafka" or (exc is not None and self.config.kafka.security.protocol == "PLAINTEXT"):
            return  # after the first check, only a secured broker is asked again (a password may change)
        refused = classify_client_error(exc, spec.bootstrap, self.config.kafka.security) if exc is not None else None
        if refused is not None:  # a client library that said so itself (librdkafka does)
            raise refused from exc
        try:
            check_broker(
                spec.bootstrap, self.config.kafka.security, timeout_s=min(10.0, self.config.kafka.read_timeout_s)
            )
        except ConnectionError as probe:  # unreachable: the normal retries handle it
            log.debug("security check of %s: %s", spec.bootstrap, probe)

    def _with_retries(self, what: str, call):
        retryable = _retryable()
        failures = 0
        while True:
            try:
                return call()
            except retryable as exc:
                self._check_security(exc)  # a refused login or a TLS mismatch is fatal
                failures += 1
                self.summary.retries += 1
                if self.metrics is not None:
                    self.metrics.retry()
                if failures >= self.config.max_consecutive_failures:
                    raise
                log.warning(
                    "%s failed (%d in a row), retrying in %.1f s: %s",
                    what,
                    failures,
                    self.config.retry_backoff_s,
                    str(exc).splitlines()[0][:300],
                )
                if self._stop.wait(self.config.retry_backoff_s) and what != "commit":
                    raise _Stopped() from None

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> JobSummary:
        """Process micro-batches until stopped (signal, `stop()`, idle or max_batches).

        Raises KafkaSecurityError (streaming/kafka_security.py) or RedisSecurityError when a
        server refuses this job: credentials missing or wrong, TLS that does not match."""
        if self.config.source_spec().kind == "kafka":
            log.info("kafka security: %s", describe_kafka(self.config.kafka.security))
        if self.config.feast.online_store == "redis":
            log.info("redis security: %s", describe_redis(self.config.feast.redis_security))
        self._check_security()  # before Ray starts: a refused job fails in seconds
        started_ray = init_ray(self.config)
        _quiet_ray_data()
        if self._handle_signals:
            self._install_signal_handlers()
        t_start = time.monotonic()
        try:
            self._with_retries("connecting", self._open)  # the broker may not be up yet
            self.position = self._with_retries("reading committed offsets", self._start_position)
            self.frontier = CommitFrontier(self.position)
            self.summary.committed = dict(self.position)
            if self.config.read_ahead:
                self._read_ahead = _ReadAhead(settle_timeout_s=self.config.kafka.read_timeout_s + 30)
            self._loop()
        except _Stopped:
            pass
        finally:
            if self._read_ahead is not None:
                self._read_ahead.close()  # no Ray Data execution may outlive the job
            self.summary.seconds = time.monotonic() - t_start
            if self._freshness:
                fresh = np.concatenate(self._freshness)
                self.summary.freshness_p50_s = round(float(np.percentile(fresh, 50)), 4)
                self.summary.freshness_p99_s = round(float(np.percentile(fresh, 99)), 4)
            self.summary.stopped_by = self._stop_reason or "error"
            self._close()
            if started_ray:
                import ray

                ray.shutdown()
        return self.summary

    def _loop(self) -> None:
        cfg = self.config
        batch_id = 0
        while not self._stop.is_set():
            ends = self._with_retries("reading end offsets", self.source.end_offsets)
            self.metrics.lag(sum(max(0, ends[p] - self.position.get(p, 0)) for p in ends))
            ahead = self._read_ahead.take(self.position) if self._read_ahead is not None else None
            rng = ahead[0] if ahead is not None else plan_range(self.position, ends, max_events=self._batch_cap())
            if rng is None:
                self._with_retries("commit", self._commit)
                if self.feed is not None:
                    self.feed.set_idle(self.frontier.pending == 0)  # caught up with the source
                if cfg.stop_when_idle and self.frontier.pending == 0 and self.frontier.committable() is None:
                    self.stop("idle")
                    break
                self.progress.maybe_print(self._progress_fields(ends))
                self._stop.wait(cfg.interval_s)
                continue
            batch_id += 1
            # The read ahead serves the first attempt only: a retry reads the range again.
            first_read = [ahead[1]] if ahead is not None else []
            self._with_retries(
                f"batch {batch_id} ({rng.describe()})",
                lambda: self._process(batch_id, rng, first_read.pop() if first_read else None),  # noqa: B023 (called now)
            )
            self.position = dict(rng.end)
            self._with_retries("commit", self._commit)
            self.progress.maybe_print(self._progress_fields(ends))
            if cfg.max_batches is not None and batch_id >= cfg.max_batches:
                self.stop("max_batches")
            elif cfg.max_events_per_s is not None:
                self._pace(rng.num_offsets)
            elif rng.num_offsets < cfg.max_batch_events:
                self._stop.wait(cfg.interval_s)  # caught up: wait for the next interval
        if self.frontier.pending or self.frontier.committable():
            self._with_retries("commit", self._commit)

    def _batch_cap(self) -> int:
        cfg = self.config
        if cfg.max_events_per_s is None:
            return cfg.max_batch_events
        return max(1, min(cfg.max_batch_events, int(cfg.max_events_per_s * cfg.interval_s)))

    def _pace(self, records: int) -> None:
        """max_events_per_s: wait until the records read so far are due at that rate."""
        self._paced_records += records
        if self._pace_start is None:
            self._pace_start = time.monotonic()
        due = self._pace_start + self._paced_records / self.config.max_events_per_s
        self._stop.wait(max(0.0, due - time.monotonic()))

    def _dataset(self, rng: BatchRange):
        """The batch as a (lazy) Ray Dataset of decoded blocks; built on the job's thread."""
        return self.source.read(rng, functools.partial(decode_block, actions=self.config.actions, decode=self.decode))

    def _start_read_ahead(self, rng: BatchRange) -> None:
        """Start reading the range after `rng`, up to the partitions' current ends. A failure
        here only means no read-ahead: the loop plans and reads that range itself."""
        try:
            nxt = plan_range(rng.end, self.source.end_offsets(), max_events=self.config.max_batch_events)
            if nxt is not None:
                self._read_ahead.start(nxt, lambda: self._dataset(nxt))
        except _retryable() as exc:
            log.debug("no read-ahead after %s: %r", rng.describe(), exc)

    def _process(self, batch_id: int, rng: BatchRange, read_ahead: Future | None = None) -> None:
        """Apply one micro-batch. read_ahead: its records, already being read in the background."""
        try:
            self._apply_batch(batch_id, rng, read_ahead)
        except BaseException:
            # Feast may now be ahead of the cache (a partial write): read from Feast again.
            self.cache.clear()
            raise

    def _apply_batch(self, batch_id: int, rng: BatchRange, read_ahead: Future | None) -> None:
        cfg, s = self.config, self.summary
        timer = _Stages(s.stage_seconds)
        t0 = time.monotonic()
        if self._first_batch_at is None:
            self._first_batch_at = t0

        # read_decode: the time this loop waits for the records (less than the read itself when
        # the read ran ahead, overlapping the previous batch).
        decoded = read_ahead.result() if read_ahead is not None else collect(self._dataset(rng), DECODED_SCHEMA)
        s.read_ahead_batches += read_ahead is not None
        self.source.check_complete(rng, decoded)
        timer.lap("read_decode")
        if self._read_ahead is not None and rng.num_offsets >= cfg.max_batch_events:
            self._start_read_ahead(rng)  # behind: read the next batch meanwhile
        self._crash.point("after_read")

        valid, letters = split_decoded(decoded)
        ordered = order_events(valid)
        users = touched_users(ordered)
        timer.lap("order")
        hits_before = self.cache.hits
        current = self.cache.read_through(users, self.store.read_many)
        cached = self.cache.hits - hits_before
        timer.lap("feast_read")
        update = apply_events(current, ordered, max_len=cfg.max_len)
        changed = update.changed_sequences()
        timer.lap("apply")
        if self._crash.due("mid_feast_write"):
            self.store.write_many(take_users(changed, np.arange(len(changed) // 2)))
            self._crash.kill()
        self.store.write_many(changed)
        written_ms = time.time_ns() // 1_000_000
        # Every touched user: written, or as read (the stored row, cut to max_len if a run with a
        # larger max_len wrote it, which the next write would cut too).
        self.cache.put(update.sequences)
        timer.lap("feast_write")
        self._crash.point("after_feast_write")

        offline_rows = self.offline.append(valid)
        timer.lap("offline")
        self.dlq.send(letters)
        self.dlq.flush()
        timer.lap("dlq")
        self._crash.point("after_sinks")

        examples = 0
        if self.feed is not None:
            batch = training_examples(update)
            self.feed.publish(rng.start, rng.end, batch, rolled_out=update.rolled_out)
            examples = len(batch)
            timer.lap("feed")
        self.frontier.add_batch(batch_id, rng.end)
        self.frontier.mark_durable(batch_id)

        # Freshness: from the record's timestamp (producer time) to the Feast write, on the wall
        # clock; for a recorded log, on the log's own clock (its newest record timestamp so far).
        record_ms = valid.column("timestamp_ms").to_numpy()
        if self.freshness_clock == "log" and len(record_ms):
            self._log_clock_ms = max(self._log_clock_ms, int(record_ms.max()))
            written_ms = self._log_clock_ms
        fresh = (written_ms - record_ms) / 1000.0
        if len(fresh):
            self._freshness.append(fresh.astype(np.float32))
        seconds = time.monotonic() - t0
        log.debug(
            "batch %d: %d records (%s) in %.2f s: %s",
            batch_id,
            decoded.num_rows,
            rng.describe(),
            seconds,
            " ".join(f"{k} {v:.2f}" for k, v in timer.last.items()),
        )
        s.active_seconds = time.monotonic() - self._first_batch_at
        s.batches += 1
        s.records += decoded.num_rows
        s.valid_events += valid.num_rows
        s.invalid_events += letters.num_rows
        s.applied_events += update.applied
        s.skipped_events += update.skipped
        s.partition_moves += update.partition_moves
        s.users_written += len(changed)
        s.users_read_cached += cached
        s.users_read_feast += len(users) - cached
        s.offline_rows += offline_rows
        s.examples += examples
        self.metrics.batch(
            records=decoded.num_rows,
            valid=valid.num_rows,
            invalid=letters.num_rows,
            applied=update.applied,
            skipped=update.skipped,
            seconds=seconds,
            freshness=fresh,
        )
        self.progress.add(records=decoded.num_rows, invalid=letters.num_rows, skipped=update.skipped, freshness=fresh)
        if update.partition_moves:
            log.warning(
                "batch %d: %d events came from another partition than their user's watermark",
                batch_id,
                update.partition_moves,
            )

    def _commit(self) -> None:
        offsets = self.frontier.committable()
        if offsets is None:
            return
        if self._crash.due("during_commit"):
            first = dict(sorted(offsets.items())[: max(1, len(offsets) // 2)])
            self.offsets.commit(first)
            self._crash.kill()
        self.offsets.commit(offsets)
        self.frontier.committed(offsets)
        self.summary.committed.update(offsets)
        self._crash.point("after_commit")

    def _progress_fields(self, ends: Offsets) -> dict:
        lag = sum(max(0, ends[p] - self.summary.committed.get(p, 0)) for p in ends)
        return {"lag": lag, "pending": self.frontier.pending, "batches": self.summary.batches}

    def _close(self) -> None:
        for name in ("source", "offsets", "dlq", "offline"):
            thing = getattr(self, name, None)
            if thing is not None:
                try:
                    thing.close()
                except Exception as exc:  # closing must not hide the run's own error
                    log.warning("closing %s: %r", name, exc)
        if getattr(self, "feed", None) is not None:
            try:
                self.feed.close()
            except Exception as exc:
                log.warning("closing the training feed: %r", exc)
        if getattr(self, "store", None) is not None:
            self.store.close()


class _ReadAhead:
    """One micro-batch read running in a background thread (Ray Data executes it there; the
    Dataset itself is built on the job's thread, where the sources keep their state)."""

    def __init__(self, *, settle_timeout_s: float = 60.0) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
        self._pending: tuple[BatchRange, Future] | None = None
        self.settle_timeout_s = settle_timeout_s

    def start(self, rng: BatchRange, build) -> None:
        """Read `rng`: `build()` returns its Dataset (called here, on the job's thread)."""
        if self._pending is not None and self._pending[0] == rng:
            return  # a retried batch asks again for the read it already started
        self.discard()
        self._pending = (rng, self._pool.submit(collect, build(), DECODED_SCHEMA))

    def take(self, position: Offsets) -> tuple[BatchRange, Future] | None:
        """The read that starts at `position`, if one was started; any other is dropped."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending[0].start == position:
            return pending
        _settle(pending[1], self.settle_timeout_s)
        return None

    def discard(self) -> None:
        if self._pending is not None:
            _settle(self._pending[1], self.settle_timeout_s)
            self._pending = None

    def close(self) -> None:
        """Wait (bounded) for a read in flight, then stop the thread."""
        try:
            self.discard()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _settle(future: Future, timeout_s: float) -> None:
    """Wait, at most `timeout_s`, for a read nobody will use; its error no longer matters."""
    try:
        future.result(timeout=timeout_s)
    except Exception as exc:  # its own failure, or still running after the timeout
        log.debug("a discarded read-ahead did not finish cleanly: %r", exc)


class _Stopped(Exception):
    """Raised out of a retry wait when the job is asked to stop."""


class _Stages:
    """Adds the time since the last lap to `totals[name]`."""

    def __init__(self, totals: dict[str, float]) -> None:
        self.totals = totals
        self.last: dict[str, float] = {}
        self.t = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.last[name] = now - self.t
        self.totals[name] = round(self.totals.get(name, 0.0) + now - self.t, 4)
        self.t = now
