"""A synthetic, non-stationary engagement stream: the catalogue, popularity and tastes all move.

MovieLens is small and its catalogue hardly changes; a real stream is not like that. This
generator makes a stream where

- items are **born and retire**: each item lives for a while (gamma-distributed lifetime, mean
  `item_lifetime_days`); a back catalogue is alive at the start, new items keep arriving, and no
  event ever names an item outside its life;
- **popularity shifts**: an item's weight rises after its birth and decays with age, on top of a
  Zipf base popularity, and every topic's popularity follows its own random walk;
- **users' interests drift**: each user has a stable topic plus a current topic that moves to a
  neighbouring topic every `interest_drift_days` on average; some events explore trending topics;
- **actions carry signal**: `skip`..`buy` (ordered negative to positive) are more positive when the
  item's topic matches the user's interest and when the item's hidden quality is high.

Everything is vectorised numpy and deterministic for a seed (same numpy version):

    >>> from infra.datasets.synthetic import SyntheticConfig, generate_events
    >>> df = generate_events(SyntheticConfig(num_users=100, num_items=500, num_events=5_000, num_days=7, seed=1))
    >>> list(df.columns), len(df)
    (['user_id', 'item_id', 'action', 'ts_ms'], 5000)

or from the shell (writes a recorded Kafka log, see streaming/recorded_log.py):

    python -m infra.datasets synthetic --users 10000 --items 50000 --events 2000000 --seed 0 \
        --out .state/logs/synthetic.parquet

Ids are 1..num_users and 1..num_items (items numbered in birth order, like an auto-increment
key); `sparse_ids=True` maps both to random int64 values up to 2^63 - 1 instead, to exercise ids
above 2^53. Timestamps start at `start_ms` (default 2024-01-01T00:00Z, in the past, so a broker
accepts them) and span `num_days`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

DAY_MS = 86_400_000
INT64_MAX = np.iinfo(np.int64).max
# Cells (time buckets x items) of the popularity table; bounds memory at ~64 MB of float64.
_CELL_BUDGET = 8_000_000
DEFAULT_ACTIONS = ("skip", "view", "click", "like", "buy")


class SyntheticConfigError(ValueError):
    """A SyntheticConfig field has a value the generator cannot use."""


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """What to generate. Counts are exact; everything else shapes the distributions.

    actions are ordered from most negative to most positive; `action_logits` (same length) are
    their base log-odds before the interest-match and quality shifts.
    """

    num_users: int = 1_000
    num_items: int = 5_000
    num_events: int = 100_000
    num_days: int = 30
    seed: int = 0
    start_ms: int = 1_704_067_200_000  # 2024-01-01T00:00:00Z
    num_topics: int = 20
    item_lifetime_days: float = 10.0
    popularity_exponent: float = 1.0
    topic_trend_sigma: float = 0.3  # std of a topic's log-popularity change per day
    interest_drift_days: float = 7.0
    explore_prob: float = 0.1
    stable_interest_prob: float = 0.3
    user_activity_sigma: float = 1.0
    match_bonus: float = 1.5
    quality_slope: float = 0.7
    sparse_ids: bool = False
    actions: tuple[str, ...] = DEFAULT_ACTIONS
    action_logits: tuple[float, ...] = (0.0, 1.5, 0.3, -0.7, -1.8)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise SyntheticConfigError(f"{f.name} must be a number, got {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise SyntheticConfigError(f"{f.name} must be an integer, got {value!r}")
        for name in ("num_users", "num_items", "num_events", "num_days", "num_topics"):
            if getattr(self, name) < 1:
                raise SyntheticConfigError(f"{name} ({getattr(self, name)}) must be at least 1")
        for name in ("item_lifetime_days", "interest_drift_days"):
            if not getattr(self, name) > 0:
                raise SyntheticConfigError(f"{name} ({getattr(self, name)}) must be > 0")
        # Upper bounds keep the weights finite and non-zero in float64.
        for name in ("topic_trend_sigma", "user_activity_sigma", "popularity_exponent"):
            if not 0 <= getattr(self, name) <= 5:
                raise SyntheticConfigError(f"{name} ({getattr(self, name)}) must be in [0, 5]")
        for name in ("explore_prob", "stable_interest_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SyntheticConfigError(f"{name} ({getattr(self, name)}) must be in [0, 1]")
        if self.explore_prob + self.stable_interest_prob > 1.0:
            raise SyntheticConfigError(
                f"explore_prob ({self.explore_prob}) + stable_interest_prob ({self.stable_interest_prob}) "
                "must not exceed 1: lower one of them"
            )
        if self.seed < 0:
            raise SyntheticConfigError(f"seed ({self.seed}) must be >= 0")
        if self.start_ms < 0 or self.start_ms + self.num_days * DAY_MS > INT64_MAX:
            raise SyntheticConfigError(f"start_ms ({self.start_ms}) + num_days must stay within 0..2^63-1 ms")
        if not self.actions or len(set(self.actions)) != len(self.actions):
            raise SyntheticConfigError(f"actions {self.actions!r} must be a non-empty tuple of distinct names")
        if len(self.action_logits) != len(self.actions):
            raise SyntheticConfigError(
                f"action_logits has {len(self.action_logits)} values but actions has {len(self.actions)} "
                f"({self.actions!r}): give one logit per action"
            )


@dataclass(frozen=True)
class SyntheticStream:
    """The generated events plus the hidden truth behind them (for tests and analysis).

    events: user_id, item_id (int64), action (str), ts_ms (int64), sorted by ts_ms.
    items:  item_id, topic, birth_ms, death_ms (the item is alive in [birth_ms, death_ms)), quality.
    users:  user_id, stable_topic, activity.
    """

    events: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame


def generate_events(cfg: SyntheticConfig) -> pd.DataFrame:
    """The event frame (user_id, item_id, action, ts_ms), sorted by ts_ms; deterministic per seed."""
    return generate(cfg).events


def _sample_rows(cdf_rows: np.ndarray, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Column index drawn from each row's distribution; `cdf_rows` (R, C) holds row-normalised CDFs.

    One searchsorted over the flattened table: row r's CDF is shifted by r so the whole table is
    monotone, and `r + u` lands inside row r.
    """
    num_rows, num_cols = cdf_rows.shape
    flat = (cdf_rows + np.arange(num_rows, dtype=np.float64)[:, None]).ravel()
    pos = np.searchsorted(flat, rows + u * (1.0 - 1e-12), side="right")
    col = pos - rows * num_cols
    return np.minimum(col, num_cols - 1)


