"""trainer/metrics.py against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.metrics import RankingMetrics, exclude_history, ranks_from_scores


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
