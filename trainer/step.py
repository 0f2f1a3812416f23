"""The one training step, used by every trainer: the offline trainer, the stream trainer and the
drift benchmark.

One call on a batch of training examples (a `SequenceBatch` with `num_new`):

1. the item table observes the ids of the batch's new events (admission, eviction, and the
   optimizer-state reset of evicted rows: `DynamicEmbeddingTable.observe`), at the batch's
   latest event time; with data parallelism every worker observes the same all-gathered ids at
   the same time, so the tables stay identical;
2. raw ids become rows, the batch moves to the model's device, and the model encodes it;
3. the generative loss on the new positions (retrieval, plus ranking in the interleaved layout);
4. backward, the gradients averaged across workers (data parallelism), optimizer step.

    >>> import numpy as np, torch
    >>> from features.sequence_batch import SequenceBatch
    >>> from trainer.losses import GenerativeLoss, LossConfig
    >>> from trainer.model import ModelConfig, build_model
    >>> from trainer.step import train_step
    >>> model = build_model(ModelConfig(layout="interleaved", dim=8, qk_dim=4, v_dim=4, max_seq_len=4), capacity=10)
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> model.table.attach_optimizer(optimizer)
    >>> loss_fn = GenerativeLoss(config=LossConfig(num_negatives=4), table=model.table)
    >>> batch = SequenceBatch.from_sequences(user_ids=[1], item_ids=[[3, 4, 5]], actions=[[0, 1, 2]],
    ...                                      timestamps_ms=[[1_000, 2_000, 3_000]], num_new=[3])
    >>> result = train_step(model, batch, optimizer=optimizer, loss_fn=loss_fn)
    >>> result.targets, result.observed.admitted, bool(torch.isfinite(result.loss))
    (3, 3, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from features.sequence_batch import SequenceBatch
from trainer.embedding_table import ObserveStats
from trainer.losses import GenerativeLoss, target_index
from trainer.model import HSTUModel


class StepError(ValueError):
    """A batch the training step cannot train on (no `num_new`)."""


class Collective(Protocol):
    """What data parallelism needs from the step (trainer/stream_train.py provides one over
    torch.distributed); None means a single worker."""

    def gather_ids(self, ids: np.ndarray, now_s: float) -> tuple[np.ndarray, float]:
        """Every worker's `ids`, concatenated in rank order, and the latest `now_s` of all."""

    def average_gradients(self, parameters: list[Tensor]) -> None:
        """Replace each parameter's gradient by its mean over the workers."""


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """What one step did. Losses are detached tensors (no device sync until read)."""

    loss: Tensor
    parts: dict[str, Tensor]
    tokens: int  # tokens encoded (2 per event in the interleaved layout)
    events: int  # events in the batch (context and targets)
    targets: int  # new events (the positions the loss is taken on)
    observed: ObserveStats


def new_item_ids(batch: SequenceBatch) -> np.ndarray:
    """The item ids of every user's trailing `num_new` events (in batch order)."""
    lengths = batch.lengths
    keep = np.arange(batch.num_events) >= np.repeat(batch.offsets[1:] - batch.num_new, lengths)
    return batch.item_ids[keep]


def train_step(
    model: HSTUModel,
    batch: SequenceBatch,
    *,
    optimizer: torch.optim.Optimizer,
    loss_fn: GenerativeLoss,
    collective: Collective | None = None,
) -> StepResult:
    """One optimizer step on `batch` (a SequenceBatch with num_new); see the module docstring.

    `model` is the plain HSTUModel (its table must have the optimizer attached, so eviction
    clears that optimizer's state); `collective` averages gradients and shares the observed ids
    between data-parallel workers.
    """
    if batch.num_new is None:
        raise StepError(
            "train_step needs training examples: a SequenceBatch with num_new (see trainer.batching.make_batch)"
        )
    model.train()
    device = model.device
    new_ids = new_item_ids(batch)
    now_s = float(batch.timestamps_ms.max()) / 1000.0 if batch.num_events else 0.0
    if collective is not None:
        new_ids, now_s = collective.gather_ids(new_ids, now_s)
    observed = model.table.observe(new_ids, now=now_s)

    rows = model.table.lookup(batch.item_ids).to(device)  # raw ids -> rows on the host
    actions = torch.from_numpy(batch.actions).to(device)
    timestamps_ms = torch.from_numpy(batch.timestamps_ms).to(device)
    offsets = torch.from_numpy(batch.offsets)
    layout = model.layout(offsets)
    targets = target_index(offsets, torch.from_numpy(batch.num_new))
    out = model.encode(rows, actions, timestamps_ms, layout)
    parts = loss_fn(out, layout=layout, rows=rows, actions=actions, targets=targets, action_head=model.action_head)
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    if collective is not None:
        collective.average_gradients([p for p in model.parameters() if p.requires_grad])
    optimizer.step()
    return StepResult(
        loss=parts["loss"].detach(),
        parts={name: value.detach() for name, value in parts.items() if name != "loss"},
        tokens=layout.num_tokens,
        events=batch.num_events,
        targets=int(batch.num_new.sum()),
        observed=observed,
    )
