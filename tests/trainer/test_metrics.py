"""trainer/metrics.py against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.metrics import (
    RankingMetrics,
    exclude_history,
    ndcg_per_user,
    paired_bootstrap_ratio,
    paired_bootstrap_ratio_difference,
    ranks_from_scores,
    resample_users,
)


def test_ranks_count_ties_against_the_target() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.1, 0.7], [1.0, 0.0, 0.0, 0.0]])
    assert ranks_from_scores(scores, torch.tensor([0, 0])).tolist() == [2, 0]
    assert ranks_from_scores(scores, torch.tensor([2, 1])).tolist() == [3, 3]  # 2 ties + 1 higher
    assert ranks_from_scores(torch.zeros(1, 5), torch.tensor([4])).tolist() == [4]


def test_exclude_history_keeps_target() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.1, 0.7], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    cols = torch.tensor([1, 3, 0, 3, 2])  # user 0: {1, 3}; user 1: {0, 3, 2}
    offsets = torch.tensor([0, 2, 5])
    out = exclude_history(scores.clone(), cols, offsets, targets=torch.tensor([0, 2]))
    assert out.tolist() == [[0.5, -math.inf, 0.1, -math.inf], [-math.inf, 0.2, 0.3, -math.inf]]
    assert ranks_from_scores(out, torch.tensor([0, 2])).tolist() == [0, 0]


def test_metrics_hand_computed() -> None:
    m = RankingMetrics(ks=(1, 3, 10))
    m.update(torch.tensor([0, 2]))
    m.update(torch.tensor([5, 20]))
    out = m.compute()
    assert out["hr@1"] == pytest.approx(1 / 4)
    assert out["hr@3"] == pytest.approx(2 / 4)
    assert out["hr@10"] == pytest.approx(3 / 4)
    assert out["ndcg@1"] == pytest.approx(1 / 4)
    assert out["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert out["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / math.log2(7)) / 4)
    assert out["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 6 + 1 / 21) / 4)
    assert out["count"] == 4


def test_metrics_errors() -> None:
    with pytest.raises(ValueError, match="no ranks recorded"):
        RankingMetrics().compute()
    with pytest.raises(ValueError, match=r"ks \(\(0,\)\)"):
        RankingMetrics(ks=(0,))


def test_ndcg_per_user_hand_computed() -> None:
    got = ndcg_per_user(np.array([0, 2, 9, 10, 500]), k=10)
    assert got.tolist() == pytest.approx([1.0, 0.5, 1 / math.log2(11), 0.0, 0.0])


def test_paired_bootstrap_ratio_on_known_cases() -> None:
    rng = np.random.default_rng(1)
    base = rng.random(400)
    same = paired_bootstrap_ratio(base, base)
    assert same["ratio"] == 1.0 and same["low"] == pytest.approx(1.0) and same["high"] == pytest.approx(1.0)
    assert same["p_le_1"] == 1.0  # every resample has ratio exactly 1
    double = paired_bootstrap_ratio(2 * base, base)
    assert (double["low"], double["high"]) == (pytest.approx(2.0), pytest.approx(2.0)) and double["p_le_1"] == 0.0
    # independent noise: the interval holds the ratio, has a width, and narrows with 4x the users
    small = paired_bootstrap_ratio(rng.random(400) * 1.1, rng.random(400))
    big = paired_bootstrap_ratio(rng.random(1600) * 1.1, rng.random(1600))
    for ci in (small, big):
        assert ci["low"] < ci["ratio"] < ci["high"] and ci["users"] in (400, 1600)
    assert (big["high"] - big["low"]) < 0.7 * (small["high"] - small["low"])  # ~1/2 for 4x the users
    # the same seed, the same interval
    assert paired_bootstrap_ratio(base + 0.1, base, seed=5) == paired_bootstrap_ratio(base + 0.1, base, seed=5)


def test_paired_bootstrap_ratio_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap_ratio(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap_ratio(np.ones(0), np.ones(0))
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap_ratio(np.ones(3), np.ones(3), level=1.0)


def test_paired_bootstrap_ratio_difference_resamples_users_with_all_their_events() -> None:
    rng = np.random.default_rng(4)
    top_a, bottom_a = rng.random(50), rng.random(50) + 0.1
    # b equal to a: the difference is 0 in every resample, because each resample draws the same users for both
    same = paired_bootstrap_ratio_difference((top_a, bottom_a), (top_a, bottom_a), resamples=300, seed=2)
    assert same["value"] == same["low"] == same["high"] == 0.0 and same["p_le_0"] == 1.0
    # by hand, with the same user draws
    top_b, bottom_b = top_a * 0.8, bottom_a
    got = paired_bootstrap_ratio_difference((top_a, bottom_a), (top_b, bottom_b), resamples=300, seed=2)
    idx = resample_users(50, resamples=300, seed=2)
    diffs = top_a[idx].mean(1) / bottom_a[idx].mean(1) - top_b[idx].mean(1) / bottom_b[idx].mean(1)
    assert got["value"] == pytest.approx(0.2 * top_a.mean() / bottom_a.mean())
    assert got["low"] == pytest.approx(np.percentile(diffs, 2.5)) and got["high"] == pytest.approx(
        np.percentile(diffs, 97.5)
    )
    assert got["p_le_0"] == 0.0
    with pytest.raises(ValueError, match="four non-empty 1-D"):
        paired_bootstrap_ratio_difference((top_a, bottom_a), (top_a[:10], bottom_a[:10]))
