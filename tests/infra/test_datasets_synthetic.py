"""The synthetic stream: deterministic per seed, and really non-stationary."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from config.paths import REPO_ROOT
from infra.datasets.synthetic import (
    DAY_MS,
    SyntheticConfig,
    SyntheticConfigError,
    generate,
    generate_events,
    write_synthetic_log,
)
from streaming.events import ActionVocab
from streaming.log_source import LogSource
from streaming.recorded_log import read_log

CFG = SyntheticConfig(
    num_users=500,
    num_items=3_000,
    num_events=60_000,
    num_days=30,
    seed=7,
    item_lifetime_days=5.0,
    interest_drift_days=5.0,
)


@pytest.fixture(scope="module")
def stream():
    return generate(CFG)


def test_same_seed_same_stream_other_seed_other_stream():
    small = SyntheticConfig(num_users=50, num_items=200, num_events=4_000, num_days=5, seed=3)
    a, b = generate_events(small), generate_events(small)
    pd.testing.assert_frame_equal(a, b)
    c = generate_events(SyntheticConfig(num_users=50, num_items=200, num_events=4_000, num_days=5, seed=4))
    assert not a.equals(c)


def test_shape_types_and_order(stream):
    ev = stream.events
    assert list(ev.columns) == ["user_id", "item_id", "action", "ts_ms"]
    assert [str(t) for t in ev.dtypes] == ["int64", "int64", "object", "int64"]
    assert len(ev) == 60_000
    assert ev.ts_ms.is_monotonic_increasing
    assert CFG.start_ms <= ev.ts_ms.min() and ev.ts_ms.max() < CFG.start_ms + 30 * DAY_MS
    assert ev.user_id.between(1, 500).all() and ev.item_id.between(1, 3_000).all()
    assert set(ev.action) == set(ActionVocab.synthetic().actions)


def test_items_are_born_and_retire_and_no_event_falls_outside_a_life(stream):
    ev, items = stream.events, stream.items.set_index("item_id")
    joined = ev.join(items, on="item_id")
    assert ((joined.ts_ms >= joined.birth_ms) & (joined.ts_ms < joined.death_ms)).all()
    day = (ev.ts_ms - CFG.start_ms) // DAY_MS
    first, last = day.groupby(ev.item_id).min(), day.groupby(ev.item_id).max()
    assert (first >= 10).mean() > 0.4  # many items appear only later: born
    assert (last < 20).mean() > 0.4  # many items stop appearing: retired
    early = set(ev.item_id[day < 5])
    late = set(ev.item_id[day >= 25])
    assert len(early & late) / len(early | late) < 0.1  # the live catalogue turns over


def test_popularity_shifts(stream):
    ev = stream.events
    day = (ev.ts_ms - CFG.start_ms) // DAY_MS
    top = [set(ev.item_id[(day >= d) & (day < d + 3)].value_counts().index[:50]) for d in (0, 9, 18, 27)]
    assert all(len(top[i] & top[i + 1]) < 10 for i in range(3))


def dominant_topic_change(cfg: SyntheticConfig) -> float:
    s = generate(cfg)
    ev = s.events.join(s.items.set_index("item_id")["topic"], on="item_id")
    third = cfg.num_days * DAY_MS // 3
    t = ev.ts_ms - cfg.start_ms
    heavy = ev.user_id.value_counts()
    heavy = set(heavy.index[heavy >= 60])
    ev = ev[ev.user_id.isin(heavy)]
    t = t[ev.index]
    early = ev[t < third].groupby("user_id").topic.agg(lambda x: x.value_counts().index[0])
    late = ev[t >= 2 * third].groupby("user_id").topic.agg(lambda x: x.value_counts().index[0])
    both = early.index.intersection(late.index)
    return float((early[both] != late[both]).mean())


def test_user_interests_drift():
    base = dict(
        num_users=300,
        num_items=3_000,
        num_events=60_000,
        num_days=30,
        seed=2,
        stable_interest_prob=0.0,
        explore_prob=0.0,
        item_lifetime_days=100.0,
        topic_trend_sigma=0.0,
    )
    drifting = dominant_topic_change(SyntheticConfig(**base, interest_drift_days=3.0))
    fixed = dominant_topic_change(SyntheticConfig(**base, interest_drift_days=10_000.0))
    assert drifting > 0.6 and fixed < 0.2, (drifting, fixed)


def test_actions_follow_item_quality(stream):
    ev = stream.events.join(stream.items.set_index("item_id")["quality"], on="item_id")
    rank = ev.action.map({a: i for i, a in enumerate(CFG.actions)})
    assert np.corrcoef(rank, ev.quality)[0, 1] > 0.1


def test_sparse_ids_are_large_distinct_and_deterministic():
    cfg = SyntheticConfig(num_users=40, num_items=100, num_events=2_000, num_days=3, seed=9, sparse_ids=True)
    s = generate(cfg)
    assert s.users.user_id.nunique() == 40 and s.items.item_id.nunique() == 100
    assert (s.events.item_id > 2**53).mean() > 0.9
    assert set(s.events.item_id) <= set(s.items.item_id)
    pd.testing.assert_frame_equal(s.events, generate_events(cfg))


def test_tiny_configs_still_work():
    ev = generate_events(SyntheticConfig(num_users=1, num_items=1, num_events=50, num_days=1, num_topics=1, seed=0))
    assert len(ev) == 50 and set(ev.item_id) == {1} and set(ev.user_id) == {1}
    ev = generate_events(
        SyntheticConfig(num_users=3, num_items=2, num_events=500, num_days=60, seed=1, item_lifetime_days=0.5)
    )
    assert len(ev) == 500


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"num_users": 0}, r"num_users \(0\) must be at least 1"),
        ({"num_events": 2.5}, r"num_events must be an integer, got 2.5"),
        ({"num_items": True}, r"num_items must be a number, got True"),
        ({"item_lifetime_days": 0.0}, r"item_lifetime_days \(0.0\) must be > 0"),
        ({"explore_prob": 1.5}, r"explore_prob \(1.5\) must be in \[0, 1\]"),
        ({"explore_prob": 0.6, "stable_interest_prob": 0.6}, "must not exceed 1"),
        ({"seed": -1}, r"seed \(-1\) must be >= 0"),
        ({"popularity_exponent": 9.0}, r"popularity_exponent \(9.0\) must be in \[0, 5\]"),
        ({"actions": ("a", "a"), "action_logits": (0.0, 0.0)}, "distinct names"),
        ({"action_logits": (0.0,)}, "action_logits has 1 values but actions has 5"),
    ],
)
def test_bad_configs_are_refused(over, message):
    with pytest.raises(SyntheticConfigError, match=message):
        SyntheticConfig(**over)


def test_log_and_cli_are_deterministic(tmp_path):
    cfg = SyntheticConfig(num_users=80, num_items=400, num_events=5_000, num_days=4, seed=21)
    n = write_synthetic_log(cfg, tmp_path / "api.parquet", num_partitions=4)
    assert n == 5_000
    args = [
        sys.executable,
        "-m",
        "infra.datasets",
        "synthetic",
        "--users",
        "80",
        "--items",
        "400",
        "--events",
        "5000",
        "--days",
        "4",
        "--seed",
        "21",
        "--partitions",
        "4",
    ]
    for name in ("cli1.parquet", "cli2.parquet"):
        res = subprocess.run(
            [*args, "--out", str(tmp_path / name)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, res.stderr
        assert "5,000 events, 80 users" in res.stdout
    api = read_log(tmp_path / "api.parquet")
    assert api.table.equals(read_log(tmp_path / "cli1.parquet").table)
    assert api.table.equals(read_log(tmp_path / "cli2.parquet").table)
    valid, invalid = LogSource(api).build_part(2).next_batch(10_000).decode(vocab=ActionVocab.synthetic(), now_ms=2**62)
    assert invalid.num_rows == 0 and valid.num_rows > 500
    bad = subprocess.run(
        [*args[:4], "--users", "0", "--out", str(tmp_path / "bad.parquet")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "num_users (0) must be at least 1" in bad.stderr


@pytest.mark.slow
def test_two_million_events():
    cfg = SyntheticConfig(num_users=20_000, num_items=100_000, num_events=2_000_000, num_days=60, seed=0)
    s = generate(cfg)
    assert len(s.events) == 2_000_000 and s.events.ts_ms.is_monotonic_increasing
    joined = s.events.join(s.items.set_index("item_id"), on="item_id")
    assert ((joined.ts_ms >= joined.birth_ms) & (joined.ts_ms < joined.death_ms)).all()
