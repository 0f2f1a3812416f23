"""The generative training objective: sampled-softmax retrieval plus action-type ranking.

- **Retrieval** (every layout): the output that precedes event t+1 (its item token in the items
  layout, the previous action token in the interleaved one) must pick event t+1's item among
  negatives: `num_negatives` rows drawn uniformly from the table's live rows (independently for
  every position, as the reference implementation does, or one set shared by the batch with
  `shared_negatives`, which a kernel can turn into one matmul), plus `num_in_batch_negatives`
  positives of other positions of the same batch (shared by the batch). A
  negative equal to the positive (an accidental hit) is masked by the kernel, which also
  L2-normalises queries and rows and divides by `temperature`
  (`kernels.sampled_softmax.sampled_softmax_loss`).
- **Ranking** (interleaved layout): cross-entropy over action types at every item token.

Only positions marked new by the batch's `num_new` contribute (the streaming contract: the whole
sequence is context, the new tail is the target). `TargetIndex` computes those positions once
per batch on the host.

    >>> import torch
    >>> from trainer.losses import target_index
    >>> idx = target_index(torch.tensor([0, 3, 5]), torch.tensor([3, 1]))
    >>> idx.retrieval_event.tolist(), idx.rank_event.tolist()   # event 0 has no context
    ([1, 2, 4], [0, 1, 2, 4])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.sampled_softmax import sampled_softmax_loss
from trainer.embedding_table import DynamicEmbeddingTable
from trainer.model import TokenLayout


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Weights and sampling of the objective (paper ML-1M config: 128 negatives, temperature 0.05)."""

    num_negatives: int = 128
    shared_negatives: bool = False  # one uniform set per batch instead of one per position
    num_in_batch_negatives: int = 0
    temperature: float = 0.05
    retrieval_weight: float = 1.0
    ranking_weight: float = 1.0  # interleaved layout only
    impl: str | None = None  # passed to the sampled-softmax dispatch (None: pick by device)

    def __post_init__(self) -> None:
        if self.num_negatives < 0 or self.num_in_batch_negatives < 0:
            raise ValueError(
                f"loss.num_negatives ({self.num_negatives}) and loss.num_in_batch_negatives "
                f"({self.num_in_batch_negatives}) must be >= 0"
            )
        if self.num_negatives + self.num_in_batch_negatives < 1:
            raise ValueError("loss needs at least one negative: set loss.num_negatives or loss.num_in_batch_negatives")
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature ({self.temperature}) must be > 0")


@dataclass(frozen=True, kw_only=True)
class TargetIndex:
    """Event indices (into the batch's flat event arrays) that are training targets."""

    retrieval_event: Tensor  # [N] events to retrieve; the query is the output before them
    rank_event: Tensor  # [M] events whose action is predicted


def target_index(offsets: Tensor, num_new: Tensor) -> TargetIndex:
    """Targets of a batch with event `offsets` [B+1] whose last `num_new[b]` events are new."""
    offsets = offsets.to("cpu", torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    seq = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    pos = torch.arange(int(offsets[-1])) - offsets[seq]
    new = pos >= (lengths - num_new.to("cpu", torch.int64).clamp(min=0))[seq]
    events = torch.arange(int(offsets[-1]))
    return TargetIndex(retrieval_event=events[new & (pos >= 1)], rank_event=events[new])


class GenerativeLoss:
    """Computes the objective of one batch from the model's token outputs.

    loss_fn = GenerativeLoss(config=LossConfig(), table=model.table)
    out = model.encode(rows, actions, timestamps, layout)
    losses = loss_fn(out, layout=layout, rows=rows, actions=actions, targets=target_index(...),
                     action_head=model.action_head)
    losses["loss"].backward()
    """

    def __init__(self, *, config: LossConfig, table: DynamicEmbeddingTable, seed: int = 0) -> None:
        self.config = config
        self.table = table
        self.generator = torch.Generator().manual_seed(seed)

    def negatives(self, positives: Tensor) -> Tensor:
        """Negative rows [N, K] for positives [N]; a stride-0 view of one [K] set when all are shared."""
        n = positives.numel()
        device = positives.device
        shared = []
        per_position = None
        if self.config.num_negatives:
            if self.config.shared_negatives:
                shared.append(self.table.sample_rows(self.config.num_negatives, generator=self.generator))
            else:
                live = self.table.live_rows()
                if live.numel() == 0:
                    self.table.sample_rows(1)  # raises the table's "empty table" error
                pick = torch.randint(live.numel(), (n, self.config.num_negatives), generator=self.generator)
                per_position = live.to(device)[pick.to(device)]  # (N, K)
        if self.config.num_in_batch_negatives and n:
            pick = torch.randint(n, (self.config.num_in_batch_negatives,), generator=self.generator)
            shared.append(positives.cpu()[pick])
        common = torch.cat(shared).to(device).unsqueeze(0).expand(n, -1) if shared else None  # (N, K') view
        if per_position is None:
            return common
        return per_position if common is None else torch.cat([per_position, common], dim=1)

    def __call__(
        self,
        out: Tensor,
        *,
        layout: TokenLayout,
        rows: Tensor,
        actions: Tensor,
        targets: TargetIndex,
        action_head: torch.nn.Module | None,
    ) -> dict[str, Tensor]:
        device = out.device
        losses: dict[str, Tensor] = {}
        total = out.new_zeros(())
        ev = targets.retrieval_event.to(device)
        if ev.numel():
            query = out[layout.query_token[ev - 1]]  # (N, D) output before each target event
            positives = rows[ev]  # (N,)
            neg_ids = self.negatives(positives)  # (N, K)
            per_example = sampled_softmax_loss(
                query, positives, neg_ids, self.table.weight, temperature=self.config.temperature, impl=self.config.impl
            )
            losses["retrieval"] = per_example.mean()
            total = total + self.config.retrieval_weight * losses["retrieval"]
        if action_head is not None and layout.action_token is not None:
            rk = targets.rank_event.to(device)
            if rk.numel():
                logits = action_head(out[layout.item_token[rk]])  # (M, A)
                losses["ranking"] = F.cross_entropy(logits, actions[rk])
                total = total + self.config.ranking_weight * losses["ranking"]
        losses["loss"] = total
        return losses
