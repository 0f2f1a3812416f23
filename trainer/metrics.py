"""Ranking metrics of the public sequential-recommendation protocol: HR@K, NDCG@K and MRR.

Every user has one held-out target. Its rank is the number of other candidates that score at
least as high (0 = top; ties count against the model, so a constant scorer gets no credit);
items already in the user's history are removed from the candidates before ranking (the target
itself is never removed).

- HR@K   = 1 if rank < K
- NDCG@K = 1 / log2(rank + 2) if rank < K (one relevant item, so the ideal DCG is 1)
- MRR    = 1 / (rank + 1), over the full ranking

    >>> import torch
    >>> from trainer.metrics import ranks_from_scores, RankingMetrics
    >>> scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    >>> ranks = ranks_from_scores(scores, torch.tensor([2, 0]))
    >>> ranks.tolist()
    [1, 0]
    >>> m = RankingMetrics(ks=(1, 2)); m.update(ranks); m.compute()["ndcg@2"]
    0.8154648767857288
"""

from __future__ import annotations

import math

import numpy as np
import torch


def ranks_from_scores(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of `scores[b, targets[b]]` in row b: how many other entries score >= it.

    Entries set to -inf (removed candidates) never outrank a finite target score.
    """
    target_scores = scores.gather(1, targets.view(-1, 1))  # (B, 1)
    return (scores >= target_scores).sum(dim=1) - 1


def exclude_history(
    scores: torch.Tensor, history_cols: torch.Tensor, history_offsets: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Set each row's history columns to -inf, except the row's target column (in place).

    `history_cols` is jagged: row b's history columns are `history_cols[offsets[b]:offsets[b+1]]`.
    """
    lengths = history_offsets[1:] - history_offsets[:-1]
    rows = torch.repeat_interleave(torch.arange(scores.shape[0], device=scores.device), lengths)
    keep_target = history_cols != targets[rows]
    scores[rows[keep_target], history_cols[keep_target]] = -math.inf
    return scores


class RankingMetrics:
    """Accumulates ranks over batches; `compute()` gives hr@K, ndcg@K (for each K) and mrr."""

    def __init__(self, ks: tuple[int, ...] = (10, 50, 200)) -> None:
        if not ks or min(ks) < 1:
            raise ValueError(f"ks ({ks}) must be a non-empty tuple of cut-offs >= 1")
        self.ks = tuple(ks)
        self._ranks: list[torch.Tensor] = []

    def update(self, ranks: torch.Tensor) -> None:
        self._ranks.append(ranks.detach().to("cpu", torch.float64))

    @property
    def count(self) -> int:
        return sum(int(r.numel()) for r in self._ranks)

    def compute(self) -> dict[str, float]:
        if not self._ranks:
            raise ValueError("no ranks recorded: call update() with at least one batch before compute()")
        ranks = torch.cat(self._ranks)
        out: dict[str, float] = {}
        for k in self.ks:
            hit = ranks < k
            out[f"hr@{k}"] = hit.double().mean().item()
            out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0).mean().item()
        out["mrr"] = (1.0 / (ranks + 1.0)).mean().item()
        out["count"] = float(ranks.numel())
        return out


def ndcg_per_user(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Each user's NDCG@k from its 0-based target rank (one relevant item per user)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def mean_ndcg_per_user(ranks_per_run: list, k: int = 10) -> np.ndarray:
    """Each user's NDCG@k averaged over runs (seeds) of one model; every run ranks the same users."""
    return np.mean([ndcg_per_user(ranks, k) for ranks in ranks_per_run], axis=0)


def resample_users(num_users: int, *, resamples: int, seed: int) -> np.ndarray:
    """[resamples, num_users] user indices drawn with replacement: the bootstrap of the helpers here."""
    return np.random.default_rng(seed).integers(0, num_users, size=(resamples, num_users))


def paired_bootstrap_ratio(
    top: np.ndarray, bottom: np.ndarray, *, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Ratio of means `top.mean() / bottom.mean()` of two per-user metrics on the same users, with a
    percentile interval from resampling the users (the same users for both: paired).

    It is the uncertainty that comes from which users happen to be in the evaluation set, the one
    seeds cannot average away; `p_le_1` is the share of resamples where the ratio is <= 1.
    """
    top = np.asarray(top, dtype=np.float64)
    bottom = np.asarray(bottom, dtype=np.float64)
    if top.shape != bottom.shape or top.ndim != 1 or top.size == 0:
        raise ValueError(f"need two non-empty 1-D per-user arrays of one shape, got {top.shape} and {bottom.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level ({level}) must lie in (0, 1)")
    idx = resample_users(top.size, resamples=resamples, seed=seed)
    ratios = top[idx].mean(axis=1) / np.maximum(bottom[idx].mean(axis=1), 1e-12)
    tail = (1.0 - level) / 2.0 * 100.0
    return {
        "ratio": float(top.mean() / max(bottom.mean(), 1e-12)),
        "low": float(np.percentile(ratios, tail)),
        "high": float(np.percentile(ratios, 100.0 - tail)),
        "p_le_1": float((ratios <= 1.0).mean()),
        "level": level,
        "users": int(top.size),
        "resamples": resamples,
    }


def paired_bootstrap_ratio_difference(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], *, resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """ratio(a) - ratio(b), each ratio `top.mean() / bottom.mean()` of a (top, bottom) pair of
    per-user metrics, with a 95% percentile interval from resampling the users once for all four
    arrays (a user's events stay together). `p_le_0`: the share of resamples where it is <= 0."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (*a, *b)]
    if len({x.shape for x in arrays}) != 1 or arrays[0].ndim != 1 or arrays[0].size == 0:
        raise ValueError(f"need four non-empty 1-D per-user arrays of one shape, got {[x.shape for x in arrays]}")
    a_top, a_bottom, b_top, b_bottom = arrays

    def ratio(top: np.ndarray, bottom: np.ndarray, idx: np.ndarray | slice) -> np.ndarray:
        return top[idx].mean(axis=-1) / np.maximum(bottom[idx].mean(axis=-1), 1e-12)

    idx = resample_users(a_top.size, resamples=resamples, seed=seed)
    diffs = ratio(a_top, a_bottom, idx) - ratio(b_top, b_bottom, idx)
    return {
        "value": float(ratio(a_top, a_bottom, slice(None)) - ratio(b_top, b_bottom, slice(None))),
        "low": float(np.percentile(diffs, 2.5)),
        "high": float(np.percentile(diffs, 97.5)),
        "p_le_0": float((diffs <= 0).mean()),
    }
