"""trainer/losses.py: target positions from num_new, sampled softmax with negatives, ranking CE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.pytorch.pt_sampled_softmax import pt_sampled_softmax_loss
from trainer.embedding_table import DynamicEmbeddingTable, TableConfig
from trainer.losses import GenerativeLoss, LossConfig, target_index
from trainer.model import build_layout


def test_target_index_follows_num_new() -> None:
    idx = target_index(torch.tensor([0, 4, 6, 9]), torch.tensor([2, 0, 3]))
    assert idx.retrieval_event.tolist() == [2, 3, 7, 8]  # user 2's first event has no context
    assert idx.rank_event.tolist() == [2, 3, 6, 7, 8]


def make_table() -> DynamicEmbeddingTable:
    table = DynamicEmbeddingTable(config=TableConfig(capacity=20, dim=6, init_std=1.0))
    table.observe(torch.arange(100, 120), now=0.0)
    return table


def test_retrieval_loss_matches_reference_on_new_positions_only() -> None:
    table = make_table()
    offsets = torch.tensor([0, 4, 7])
    rows = table.lookup(torch.tensor([100, 101, 102, 103, 104, 105, 106]))
    layout = build_layout(offsets, interleaved=False)
    out = torch.randn(7, 6)
    loss_fn = GenerativeLoss(config=LossConfig(num_negatives=5, temperature=0.1), table=table, seed=3)
    targets = target_index(offsets, torch.tensor([1, 2]))  # events 3, 5, 6
    got = loss_fn(
        out, layout=layout, rows=rows, actions=torch.zeros(7, dtype=torch.int64), targets=targets, action_head=None
    )
    negatives = GenerativeLoss(config=loss_fn.config, table=table, seed=3).negatives(rows[[3, 5, 6]])
    assert negatives.shape == (3, 5)
    want = pt_sampled_softmax_loss(out[[2, 4, 5]], rows[[3, 5, 6]], negatives, table.weight, temperature=0.1).mean()
    assert torch.allclose(got["retrieval"], want) and torch.allclose(got["loss"], want)
    assert "ranking" not in got


def test_negatives_are_live_rows_plus_in_batch_positives() -> None:
    table = make_table()
    positives = torch.tensor([5, 6, 7])
    per_position = GenerativeLoss(config=LossConfig(num_negatives=50, num_in_batch_negatives=7), table=table)
    neg = per_position.negatives(positives)
    assert neg.shape == (3, 57)
    assert set(neg[:, :50].reshape(-1).tolist()) <= set(table.live_rows().tolist())
    assert not torch.equal(neg[0, :50], neg[1, :50])  # drawn per position
    assert torch.equal(neg[0, 50:], neg[2, 50:]) and set(neg[:, 50:].reshape(-1).tolist()) <= {5, 6, 7}
    shared = GenerativeLoss(config=LossConfig(num_negatives=50, shared_negatives=True), table=table)
    neg = shared.negatives(positives)
    assert neg.shape == (3, 50) and neg.stride(0) == 0  # one set, viewed per position
    assert set(neg[0].tolist()) <= set(table.live_rows().tolist())


def test_in_batch_negative_equal_to_positive_is_masked() -> None:
    table = make_table()
    q = torch.randn(1, 6)
    pos = torch.tensor([3])
    loss_fn = GenerativeLoss(config=LossConfig(num_negatives=1, num_in_batch_negatives=1), table=table)
    negatives = loss_fn.negatives(pos)  # one uniform row, then the batch's only positive: 3
    assert negatives[0, 1].item() == 3
    with_hit = pt_sampled_softmax_loss(q, pos, negatives, table.weight, temperature=0.1)
    without = pt_sampled_softmax_loss(q, pos, negatives[:, :1], table.weight, temperature=0.1)
    assert negatives[0, 0].item() != 3  # (fixed by the seed) so `without` has no hit at all
    assert torch.allclose(with_hit, without)


def test_ranking_loss_at_new_item_tokens() -> None:
    table = make_table()
    offsets = torch.tensor([0, 3])
    layout = build_layout(offsets, interleaved=True)
    out = torch.randn(6, 6)
    head = torch.nn.Linear(6, 4)
    actions = torch.tensor([1, 3, 0])
    loss_fn = GenerativeLoss(config=LossConfig(num_negatives=4, ranking_weight=0.5), table=table)
    got = loss_fn(
        out,
        layout=layout,
        rows=table.lookup(torch.tensor([100, 101, 102])),
        actions=actions,
        targets=target_index(offsets, torch.tensor([2])),
        action_head=head,
    )
    want = F.cross_entropy(head(out[[2, 4]]), actions[[1, 2]])
    assert torch.allclose(got["ranking"], want)
    assert torch.allclose(got["loss"], got["retrieval"] + 0.5 * want)


def test_loss_config_validation() -> None:
    with pytest.raises(ValueError, match="at least one negative"):
        LossConfig(num_negatives=0)
    with pytest.raises(ValueError, match=r"loss.temperature \(0.0\)"):
        LossConfig(temperature=0.0)
