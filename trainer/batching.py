"""Training batches of user sequences: values plus offsets, never padded to the batch maximum.

A batch is the project's one jagged type, `features.sequence_batch.SequenceBatch`, holding the
(truncated) sequences of `B` users with `num_new` set: `num_new[b]` says how many trailing events
of user `b` are new, i.e. training targets (the streaming contract); the offline trainer marks
every event new.

Stochastic Length (Zhai et al. 2024, sec. 3.3) shortens long sequences at random to cut the
quadratic attention cost. With `N` the maximum length and `alpha` in (1, 2], a sequence of `n`
events is kept whole if `n <= N**(alpha/2)`; otherwise, with probability `1 - N**alpha / n**2`, it is
replaced by a random order-preserving subsequence of `N**(alpha/2)` events, and kept whole with
probability `N**alpha / n**2`. `alpha = 2` keeps everything.

    >>> from features.sequence_batch import SequenceBatch
    >>> from trainer.batching import make_batch
    >>> seqs = SequenceBatch.from_sequences(user_ids=[7, 8], item_ids=[[1, 2, 3], [4, 5]],
    ...     actions=[[0, 0, 0], [0, 0]], timestamps_ms=[[0, 1, 2], [3, 4]])
    >>> b = make_batch(seqs, np.array([0, 1]), max_len=2)
    >>> b.item_ids.tolist(), b.offsets.tolist(), b.num_new.tolist()
    ([2, 3, 4, 5], [0, 2, 4], [2, 2])
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from features.sequence_batch import SequenceBatch, gather, gather_slices, offsets_from_lengths


class BatchError(ValueError):
    """Batching arguments that cannot work (non-positive sizes, alpha out of range)."""


def stochastic_length_indices(
    lengths: np.ndarray, *, max_len: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray | None]:
    """Per sequence, the sorted positions to keep, or None to keep the whole sequence."""
    if not 1.0 < alpha <= 2.0:
        raise BatchError(f"stochastic_length_alpha ({alpha}) must lie in (1, 2]")
    target = int(math.floor(max_len ** (alpha / 2.0)))
    out: list[np.ndarray | None] = [None] * len(lengths)
    long = np.flatnonzero(lengths > target)
    if long.size == 0:
        return out
    n = lengths[long].astype(np.float64)
    sample = rng.random(long.size) < 1.0 - (float(max_len) ** alpha) / (n * n)
    for i in long[sample]:
        out[i] = np.sort(rng.choice(int(lengths[i]), size=target, replace=False))
    return out


def make_batch(
    seqs: SequenceBatch,
    users: np.ndarray,
    *,
    max_len: int,
    num_new: np.ndarray | None = None,
    stochastic_length_alpha: float | None = None,
    rng: np.random.Generator | None = None,
) -> SequenceBatch:
    """The batch of users at positions `users`, each cut to its latest `max_len` events.

    `num_new[i]` (default: the whole sequence) counts user i's trailing new events before
    truncation; after truncation and Stochastic Length it counts the kept new events.
    """
    if max_len < 1:
        raise BatchError(f"max_len ({max_len}) must be >= 1")
    users = np.asarray(users, dtype=np.int64)
    ends = seqs.offsets[users + 1]
    full = ends - seqs.offsets[users]
    lengths = np.minimum(full, max_len)
    starts = ends - lengths
    new = full if num_new is None else np.minimum(np.asarray(num_new, dtype=np.int64), full)
    new = np.minimum(new, lengths)
    if stochastic_length_alpha is not None and stochastic_length_alpha < 2.0:
        if rng is None:
            raise BatchError("stochastic_length_alpha needs an rng (np.random.default_rng(seed))")
        keep = stochastic_length_indices(lengths, max_len=max_len, alpha=stochastic_length_alpha, rng=rng)
        pieces = []
        for i, kept in enumerate(keep):
            if kept is None:
                pieces.append(np.arange(starts[i], ends[i]))
            else:
                pieces.append(starts[i] + kept)
                new[i] = int((kept >= lengths[i] - new[i]).sum())
                lengths[i] = kept.size
        idx = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    else:
        idx, _ = gather_slices(starts, lengths)
    return gather(seqs, users, idx, offsets_from_lengths(lengths), new.astype(np.int64))


def iterate_batches(
    seqs: SequenceBatch,
    *,
    batch_size: int,
    max_len: int,
    shuffle: bool,
    rng: np.random.Generator,
    stochastic_length_alpha: float | None = None,
    min_length: int = 1,
) -> Iterator[SequenceBatch]:
    """One epoch of batches over all users with at least `min_length` events."""
    if batch_size < 1:
        raise BatchError(f"batch_size ({batch_size}) must be >= 1")
    users = np.flatnonzero(seqs.lengths >= min_length)
    if shuffle:
        users = rng.permutation(users)
    for start in range(0, users.size, batch_size):
        yield make_batch(
            seqs,
            users[start : start + batch_size],
            max_len=max_len,
            stochastic_length_alpha=stochastic_length_alpha,
            rng=rng,
        )
