"""trainer/evaluate.py: full-ranking evaluation asks for each target at the target's own time."""

from __future__ import annotations

import numpy as np
import torch

from trainer.evaluate import evaluate_retrieval
from trainer.model import ModelConfig, build_model
from trainer.splits import UserSequences, leave_one_out


def test_request_time_is_the_targets_time(monkeypatch) -> None:
    """Under query_time="next" the last query token is asked at the held-out event's time."""
    lengths = [5, 7, 4]
    n = sum(lengths)
    seqs = UserSequences(
        user_ids=np.arange(3, dtype=np.int64),
        offsets=np.r_[0, np.cumsum(lengths)].astype(np.int64),
        item_ids=(np.arange(n) % 11 + 1).astype(np.int64),
        actions=np.zeros(n, dtype=np.int64),
        timestamps=(np.arange(n) * 3600 + 7).astype(np.int64),
    )
    split = leave_one_out(seqs)
    model = build_model(
        ModelConfig(dim=16, qk_dim=8, v_dim=8, max_seq_len=10, num_time_buckets=64, query_time="next"), capacity=16
    )
    model.table.observe(torch.arange(1, 12), now=0.0)
    seen: list[torch.Tensor] = []
    real = model.user_embeddings

    def spy(rows, actions, timestamps, offsets, request_timestamps=None):
        seen.append(request_timestamps.cpu())
        return real(rows, actions, timestamps, offsets, request_timestamps)

    monkeypatch.setattr(model, "user_embeddings", spy)
    for eval_set in (split.valid, split.test):
        seen.clear()
        evaluate_retrieval(model, eval_set, max_seq_len=10, batch_size=2)
        assert torch.cat(seen).tolist() == eval_set.target_timestamps.tolist()
    # and the request time changes the users' embeddings (it is not ignored downstream)
    hist = split.test.history
    rows = model.table.lookup(torch.from_numpy(hist.item_ids))
    offsets = torch.from_numpy(hist.offsets)
    ts = torch.from_numpy(hist.timestamps)
    acts = torch.from_numpy(hist.actions)
    at_target = real(rows, acts, ts, offsets, torch.from_numpy(split.test.target_timestamps))
    much_later = real(rows, acts, ts, offsets, torch.from_numpy(split.test.target_timestamps) + 10_000_000)
    assert not torch.allclose(at_target, much_later, atol=1e-6)
