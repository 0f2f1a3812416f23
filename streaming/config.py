"""Settings of the streaming job, as frozen dataclasses loaded with the project's config loader.

    >>> from streaming.config import load_job_config
    >>> cfg = load_job_config("streaming/configs/default.yaml", ["max_len=50", "feast.online_store=redis"])
    >>> cfg.max_len, cfg.feast.online_store, cfg.source_spec().kind
    (50, 'redis', 'kafka')

`source` is a URL: `kafka://HOST:PORT/TOPIC` reads a broker, `log://PATH.parquet` a recorded
Kafka log (streaming/recorded_log.py). Unknown keys and wrong types are rejected by
`config.loader.load_config` with the dotted key; the checks below reject values that type-check
but cannot work, before any work starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from config.loader import ConfigError, load_config
from config.paths import REPO_ROOT, state_dir
from features.redis_security import RedisSecurityConfig
from streaming.kafka_security import KafkaSecurityConfig

CONFIG_DIR = REPO_ROOT / "streaming" / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class JobConfigError(ConfigError):
    """A streaming-job setting that type-checks but cannot work; the message says what to change."""


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    """A parsed `source` URL: kind "kafka" (bootstrap + topic) or "log" (path)."""

    kind: Literal["kafka", "log"]
    bootstrap: str = ""
    topic: str = ""
    path: Path | None = None


def parse_source(url: str) -> SourceSpec:
    """`kafka://127.0.0.1:9092/engagements` or `log://path/to/log.parquet` (relative to the cwd).

    >>> parse_source("kafka://127.0.0.1:9092/engagements").topic
    'engagements'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise JobConfigError(f"source {url!r} has no scheme: write kafka://HOST:PORT/TOPIC or log://PATH.parquet")
    if scheme == "kafka":
        bootstrap, slash, topic = rest.partition("/")
        host, colon, port = bootstrap.rpartition(":")
        if not slash or not topic or "/" in topic or not colon or not host or not port.isdigit():
            raise JobConfigError(
                f"source {url!r} is not kafka://HOST:PORT/TOPIC (e.g. kafka://127.0.0.1:9092/engagements)"
            )
        return SourceSpec(kind="kafka", bootstrap=bootstrap, topic=topic)
    if scheme == "log":
        if not rest:
            raise JobConfigError(f"source {url!r} names no file: write log://PATH.parquet")
        return SourceSpec(kind="log", path=Path(rest))
    raise JobConfigError(f"source {url!r}: scheme {scheme!r} is not one of kafka, log")


@dataclass(frozen=True, kw_only=True)
class FeastConfig:
    """The online store holding the sequences (features/sequences.py)."""

    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_address: str = "127.0.0.1:6379"
    # Password (from an environment variable or a file) and TLS of the Redis server.
    redis_security: RedisSecurityConfig = field(default_factory=RedisSecurityConfig)
    state_dir: Path | None = None  # None: the checkout's .state/feast/
    bulk_io: bool = True  # rows built and parsed with numpy (features/online_rows.py), same bytes


@dataclass(frozen=True, kw_only=True)
class FeedConfig:
    """The training feed (streaming/training_feed.py): off unless a trainer reads it.

    enabled: put every micro-batch's training examples into the named feed actor. The job never
      waits for the trainer: the feed coalesces what is not trained yet, per user.
    max_users: bound on the users with untrained events the feed holds; past it, the users
      waiting longest are dropped and their events counted as untrained.
    actor_name / namespace: where trainers find it (`ray.get_actor(actor_name, namespace=namespace)`).
    """

    enabled: bool = False
    max_users: int = 1_000_000
    actor_name: str = "hstu-training-feed"
    namespace: str = "hstu"


@dataclass(frozen=True, kw_only=True)
class KafkaReadConfig:
    """How micro-batches are fetched from a broker.

    check_crcs: verify record CRCs in the client (kafka-python does it in pure Python, which
      halves its fetch rate); off by default because the broker checks them on produce and TCP
      checksums every hop.
    read_timeout_s: a partition read that makes no progress for this long fails the batch, which
      is then retried (a broker restart looks like this).
    reader: "confluent-kafka" (default: our range datasource on confluent-kafka),
      "kafka-python" (the same on kafka-python, ~5x slower here) or "ray-read-kafka", Ray Data's
      own `ray.data.read_kafka` (see streaming/kafka_source.py).
    security: TLS and SASL of every Kafka client of the job (streaming/kafka_security.py);
      PLAINTEXT, without authentication, by default.
    """

    reader: Literal["confluent-kafka", "kafka-python", "ray-read-kafka"] = "confluent-kafka"
    check_crcs: bool = False
    read_timeout_s: float = 20.0
    request_timeout_ms: int = 15_000
    max_partition_fetch_bytes: int = 8 * 1024 * 1024
    security: KafkaSecurityConfig = field(default_factory=KafkaSecurityConfig)

    def __post_init__(self) -> None:
        if self.reader == "ray-read-kafka" and self.security.protocol != "PLAINTEXT":
            # read_kafka takes the credentials as task arguments, which Ray serializes and
            # stores: a password would leave the process that read it.
            raise JobConfigError(
                f"kafka.reader ray-read-kafka cannot read from a {self.security.protocol} broker without putting "
                "the password into Ray's task arguments: use reader confluent-kafka or kafka-python"
            )


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """Ray to start (address None: a local instance sized for a small machine) or to join."""

    address: str | None = None
    num_cpus: int = 4
    object_store_mb: int = 512


