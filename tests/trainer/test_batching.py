"""trainer/batching.py: jagged training batches (no padding), truncation, num_new and Stochastic Length."""

from __future__ import annotations

import numpy as np
import pytest

from features.sequence_batch import SequenceBatch
from trainer.batching import BatchError, iterate_batches, make_batch, stochastic_length_indices


def seqs_of(lengths: list[int]) -> SequenceBatch:
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    n = int(offsets[-1])
    return SequenceBatch(
        user_ids=np.arange(100, 100 + len(lengths), dtype=np.int64),
        offsets=offsets,
        item_ids=np.arange(n, dtype=np.int64),
        actions=np.arange(n, dtype=np.int64) % 5,
        timestamps_ms=np.arange(n, dtype=np.int64) * 10,
        last_partition=np.arange(len(lengths), dtype=np.int64),
        last_offset=np.arange(len(lengths), dtype=np.int64) * 7,
    )


def test_batch_is_jagged_and_truncates_to_latest() -> None:
    seqs = seqs_of([5, 2, 7])
    batch = make_batch(seqs, np.array([2, 1]), max_len=4)
    assert batch.offsets.tolist() == [0, 4, 6]
    assert batch.item_ids.tolist() == [10, 11, 12, 13, 5, 6]  # user 2's latest 4, then user 1
    assert batch.timestamps_ms.tolist() == [100, 110, 120, 130, 50, 60]
    assert batch.user_ids.tolist() == [102, 101] and batch.last_offset.tolist() == [14, 7]  # watermarks follow
    assert batch.num_events == 6 and len(batch) == 2
    assert batch.num_new.tolist() == [4, 2]


def test_num_new_is_clipped_to_kept_events() -> None:
    seqs = seqs_of([5, 3])
    batch = make_batch(seqs, np.array([0, 1]), max_len=4, num_new=np.array([1, 9]))
    assert batch.num_new.tolist() == [1, 3]


def test_epoch_covers_every_user_once() -> None:
    seqs = seqs_of([3, 1, 4, 2, 5])
    rng = np.random.default_rng(0)
    batches = list(iterate_batches(seqs, batch_size=2, max_len=10, shuffle=True, rng=rng, min_length=2))
    users = np.concatenate([b.user_ids for b in batches]).tolist()
    assert sorted(users) == [100, 102, 103, 104] and [len(b) for b in batches] == [2, 2]
    assert sum(b.num_events for b in batches) == 3 + 4 + 2 + 5


def test_stochastic_length_formula() -> None:
    rng = np.random.default_rng(0)
    max_len, alpha = 100, 1.6
    target = int(max_len ** (alpha / 2))  # 39
    lengths = np.array([30, 39, 100] * 2000)
    keep = stochastic_length_indices(lengths, max_len=max_len, alpha=alpha, rng=rng)
    assert all(k is None for k in keep[0::3]) and all(k is None for k in keep[1::3])
    sampled = [k for k in keep[2::3] if k is not None]
    assert all(k.size == target and np.all(np.diff(k) > 0) and k.max() < 100 for k in sampled)
    expected = 1 - max_len**alpha / 100**2  # probability of subsampling a length-100 sequence
    assert abs(len(sampled) / 2000 - expected) < 0.04


def test_stochastic_length_in_batch_counts_new() -> None:
    seqs = seqs_of([100])
    rng = np.random.default_rng(3)
    lengths = set()
    for _ in range(30):
        b = make_batch(seqs, np.array([0]), max_len=100, num_new=np.array([10]), stochastic_length_alpha=1.5, rng=rng)
        kept = b.item_ids
        assert np.all(np.diff(kept) > 0)
        assert b.num_new.item() == int((kept >= 90).sum())
        lengths.add(b.num_events)
    assert lengths <= {31, 100} and 31 in lengths


def test_alpha_two_keeps_everything_and_bad_args() -> None:
    seqs = seqs_of([50])
    b = make_batch(seqs, np.array([0]), max_len=50, stochastic_length_alpha=2.0, rng=np.random.default_rng(0))
    assert b.num_events == 50
    with pytest.raises(BatchError, match=r"stochastic_length_alpha \(0.5\)"):
        stochastic_length_indices(np.array([5]), max_len=5, alpha=0.5, rng=np.random.default_rng(0))
    with pytest.raises(BatchError, match="needs an rng"):
        make_batch(seqs, np.array([0]), max_len=50, stochastic_length_alpha=1.5)
    with pytest.raises(BatchError, match=r"max_len \(0\)"):
        make_batch(seqs, np.array([0]), max_len=0)
