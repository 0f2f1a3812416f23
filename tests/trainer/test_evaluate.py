"""trainer/evaluate.py: full-ranking evaluation asks for each target at the target's own time, per-user ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.sequence_batch import SequenceBatch, offsets_from_lengths
from features.sequence_batch import take_users as select_users
from trainer.batching import make_batch
from trainer.evaluate import evaluate_retrieval, metrics_from_ranks, retrieval_ranks
from trainer.model import ModelConfig, build_model
from trainer.splits import EvalSet, leave_one_out


def sequences(lengths: list[int], items: np.ndarray, timestamps_ms: np.ndarray) -> SequenceBatch:
    """Users 0.. with `lengths` events of `items` and `timestamps_ms` (concatenated), action 0."""
    n = sum(lengths)
    return SequenceBatch(
        user_ids=np.arange(len(lengths), dtype=np.int64),
        offsets=offsets_from_lengths(np.asarray(lengths, dtype=np.int64)),
        item_ids=np.asarray(items, dtype=np.int64),
        actions=np.zeros(n, dtype=np.int64),
        timestamps_ms=np.asarray(timestamps_ms, dtype=np.int64),
        last_partition=np.full(len(lengths), -1, dtype=np.int64),
        last_offset=np.full(len(lengths), -1, dtype=np.int64),
    )


def minute_apart(lengths: list[int], items: np.ndarray) -> SequenceBatch:
    """Users 0.. with `lengths` events of `items` (concatenated), one a minute, action 0."""
    return sequences(lengths, items, np.arange(sum(lengths)) * 60_000)


def test_request_time_is_the_targets_time(monkeypatch) -> None:
    """Under query_time="next" the last query token is asked at the held-out event's time."""
    lengths = [5, 7, 4]
    n = sum(lengths)
    seqs = sequences(lengths, np.arange(n) % 11 + 1, (np.arange(n) * 3600 + 7) * 1000)
    split = leave_one_out(seqs)
    model = build_model(
        ModelConfig(dim=16, qk_dim=8, v_dim=8, max_seq_len=10, num_time_buckets=64, query_time="next"), capacity=16
    )
    model.table.observe(torch.arange(1, 12), now=0.0)
    seen: list[torch.Tensor] = []
    real = model.user_embeddings

    def spy(rows, actions, timestamps_ms, offsets, request_timestamps_ms=None):
        seen.append(request_timestamps_ms.cpu())
        return real(rows, actions, timestamps_ms, offsets, request_timestamps_ms)

    monkeypatch.setattr(model, "user_embeddings", spy)
    for eval_set in (split.valid, split.test):
        seen.clear()
        evaluate_retrieval(model, eval_set, max_seq_len=10, batch_size=2)
        assert torch.cat(seen).tolist() == eval_set.target_timestamps_ms.tolist()
    # and the request time changes the users' embeddings (it is not ignored downstream)
    hist = split.test.history
    rows = model.table.lookup(torch.from_numpy(hist.item_ids))
    offsets = torch.from_numpy(hist.offsets)
    ts = torch.from_numpy(hist.timestamps_ms)
    acts = torch.from_numpy(hist.actions)
    at_target = real(rows, acts, ts, offsets, torch.from_numpy(split.test.target_timestamps_ms))
    much_later = real(rows, acts, ts, offsets, torch.from_numpy(split.test.target_timestamps_ms) + 10_000_000_000)
    assert not torch.allclose(at_target, much_later, atol=1e-6)