@dataclass(frozen=True, kw_only=True)
class StreamJobConfig:
    """Everything `python -m streaming.job` needs; see streaming/configs/default.yaml.

    interval_s: how often to look for new events once caught up (a full batch is followed at once
      by the next). max_batch_events: cap on one micro-batch over all partitions.
    offline_writers: threads writing (and fsyncing) the offline store's files of one batch.
    state_dir: offsets of log sources, the offline store and the dead-letter files of log sources
      (None: `.state/streaming/<group_id>/`).
    stop_when_idle: exit once every partition's end (at the time of the check) is applied and
      committed; for replays and tests. max_batches: exit after this many micro-batches.
    read_ahead: while behind (a batch capped at max_batch_events), read the next range (to the
      partitions' ends then) in a background thread while this batch is applied
      (streaming/pipeline.py). Caught up, batches keep their `interval_s` pacing.
    max_events_per_s: pace the job at most at this rate (batches of at most max_events_per_s *
      interval_s events, then a wait): to replay a recorded log at a steady rate. null: as fast as
      it goes.
    freshness_clock: what the freshness of an event (its record timestamp to its Feast write) is
      measured against. "wall": the wall clock, for live producers (record timestamps are when
      they sent the event). "log": the log's own clock, the newest record timestamp applied so
      far, for a recorded log replayed into a broker (its timestamps are from the recording, so
      the wall clock would report decades). A `log://` source always uses "log".
    sequence_cache_events: bound (in events, ~24 bytes each) of the in-memory copy of the
      sequences this job wrote, which serves the Feast read of users it wrote recently
      (features/sequence_cache.py). Exact while this job is the store's only writer, which the
      watermarks require anyway; 0 reads every user from Feast.
    """

    source: str = "kafka://127.0.0.1:9092/engagements"
    group_id: str = "hstu-streaming"
    actions: tuple[str, ...] = ("rate_1", "rate_2", "rate_3", "rate_4", "rate_5")
    max_len: int = 200
    interval_s: float = 1.0
    max_batch_events: int = 50_000
    offline_writers: int = 8
    start_from: Literal["earliest", "latest"] = "earliest"
    dlq_topic: str = "engagements.dlq"
    state_dir: Path | None = None
    max_value_bytes: int = 4096
    max_future_skew_ms: int | None = 300_000
    stop_when_idle: bool = False
    max_batches: int | None = None
    read_ahead: bool = True
    max_events_per_s: float | None = None
    freshness_clock: Literal["wall", "log"] = "wall"
    sequence_cache_events: int = 5_000_000
    progress_every_s: float = 5.0
    retry_backoff_s: float = 1.0
    max_consecutive_failures: int = 120
    kafka: KafkaReadConfig = field(default_factory=KafkaReadConfig)
    feast: FeastConfig = field(default_factory=FeastConfig)
    feed: FeedConfig = field(default_factory=FeedConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        parse_source(self.source)
        checks = [
            ("max_len", self.max_len, self.max_len >= 1, "at least 1"),
            ("interval_s", self.interval_s, self.interval_s > 0, "> 0"),
            ("max_batch_events", self.max_batch_events, self.max_batch_events >= 1, "at least 1"),
            ("offline_writers", self.offline_writers, self.offline_writers >= 1, "at least 1"),
            (
                "sequence_cache_events",
                self.sequence_cache_events,
                self.sequence_cache_events >= 0,
                ">= 0 (0 turns the cache off)",
            ),
            ("max_value_bytes", self.max_value_bytes, self.max_value_bytes >= 2, "at least 2"),
            ("progress_every_s", self.progress_every_s, self.progress_every_s > 0, "> 0"),
            ("retry_backoff_s", self.retry_backoff_s, self.retry_backoff_s >= 0, ">= 0"),
            (
                "max_consecutive_failures",
                self.max_consecutive_failures,
                self.max_consecutive_failures >= 1,
                "at least 1",
            ),
            ("feed.max_users", self.feed.max_users, self.feed.max_users >= 1, "at least 1"),
            ("kafka.read_timeout_s", self.kafka.read_timeout_s, self.kafka.read_timeout_s > 0, "> 0"),
            ("ray.num_cpus", self.ray.num_cpus, self.ray.num_cpus >= 1, "at least 1"),
            ("ray.object_store_mb", self.ray.object_store_mb, self.ray.object_store_mb >= 80, "at least 80"),
        ]
        for name, value, ok, want in checks:
            if not ok:
                raise JobConfigError(f"{name} ({value!r}) must be {want}")
        if self.max_events_per_s is not None and self.max_events_per_s <= 0:
            raise JobConfigError(f"max_events_per_s ({self.max_events_per_s}) must be > 0, or null for no pacing")
        if self.max_batches is not None and self.max_batches < 1:
            raise JobConfigError(f"max_batches ({self.max_batches}) must be at least 1, or null for no limit")
        if self.max_future_skew_ms is not None and self.max_future_skew_ms < 0:
            raise JobConfigError(f"max_future_skew_ms ({self.max_future_skew_ms}) must be >= 0, or null to turn it off")
        if not self.group_id or "/" in self.group_id:
            raise JobConfigError(f"group_id ({self.group_id!r}) must be a non-empty name without '/'")
        if not self.actions:
            raise JobConfigError("actions is empty: list the action vocabulary, e.g. [rate_1, rate_2]")

    def source_spec(self) -> SourceSpec:
        return parse_source(self.source)

    def job_state_dir(self) -> Path:
        """Where this job's own files live (offsets of log sources, offline store, DLQ files)."""
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            return self.state_dir
        return state_dir("streaming", self.group_id)


def load_job_config(path: str | Path | None = DEFAULT_CONFIG, overrides: Sequence[str] = ()) -> StreamJobConfig:
    """The job config from a YAML file (default: streaming/configs/default.yaml) plus overrides."""
    return load_config(StreamJobConfig, path, overrides)
