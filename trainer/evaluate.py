"""Full-ranking evaluation of the public protocol: every live item is a candidate.

For each user the model encodes the (latest `max_seq_len` events of the) history, scores every
live table row by cosine similarity, removes the items of the user's whole history (except the
target) and ranks the held-out target. A target with no row of its own (never admitted) scores
-inf and counts as a miss.

    metrics = evaluate_retrieval(model, split.valid, max_seq_len=200)
    metrics["ndcg@10"], metrics["hr@10"], metrics["mrr"]
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.batching import make_batch
from trainer.metrics import RankingMetrics, exclude_history, ranks_from_scores
from trainer.model import HSTUModel
from trainer.splits import EvalSet


@torch.no_grad()
def evaluate_retrieval(
    model: HSTUModel,
    eval_set: EvalSet,
    *,
    max_seq_len: int,
    batch_size: int = 256,
    ks: tuple[int, ...] = (10, 50, 200),
) -> dict[str, float]:
    """HR@K, NDCG@K (each K in `ks`) and MRR of `model` on `eval_set`."""
    was_training = model.training
    model.eval()
    metrics = RankingMetrics(ks=ks)
    history = eval_set.history
    device = model.device
    all_users = np.arange(history.num_users)
    longest = int(history.lengths.max()) if history.num_users else 0
    try:
        for start in range(0, history.num_users, batch_size):
            users = all_users[start : start + batch_size]
            batch = make_batch(history, users, max_len=max_seq_len)
            rows = model.table.lookup(batch.item_ids).to(device)
            request = torch.from_numpy(eval_set.target_timestamps[users]).to(device)  # when the target came
            scores = model.retrieval_scores(
                rows, batch.actions.to(device), batch.timestamps.to(device), batch.offsets, request
            )  # (B, num_rows)
            targets = model.table.lookup(torch.from_numpy(eval_set.targets[users])).to(device)
            alive = model.table.live_mask().to(device)[targets]
            full = make_batch(history, users, max_len=max(longest, 1))  # whole history, for exclusion
            seen = model.table.lookup(full.item_ids).to(device)
            scores = exclude_history(scores, seen, full.offsets.to(device), targets)
            ranks = ranks_from_scores(scores, targets)
            ranks = torch.where(alive, ranks, torch.full_like(ranks, scores.shape[1]))
            metrics.update(ranks)
    finally:
        model.train(was_training)
    return metrics.compute()
