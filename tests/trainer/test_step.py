"""trainer/step.py: the one training step observes only the new items, evicts with the optimizer
state, trains on the new positions, and lets a collective share ids and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.sequence_batch import SequenceBatch
from trainer.embedding_table import DynamicEmbeddingTable, TableConfig
from trainer.losses import GenerativeLoss, LossConfig
from trainer.model import ModelConfig, build_model
from trainer.step import StepError, new_item_ids, train_step


def setup(capacity: int = 50, layout: str = "interleaved"):
    torch.manual_seed(0)
    table = DynamicEmbeddingTable(config=TableConfig(capacity=capacity, dim=8))
    model = build_model(
        ModelConfig(layout=layout, dim=8, qk_dim=4, v_dim=4, max_seq_len=8, num_actions=3, num_time_buckets=8),
        table=table,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    table.attach_optimizer(optimizer)
    loss_fn = GenerativeLoss(config=LossConfig(num_negatives=4), table=table)
    return model, optimizer, loss_fn


def examples(items: list[list[int]], num_new: list[int], start_s: int = 100) -> SequenceBatch:
    return SequenceBatch.from_sequences(
        user_ids=list(range(len(items))),
        item_ids=items,
        actions=[[k % 3 for k in range(len(s))] for s in items],
        timestamps_ms=[[1000 * (start_s + k) for k in range(len(s))] for s in items],
        num_new=num_new,
    )


def test_new_item_ids_are_each_users_trailing_num_new() -> None:
    assert new_item_ids(examples([[1, 2, 3], [4, 5], [6]], [2, 0, 1])).tolist() == [2, 3, 6]


def test_step_observes_only_new_items_and_trains() -> None:
    model, optimizer, loss_fn = setup()
    model.table.observe(np.array([1, 2]), now=0.0)  # the context items were trained on before
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_step(model, examples([[1, 2, 7, 8]], [2], start_s=500), optimizer=optimizer, loss_fn=loss_fn)
    assert result.observed.admitted == 2 and sorted(model.table.live_ids().tolist()) == [1, 2, 7, 8]
    assert (result.targets, result.events, result.tokens) == (2, 4, 8)
    assert set(result.parts) == {"retrieval", "ranking"} and torch.isfinite(result.loss)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "encoder.layers.0.uvqk" in changed and "action_head.weight" in changed
    # the table saw the new items at the batch's latest event time (seconds)
    rows = model.table.lookup(torch.tensor([7, 8])).numpy()
    assert model.table._row_last_seen[rows].tolist() == [503.0, 503.0]


def test_eviction_inside_the_step_clears_the_optimizer_state_of_the_row() -> None:
    model, optimizer, loss_fn = setup(capacity=3)
    train_step(model, examples([[1, 2, 3]], [3], start_s=10), optimizer=optimizer, loss_fn=loss_fn)
    row_of_1 = int(model.table.lookup(torch.tensor([1])))
    assert optimizer.state[model.table.weight]["exp_avg"][row_of_1].abs().sum() > 0
    # item 4 arrives later: the least recently seen row (item 1) goes, its moments zeroed before the step
    seen = {}
    real_observe = model.table.observe

    def spy(ids, *, now):
        stats = real_observe(ids, now=now)
        seen["moments"] = optimizer.state[model.table.weight]["exp_avg"][row_of_1].clone()
        return stats

    model.table.observe = spy
    result = train_step(model, examples([[2, 3, 4]], [1], start_s=20), optimizer=optimizer, loss_fn=loss_fn)
    assert result.observed.evicted == 1 and 1 not in model.table.live_ids().tolist()
    assert torch.count_nonzero(seen["moments"]) == 0


def test_collective_sees_the_ids_and_every_gradient() -> None:
    model, optimizer, loss_fn = setup()

    class Recorder:
        def __init__(self) -> None:
            self.ids, self.grads = None, None

        def gather_ids(self, ids, now_s):
            self.ids = ids.tolist()
            return np.concatenate([ids, [42]]), now_s + 1.0  # another worker's item, and its later clock

        def average_gradients(self, parameters):
            self.grads = [p.grad is not None for p in parameters]
            for p in parameters:
                if p.grad is not None:
                    p.grad.zero_()  # as if the other worker's gradient cancelled ours

    recorder = Recorder()
    before = model.encoder.layers[0].uvqk.detach().clone()
    train_step(model, examples([[5, 6, 7]], [2]), optimizer=optimizer, loss_fn=loss_fn, collective=recorder)
    assert recorder.ids == [6, 7] and 42 in model.table.live_ids().tolist()
    assert len(recorder.grads) == len(list(model.parameters())) and any(recorder.grads)
    assert torch.equal(model.encoder.layers[0].uvqk, before)  # zero gradient, no decay: nothing moved


def test_a_batch_without_num_new_is_refused() -> None:
    model, optimizer, loss_fn = setup()
    plain = examples([[1, 2]], [1]).with_num_new(None)
    with pytest.raises(StepError, match="needs training examples"):
        train_step(model, plain, optimizer=optimizer, loss_fn=loss_fn)