def test_ranks_per_user_give_the_metrics() -> None:
    """retrieval_ranks is one rank per user, in order, and evaluate_retrieval is exactly those ranks."""
    lengths = [6, 9, 4, 5, 8]
    split = leave_one_out(minute_apart(lengths, np.random.default_rng(3).integers(1, 20, sum(lengths))))
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=16, qk_dim=8, v_dim=8, max_seq_len=10, num_time_buckets=16), capacity=32)
    model.table.observe(torch.arange(1, 20), now=0.0)
    ranks = retrieval_ranks(model, split.test, max_seq_len=10, batch_size=2)
    assert ranks.dtype == np.int64 and ranks.shape == (5,)
    # user by user, alone in its batch: the same rank as in a batch of two
    for u in range(5):
        one = EvalSet(
            history=select_users(split.test.history, np.array([u])),
            targets=split.test.targets[u : u + 1],
            target_actions=split.test.target_actions[u : u + 1],
            target_timestamps_ms=split.test.target_timestamps_ms[u : u + 1],
        )
        assert retrieval_ranks(model, one, max_seq_len=10).tolist() == [ranks[u]]
    # by hand for each user: the live items outside its history (the target kept) that score at
    # least as high as the target, not counting the target itself
    hist = split.test.history
    for u in range(5):
        items = hist.sequence(u).item_ids[-10:]
        rows = model.table.lookup(torch.from_numpy(items))
        sl = slice(hist.offsets[u], hist.offsets[u + 1])
        ts = torch.from_numpy(hist.timestamps_ms[sl][-10:])
        acts = torch.from_numpy(hist.actions[sl][-10:])
        with torch.no_grad():
            model.eval()
            scores = model.retrieval_scores(
                rows,
                acts,
                ts,
                torch.tensor([0, items.size]),
                torch.from_numpy(split.test.target_timestamps_ms[u : u + 1]),
            )[0]
        target = int(model.table.lookup(torch.from_numpy(split.test.targets[u : u + 1]))[0])
        seen = set(model.table.lookup(torch.from_numpy(hist.sequence(u).item_ids)).tolist()) - {target}
        live = torch.nonzero(model.table.live_mask()).flatten().tolist()
        expected = sum(1 for r in live if r != target and r not in seen and scores[r] >= scores[target])
        assert ranks[u] == expected, (u, ranks[u], expected)
    assert evaluate_retrieval(model, split.test, max_seq_len=10) == metrics_from_ranks(ranks)
    with pytest.raises(ValueError, match="no ranks recorded"):
        metrics_from_ranks(np.zeros(0, np.int64))


def test_exclude_removes_the_longer_history_from_the_ranking() -> None:
    """A context shorter than what the user has seen: `exclude` decides which items leave the ranking."""
    lengths = [6, 9, 5]
    rng = np.random.default_rng(5)
    items = np.concatenate([rng.permutation(np.arange(1, 20))[:k] for k in lengths])  # no item twice per user
    split = leave_one_out(minute_apart(lengths, items))
    torch.manual_seed(1)
    model = build_model(ModelConfig(dim=16, qk_dim=8, v_dim=8, max_seq_len=10, num_time_buckets=16), capacity=32)
    model.table.observe(torch.arange(1, 20), now=0.0)
    # the test target ranked from the training events alone (the validation context)
    short = EvalSet(
        history=split.valid.history,
        targets=split.test.targets,
        target_actions=split.test.target_actions,
        target_timestamps_ms=split.test.target_timestamps_ms,
    )
    plain = retrieval_ranks(model, short, max_seq_len=10)
    without_valid_item = retrieval_ranks(model, short, max_seq_len=10, exclude=split.test.history)
    # by hand: removing the validation item too lowers the rank by one exactly where it outscored the target
    model.eval()
    with torch.no_grad():
        batch = make_batch(short.history, np.arange(3), max_len=10)
        scores = model.retrieval_scores(
            model.table.lookup(batch.item_ids),
            torch.from_numpy(batch.actions),
            torch.from_numpy(batch.timestamps_ms),
            torch.from_numpy(batch.offsets),
            torch.from_numpy(short.target_timestamps_ms),
        )
    rows = model.table.lookup(torch.from_numpy(split.valid.targets))
    targets = model.table.lookup(torch.from_numpy(split.test.targets))
    above = (scores[torch.arange(3), rows] >= scores[torch.arange(3), targets]).numpy()
    assert (plain - without_valid_item).tolist() == above.astype(np.int64).tolist()
    with pytest.raises(ValueError, match="exclude has 2 users"):
        retrieval_ranks(model, short, max_seq_len=10, exclude=select_users(split.test.history, np.array([0, 1])))
    with pytest.raises(ValueError, match="another order"):
        retrieval_ranks(model, short, max_seq_len=10, exclude=select_users(split.test.history, np.array([1, 0, 2])))
