"""Prequential evaluation of a stream: score each batch's new events before training on them.

In a stream every event is seen once, so the honest test is "predict, then learn": before the
trainer trains on a batch of examples, the current model scores that batch's new events.

- Retrieval (every layout): each new event's item is ranked among the model's live vocabulary
  from the history before it (cosine of the query token's output against every live item row).
  A target without a live row (not admitted yet, or evicted) is a miss (rank `MISS`). Nothing is excluded:
  users come back to items. HR@10 and NDCG@10 follow (trainer.metrics).
- Ranking (interleaved layout): the action head's probabilities at each new event's item token;
  `action_auc` is the macro one-vs-rest ROC AUC over the action types present (each type's
  probability separating events with that action from the others).
- Popularity, the baseline beside it: the items engaged most in a sliding window of the last
  `window` trained events, ranked over the same live vocabulary, ties counted against it (so a
  cold window scores nothing).

    >>> import numpy as np
    >>> pop = Popularity(window=4)
    >>> pop.update(np.array([7, 7, 8, 9]))
    >>> pop.ranks(np.array([7, 9, 5, 6]), live_ids=np.array([5, 7, 8, 9])).tolist()[:3]
    [0, 2, 3]
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from features.sequence_batch import SequenceBatch, take_users
from trainer.losses import target_index
from trainer.metrics import RankingMetrics
from trainer.model import HSTUModel

MISS = np.iinfo(np.int32).max  # the rank of a target that has no live row: a miss at every cut-off


@dataclass(frozen=True, kw_only=True)
class PrequentialScores:
    """Ranks and action probabilities of a batch's new events, before training on them."""

    ranks: np.ndarray  # [N] rank of each retrieval target among the live items (0 = top)
    target_items: np.ndarray  # [N] raw item ids of those targets
    action_probs: np.ndarray | None  # [M, num_actions] at each new event's item token
    actions: np.ndarray | None  # [M] the actions taken

    def metrics(self, *, k: int = 10) -> dict[str, float]:
        out = hr_ndcg(self.ranks, k=k)
        if self.action_probs is not None and len(self.actions):
            out["action_auc"] = macro_auc(self.action_probs, self.actions)
        return out


def hr_ndcg(ranks: np.ndarray, *, k: int = 10) -> dict[str, float]:
    """HR@k and NDCG@k of 0-based ranks (NaN when there are none)."""
    if len(ranks) == 0:
        return {f"hr@{k}": float("nan"), f"ndcg@{k}": float("nan"), "events": 0}
    metrics = RankingMetrics(ks=(k,))
    metrics.update(torch.as_tensor(np.asarray(ranks, dtype=np.int64)))
    got = metrics.compute()
    return {f"hr@{k}": got[f"hr@{k}"], f"ndcg@{k}": got[f"ndcg@{k}"], "events": len(ranks)}


def macro_auc(probs: np.ndarray, actions: np.ndarray) -> float:
    """Mean over action types present (with both positives and negatives) of the ROC AUC of that
    type's probability; Mann-Whitney with average ranks for ties. NaN when no type qualifies."""
    aucs = []
    for a in np.unique(actions):
        positive = actions == a
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = pd.Series(probs[:, a]).rank(method="average").to_numpy()
        aucs.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs)) if aucs else float("nan")


@torch.no_grad()
def score_new_events(model: HSTUModel, examples: SequenceBatch, *, chunk: int = 256) -> PrequentialScores:
    """Score the new events (trailing `num_new`) of `examples` with `model` as it is now."""
    was_training = model.training
    model.eval()
    device = model.device
    ranks, items, probs, acts = [], [], [], []
    live = model.table.live_mask().to(device)
    table = F.normalize(model.table.weight, dim=-1)  # (R, D)
    try:
        for lo in range(0, len(examples), chunk):
            batch = take_users(examples, np.arange(lo, min(lo + chunk, len(examples))))
            offsets = torch.from_numpy(batch.offsets)
            rows = model.table.lookup(batch.item_ids).to(device)
            actions = torch.from_numpy(batch.actions).to(device)
            layout = model.layout(offsets)
            out = model.encode(rows, actions, torch.from_numpy(batch.timestamps_ms).to(device), layout)
            targets = target_index(offsets, torch.from_numpy(batch.num_new))
            ev = targets.retrieval_event.to(device)
            if ev.numel():
                query = F.normalize(out[layout.query_token[ev - 1]], dim=-1)  # (N, D)
                scores = (query @ table.T).masked_fill(~live, -torch.inf)  # (N, R)
                target_rows = rows[ev]
                target_scores = scores.gather(1, target_rows[:, None])  # (N, 1)
                alive = live[target_rows]
                beaten = (scores >= target_scores).sum(dim=1) - 1  # the target itself does not count
                ranks.append(torch.where(alive, beaten, torch.full_like(beaten, MISS)).cpu().numpy())
                items.append(batch.item_ids[targets.retrieval_event.numpy()])
            if model.action_head is not None and layout.action_token is not None:
                rk = targets.rank_event.to(device)
                if rk.numel():
                    probs.append(torch.softmax(model.action_head(out[layout.item_token[rk]]), dim=-1).cpu().numpy())
                    acts.append(batch.actions[targets.rank_event.numpy()])
    finally:
        model.train(was_training)
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return PrequentialScores(
        ranks=cat(ranks, np.int64),
        target_items=cat(items, np.int64),
        action_probs=np.concatenate(probs) if probs else None,
        actions=cat(acts, np.int64) if probs else None,
    )


class Popularity:
    """The most-engaged items of the last `window` events: the prequential baseline."""

    def __init__(self, *, window: int) -> None:
        if window < 1:
            raise ValueError(f"popularity window ({window}) must be >= 1 event")
        self.window = window
        self._chunks: deque[np.ndarray] = deque()
        self._size = 0

    def update(self, items: np.ndarray) -> None:
        """Add the items of events just trained on; forget the oldest beyond `window`."""
        items = np.asarray(items, dtype=np.int64)[-self.window :]
        self._chunks.append(items)
        self._size += len(items)
        while self._size - len(self._chunks[0]) >= self.window:
            self._size -= len(self._chunks.popleft())
        if self._size > self.window:  # trim the oldest chunk to the window exactly
            excess = self._size - self.window
            self._chunks[0] = self._chunks[0][excess:]
            self._size = self.window

    def ranks(self, targets: np.ndarray, *, live_ids: np.ndarray) -> np.ndarray:
        """0-based rank of each target among `live_ids` by count in the window (ties against)."""
        recent = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int64)
        ids, counts = np.unique(recent, return_counts=True)

        def count_of(query: np.ndarray) -> np.ndarray:
            if len(ids) == 0:
                return np.zeros(len(query), dtype=np.int64)
            at = np.minimum(np.searchsorted(ids, query), len(ids) - 1)
            return np.where(ids[at] == query, counts[at], 0)

        live_counts = np.sort(count_of(np.asarray(live_ids, dtype=np.int64)))
        target_counts = count_of(np.asarray(targets, dtype=np.int64))
        is_live = np.isin(targets, live_ids)
        # live items counted at least as often as the target, minus the target itself
        beaten = len(live_counts) - np.searchsorted(live_counts, target_counts, side="left") - 1
        return np.where(is_live, beaten, MISS).astype(np.int64)