def _normalised_cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights, axis=1, dtype=np.float64)
    total = cdf[:, -1:]
    return np.divide(cdf, total, out=np.zeros_like(cdf), where=total > 0)


def _distinct_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct random ids in [1, 2^63 - 1], in random order."""
    ids = np.unique(rng.integers(1, INT64_MAX, size=n, dtype=np.int64, endpoint=True))
    while len(ids) < n:  # a collision among 2^63 values: practically never
        ids = np.unique(np.concatenate([ids, rng.integers(1, INT64_MAX, size=n - len(ids), dtype=np.int64)]))
    return rng.permutation(ids)


def generate(cfg: SyntheticConfig) -> SyntheticStream:
    """Generate the stream of `cfg` (see the module docstring for what moves and how)."""
    rng = np.random.default_rng(cfg.seed)
    span_ms = cfg.num_days * DAY_MS
    num_items, num_topics, num_users, n = cfg.num_items, cfg.num_topics, cfg.num_users, cfg.num_events

    # --- items: life span, topic, base popularity, quality ---------------------------------------
    mean_life = cfg.item_lifetime_days * DAY_MS
    life = np.maximum(rng.gamma(shape=2.0, scale=mean_life / 2.0, size=num_items).astype(np.int64), 1)
    # The fraction alive at the start is what a steady birth process would leave alive.
    at_start = rng.random(num_items) < mean_life / (mean_life + span_ms)
    birth = np.where(
        at_start, -(rng.random(num_items) * life).astype(np.int64), rng.integers(0, span_ms, size=num_items)
    )
    death = birth + life  # alive in [birth, death), integer ms from the start
    topic_sizes = 1.0 / np.arange(1, num_topics + 1) ** 0.5  # some topics are bigger than others
    item_topic = rng.choice(num_topics, size=num_items, p=topic_sizes / topic_sizes.sum())
    base_pop = rng.permutation(1.0 / np.arange(1, num_items + 1) ** cfg.popularity_exponent)
    quality = rng.standard_normal(num_items)

    # --- time buckets: the popularity table is (buckets x items), bounded by _CELL_BUDGET ----------
    num_buckets = int(np.clip(_CELL_BUDGET // num_items, 4, max(4, cfg.num_days * 24)))
    edges = np.arange(num_buckets + 1, dtype=np.int64) * span_ms // num_buckets  # integer ms
    bucket_lo, bucket_hi = edges[:-1], edges[1:]
    # Every bucket needs a live item; extend the latest-born item's life over any empty bucket.
    for b in range(num_buckets):
        lo, hi = bucket_lo[b], bucket_hi[b]
        if not np.any((birth < hi) & (death > lo)):
            cand = np.flatnonzero(birth < hi)
            i = cand[np.argmax(birth[cand])] if len(cand) else int(np.argmin(birth))
            birth[i] = min(birth[i], lo)
            death[i] = max(death[i], hi)
    width = span_ms / num_buckets

    log_trend = np.cumsum(
        rng.standard_normal((num_topics, num_buckets)) * cfg.topic_trend_sigma * math.sqrt(width / DAY_MS), axis=1
    )
    trend = np.exp(log_trend - log_trend.mean(axis=1, keepdims=True))  # (K, B)

    centre = (bucket_lo + bucket_hi) / 2
    topic_items = [np.flatnonzero(item_topic == k) for k in range(num_topics)]
    topic_cdf: list[np.ndarray] = []
    mass = np.zeros((num_topics, num_buckets))  # (K, B) total weight of live items per topic
    for k, idx in enumerate(topic_items):
        if len(idx) == 0:
            topic_cdf.append(np.zeros((num_buckets, 1)))
            continue
        b_i, d_i = birth[idx][None, :], death[idx][None, :]  # (1, n_k)
        lo, hi = bucket_lo[:, None], bucket_hi[:, None]  # (B, 1)
        alive = (b_i < hi) & (d_i > lo)  # (B, n_k)
        t_eff = np.clip(centre[:, None], b_i, d_i)
        tau = (d_i - b_i) * 0.2 + 1.0  # popularity peaks a fifth of the way into the item's life
        age = (t_eff - b_i) / tau
        curve = 0.1 + age * np.exp(1.0 - age)
        w = alive * curve * base_pop[idx][None, :] * trend[k][:, None]  # (B, n_k)
        mass[k] = w.sum(axis=1)
        topic_cdf.append(_normalised_cdf(w))

    # --- users: activity and interests ------------------------------------------------------------
    activity = rng.lognormal(0.0, cfg.user_activity_sigma, size=num_users)
    stable_topic = rng.choice(num_topics, size=num_users, p=topic_sizes / topic_sizes.sum())
    drift_ms = cfg.interest_drift_days * DAY_MS
    num_segments = int(math.ceil(span_ms / drift_ms)) + 2
    steps = rng.choice(np.array([-2, -1, 0, 1, 2]), size=(num_users, num_segments - 1), p=[0.15, 0.3, 0.1, 0.3, 0.15])
    start_topic = rng.choice(num_topics, size=num_users, p=topic_sizes / topic_sizes.sum())
    drift_topic = (
        start_topic[:, None] + np.concatenate([np.zeros((num_users, 1), np.int64), np.cumsum(steps, axis=1)], axis=1)
    ) % num_topics
    phase = rng.random(num_users) * drift_ms

    # --- events -----------------------------------------------------------------------------------
    act_cdf = np.cumsum(activity) / activity.sum()
    user = np.minimum(np.searchsorted(act_cdf, rng.random(n), side="right"), num_users - 1)
    ts = rng.integers(0, span_ms, size=n)
    bucket = np.searchsorted(edges, ts, side="right") - 1

    trending_cdf = _normalised_cdf(mass.T)  # (B, K)
    trending = _sample_rows(trending_cdf, bucket, rng.random(n))
    current = drift_topic[user, np.minimum(((ts + phase[user]) // drift_ms).astype(np.int64), num_segments - 1)]
    r = rng.random(n)
    topic = np.where(
        r < cfg.explore_prob,
        trending,
        np.where(r < cfg.explore_prob + cfg.stable_interest_prob, stable_topic[user], current),
    )
    # A topic with no live item in this bucket sends the event to a trending topic instead.
    topic = np.where(mass[topic, bucket] > 0, topic, trending)

    item = np.empty(n, dtype=np.int64)
    u_item = rng.random(n)
    for k, idx in enumerate(topic_items):
        sel = np.flatnonzero(topic == k)
        if len(sel):
            item[sel] = idx[_sample_rows(topic_cdf[k], bucket[sel], u_item[sel])]
    # Keep each event inside its item's life (the item may live in only part of the bucket); the
    # overlap of two integer intervals that intersect holds at least one whole millisecond.
    ts_ms = np.clip(ts, np.maximum(birth[item], bucket_lo[bucket]), np.minimum(death[item], bucket_hi[bucket]) - 1)

    # Actions: logit_j + position_j * shift, position 0 = most negative action, 1 = most positive.
    matched = (topic == current) | (topic == stable_topic[user])
    shift = cfg.match_bonus * (matched - 0.5) + cfg.quality_slope * quality[item]
    pos = np.linspace(0.0, 1.0, len(cfg.actions)) if len(cfg.actions) > 1 else np.zeros(1)
    logits = np.asarray(cfg.action_logits)[None, :] + shift[:, None] * pos[None, :]  # (n, A)
    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    cdf = np.cumsum(prob, axis=1)
    action = np.minimum((rng.random(n)[:, None] * cdf[:, -1:] > cdf).sum(axis=1), len(cfg.actions) - 1)

    # --- ids and output -----------------------------------------------------------------------------
    birth_order = np.argsort(birth, kind="stable")
    item_rank = np.empty(num_items, dtype=np.int64)
    item_rank[birth_order] = np.arange(num_items)
    if cfg.sparse_ids:
        user_ids = _distinct_ids(rng, num_users)
        item_ids = _distinct_ids(rng, num_items)[item_rank]
    else:
        user_ids = np.arange(1, num_users + 1, dtype=np.int64)
        item_ids = item_rank + 1

    order = np.argsort(ts_ms, kind="stable")
    action_names = np.asarray(cfg.actions, dtype=object)
    events = pd.DataFrame(
        {
            "user_id": user_ids[user[order]],
            "item_id": item_ids[item[order]],
            "action": action_names[action[order]],
            "ts_ms": ts_ms[order] + cfg.start_ms,
        }
    )
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "topic": item_topic.astype(np.int32),
            "birth_ms": birth + cfg.start_ms,
            "death_ms": death + cfg.start_ms,
            "quality": quality,
        }
    ).sort_values("birth_ms", kind="stable", ignore_index=True)
    users = pd.DataFrame({"user_id": user_ids, "stable_topic": stable_topic.astype(np.int32), "activity": activity})
    return SyntheticStream(events=events, items=items, users=users)


def write_synthetic_log(
    cfg: SyntheticConfig, path: str | Path, *, num_partitions: int = 4, topic: str = "engagements"
) -> int:
    """Generate `cfg` and write it as a recorded Kafka log (key = user id, partitioned like Kafka's
    default partitioner); returns the number of events written."""
    from streaming.recorded_log import events_to_log, write_log

    table = events_to_log(generate_events(cfg), topic=topic, num_partitions=num_partitions)
    write_log(table, path, num_partitions=num_partitions)
    return table.num_rows
