"""Full-ranking evaluation of the public protocol: every live item is a candidate.

For each user the model encodes the (latest `max_seq_len` events of the) history, scores every
live table row by cosine similarity, removes the items of the user's whole history (except the
target) and ranks the held-out target. A target with no row of its own (never admitted) scores
-inf and counts as a miss.

    metrics = evaluate_retrieval(model, split.valid, max_seq_len=200)
    metrics["ndcg@10"], metrics["hr@10"], metrics["mrr"]
    ranks = retrieval_ranks(model, split.test, max_seq_len=200)   # per user, for paired comparisons
"""

from __future__ import annotations

import numpy as np
import torch

from features.sequence_batch import SequenceBatch
from trainer.batching import make_batch
from trainer.metrics import RankingMetrics, exclude_history, ranks_from_scores
from trainer.model import HSTUModel
from trainer.splits import EvalSet


@torch.no_grad()
def retrieval_ranks(
    model: HSTUModel,
    eval_set: EvalSet,
    *,
    max_seq_len: int,
    batch_size: int = 256,
    exclude: SequenceBatch | None = None,
) -> np.ndarray:
    """Each user's 0-based rank of the held-out target among all live items (history removed).

    One int64 per user, in `eval_set` order; a target with no live row gets the number of rows
    (a miss at every cut-off). `evaluate_retrieval` is these ranks through `RankingMetrics`.
    `exclude` (default: `eval_set.history`) holds the items removed from each user's ranking; a
    diagnostic that encodes a shorter context than the user has seen passes the longer one here.
    """
    if exclude is None:
        exclude = eval_set.history
    elif len(exclude) != len(eval_set.history):
        raise ValueError(f"exclude has {len(exclude)} users, the eval set {len(eval_set.history)}")
    elif not np.array_equal(exclude.user_ids, eval_set.history.user_ids):
        raise ValueError("exclude holds other users, or the same in another order, than the eval set")
    was_training = model.training
    model.eval()
    history = eval_set.history
    device = model.device
    all_users = np.arange(len(history))
    longest = int(exclude.lengths.max()) if len(exclude) else 0
    out: list[torch.Tensor] = []
    try:
        for start in range(0, len(history), batch_size):
            users = all_users[start : start + batch_size]
            batch = make_batch(history, users, max_len=max_seq_len)
            rows = model.table.lookup(batch.item_ids).to(device)
            request = torch.from_numpy(eval_set.target_timestamps_ms[users]).to(device)  # when the target came
            scores = model.retrieval_scores(
                rows,
                torch.from_numpy(batch.actions).to(device),
                torch.from_numpy(batch.timestamps_ms).to(device),
                torch.from_numpy(batch.offsets),
                request,
            )  # (B, num_rows)
            targets = model.table.lookup(torch.from_numpy(eval_set.targets[users])).to(device)
            alive = model.table.live_mask().to(device)[targets]
            full = make_batch(exclude, users, max_len=max(longest, 1))  # whole history, for exclusion
            seen = model.table.lookup(full.item_ids).to(device)
            scores = exclude_history(scores, seen, torch.from_numpy(full.offsets).to(device), targets)
            ranks = ranks_from_scores(scores, targets)
            out.append(torch.where(alive, ranks, torch.full_like(ranks, scores.shape[1])).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)


def evaluate_retrieval(
    model: HSTUModel,
    eval_set: EvalSet,
    *,
    max_seq_len: int,
    batch_size: int = 256,
    ks: tuple[int, ...] = (10, 50, 200),
) -> dict[str, float]:
    """HR@K, NDCG@K (each K in `ks`) and MRR of `model` on `eval_set`."""
    return metrics_from_ranks(retrieval_ranks(model, eval_set, max_seq_len=max_seq_len, batch_size=batch_size), ks=ks)


def metrics_from_ranks(ranks: np.ndarray, *, ks: tuple[int, ...] = (10, 50, 200)) -> dict[str, float]:
    """HR@K, NDCG@K and MRR of per-user ranks (as `retrieval_ranks` gives them)."""
    metrics = RankingMetrics(ks=ks)
    if len(ranks):  # none: compute() says so
        metrics.update(torch.as_tensor(np.asarray(ranks, dtype=np.int64)))
    return metrics.compute()
