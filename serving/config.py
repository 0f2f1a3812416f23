"""The serving settings: frozen dataclasses, built with `config.loader` from the app's arguments.

`serve run serving.app:app registry=.state/registry` and `serve run serving/config.yaml` (its
`args:` mapping) both land here; dotted keys nest (`features.online_store=redis`). Ray Serve's
own settings (replicas, autoscaling, CPUs per replica) live in the Serve config file's
`deployments:` section, and the model version to follow is the deployment's `user_config`
(`{"version": "latest"}` or `{"version": 7}`, see `FollowConfig`).

    >>> from serving.config import ServingConfig, load_serving_config
    >>> config = load_serving_config({"registry": "/tmp/registry", "limits": {"max_candidates": 500}})
    >>> config.limits.max_candidates, config.features.online_store
    (500, 'sqlite')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from config.loader import ConfigError, from_dict, merge, parse_overrides
from config.paths import REPO_ROOT, state_dir
from features.redis_security import RedisSecurityConfig


@dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    """Where the users' sequences live: `features.sequences.SequenceStoreConfig`'s fields.

    redis_security: the Redis password (from an environment variable or a file, e.g.
    `features.redis_security.password_env=HSTU_REDIS_PASSWORD`) and TLS; see docs/security.md.
    state_dir None is the checkout's `.state/feast` (moved by HSTU_STATE_DIR), where the
    streaming job writes; a relative path is relative to the checkout.
    """

    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_address: str = "127.0.0.1:6379"
    redis_security: RedisSecurityConfig = field(default_factory=RedisSecurityConfig)
    state_dir: Path | None = None

    @property
    def state_path(self) -> Path | None:
        return _in_checkout(self.state_dir) if self.state_dir is not None else None


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """What one request may ask for; anything past these gets a 4xx naming the limit."""

    max_candidates: int = 2000
    max_recent_events: int = 1000
    max_k: int = 1000
    max_body_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        for name in ("max_candidates", "max_recent_events", "max_k", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name} ({getattr(self, name)}) must be >= 1")


@dataclass(frozen=True, kw_only=True)
class BatchingConfig:
    """`@serve.batch` across concurrent requests, and candidate micro-batches within one.

    max_batch_size requests (distinct users or not) share one feature read and one pass of the
    scorer; the batch closes after wait_timeout_s. micro_batch candidates are scored per call
    (bounds the [candidates x history] attention's memory; 512 is the fastest on the 2-core box).
    """

    max_batch_size: int = 8
    wait_timeout_s: float = 0.002
    micro_batch: int = 512

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.micro_batch < 1:
            raise ValueError(
                f"batching.max_batch_size ({self.max_batch_size}) and batching.micro_batch "
                f"({self.micro_batch}) must be >= 1"
            )
        if self.wait_timeout_s < 0:
            raise ValueError(f"batching.wait_timeout_s ({self.wait_timeout_s}) must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """The engagement score a ranking is ordered by.

    score = sum_a weights[a] * P(action a | user, item), the expected weight of the action the
    user would take on the item. The default, weights 1..5 over `rate_1`..`rate_5`, is the
    expected rating. `actions` names the model's action codes in the response; both must have
    the model's `num_actions` entries, or the version is refused.
    """

    actions: tuple[str, ...] = ("rate_1", "rate_2", "rate_3", "rate_4", "rate_5")
    weights: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0)

    def __post_init__(self) -> None:
        if len(self.actions) != len(self.weights) or not self.actions:
            raise ValueError(
                f"score.actions ({len(self.actions)} names) and score.weights ({len(self.weights)} values) "
                "must be non-empty and of equal length: one weight per action"
            )
        if len(set(self.actions)) != len(self.actions):
            raise ValueError(f"score.actions {list(self.actions)} has a name twice")


@dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """Everything one replica needs; see the module docstring for where it comes from.

    registry: the model registry folder (trainer/registry.py) the replica follows; None is the
      checkout's `.state/registry` (moved by HSTU_STATE_DIR); a relative path is relative to the
      checkout (replicas do not share the shell's working directory).
    poll_interval_s: how often the background watcher reads the registry's LATEST.
    activate_delay_s: a new version answers from its manifest's `created_ms` plus this delay, on
      every replica at that same moment (a replica that loaded it sooner waits, one that loads it
      later swaps at once): so a client whose requests land on different replicas never sees the
      versions go back, as long as every replica loads a version within the delay. It needs the
      nodes' clocks in step (NTP). 0 swaps each replica as soon as it has loaded; a pinned version
      (a rollback) swaps at once.
    history_cache_mb: the per-replica LRU cache of encoded histories (a 200-event history of
      the ML-1M HSTU config costs ~330 KB).
    num_threads: torch threads per replica (one replica per core scales better than threads).
    switch_interval_ms: the replica process's GIL switch interval (`sys.setswitchinterval`;
      Python's default is 5 ms). The compute thread releases the GIL for every torch op and must
      win it back from the event loop's threads each time; a shorter interval bounds that wait.
    """

    registry: Path | None = None
    poll_interval_s: float = 1.0
    activate_delay_s: float = 3.0
    history_cache_mb: float = 512.0
    num_threads: int = 1
    switch_interval_ms: float = 0.5
    features: FeatureConfig = field(default_factory=FeatureConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)

    def __post_init__(self) -> None:
        if self.poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s ({self.poll_interval_s}) must be > 0")
        if self.activate_delay_s < 0:
            raise ValueError(f"activate_delay_s ({self.activate_delay_s}) must be >= 0")
        if self.history_cache_mb < 0:
            raise ValueError(f"history_cache_mb ({self.history_cache_mb}) must be >= 0 (0 turns the cache off)")
        if self.num_threads < 1:
            raise ValueError(f"num_threads ({self.num_threads}) must be >= 1")
        if self.switch_interval_ms <= 0:
            raise ValueError(f"switch_interval_ms ({self.switch_interval_ms}) must be > 0")

    @property
    def registry_dir(self) -> Path:
        return _in_checkout(self.registry) if self.registry is not None else state_dir("registry")


def _in_checkout(path: Path) -> Path:
    return path if path.is_absolute() else REPO_ROOT / path


def load_serving_config(args: dict[str, Any] | None) -> ServingConfig:
    """`ServingConfig` from the app's arguments: a nested mapping (a Serve config's `args:`) or
    the flat `key=value` pairs of `serve run serving.app:app key=value` (dotted keys nest, and
    string values are read as YAML scalars, as `config.loader` reads overrides)."""
    data: dict[str, Any] = {}
    for key, value in (args or {}).items():
        if isinstance(value, str):
            update = parse_overrides([f"{key}={value}"])
        else:
            update = node = {}
            parts = str(key).split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        data = merge(data, update)
    return from_dict(ServingConfig, data)


@dataclass(frozen=True, kw_only=True)
class FollowConfig:
    """The deployment's `user_config`: which model version to serve.

    version "latest" follows the registry's LATEST (new versions are loaded in the background
    and swapped in between requests); an int pins that version (a rollback), until a later
    `{"version": "latest"}`.
    """

    version: int | Literal["latest"] = "latest"

    def __post_init__(self) -> None:
        if isinstance(self.version, int) and self.version < 1:
            raise ValueError(f"user_config version ({self.version}) must be >= 1 (versions count from 1)")

    @property
    def pinned(self) -> int | None:
        return self.version if isinstance(self.version, int) else None


def load_follow_config(user_config: Any) -> FollowConfig:
    """`FollowConfig` from a deployment's user_config (None: follow the latest)."""
    if user_config is None:
        return FollowConfig()
    version = user_config.get("version", "latest") if isinstance(user_config, dict) else None
    if isinstance(version, bool) or not (isinstance(version, int) or version == "latest"):
        raise ConfigError(
            f"user_config {user_config!r}: version must be 'latest' or a version number like 7, e.g. {{'version': 7}}"
        )
    try:
        return from_dict(FollowConfig, user_config)
    except ConfigError as error:
        raise ConfigError(f"user_config {user_config!r}: {error}") from None
