"""trainer/model.py (+ trainer/sasrec.py, trainer/layout.py): gradients, masks, candidates, layouts, scoring."""

from __future__ import annotations

import pytest
import torch

from trainer.layout import ModelInputError, build_layout
from trainer.losses import GenerativeLoss, LossConfig, target_index
from trainer.model import HSTUModel, ModelConfig, bias_seconds, build_model

SMALL = dict(dim=16, qk_dim=8, v_dim=8, num_heads=2, max_seq_len=24, num_actions=4, num_time_buckets=16)


def make(**kw) -> HSTUModel:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**SMALL, **kw}), capacity=64)
    model.table.observe(torch.arange(1, 60), now=0.0)
    return model


def batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    n = int(offsets[-1])
    ids = torch.randint(1, 60, (n,), generator=g)
    actions = torch.randint(0, 4, (n,), generator=g)
    ts = torch.cumsum(torch.randint(0, 5000, (n,), generator=g), 0) * 1000  # ms, whole seconds apart
    return offsets, ids, actions, ts


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(layout="interleaved"), dict(action_input=True), dict(encoder="sasrec", num_time_buckets=0)],
    ids=["hstu-items", "hstu-interleaved", "hstu-items-actions", "sasrec"],
)
def test_gradients_reach_every_parameter(kw: dict) -> None:
    model = make(**kw)
    offsets, ids, actions, ts = batch([5, 9, 2])
    rows = model.table.lookup(ids)
    layout = model.layout(offsets)
    out = model.encode(rows, actions, ts, layout)
    loss_fn = GenerativeLoss(config=LossConfig(num_negatives=8, num_in_batch_negatives=4), table=model.table)
    losses = loss_fn(
        out,
        layout=layout,
        rows=rows,
        actions=actions,
        targets=target_index(offsets, offsets[1:] - offsets[:-1]),
        action_head=model.action_head,
    )
    losses["loss"].backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
    ]
    assert missing == []
    assert ("ranking" in losses) == (kw.get("layout") == "interleaved")


@pytest.mark.parametrize("layout", ["items", "interleaved"])
def test_attention_is_causal(layout: str) -> None:
    model = make(layout=layout).eval()
    offsets, ids, actions, ts = batch([10])
    lay = model.layout(offsets)
    before = model.encode(model.table.lookup(ids), actions, ts, lay)
    ids2, actions2 = ids.clone(), actions.clone()
    ids2[6] = 59 if ids[6] != 59 else 58
    actions2[6] = (actions[6] + 1) % 4
    after = model.encode(model.table.lookup(ids2), actions2, ts, lay)
    first_changed = int(lay.item_token[6])
    assert torch.allclose(before[:first_changed], after[:first_changed], atol=1e-6)
    assert not torch.allclose(before[first_changed:], after[first_changed:], atol=1e-6)


def test_candidates_never_see_each_other_and_rank_in_one_pass() -> None:
    model = make(layout="interleaved", max_candidates=6).eval()
    offsets, ids, actions, ts = batch([7])
    cands = torch.tensor([3, 17, 29, 41])
    together = model.rank(item_ids=ids, actions=actions, timestamps_ms=ts, candidate_ids=cands)
    alone = torch.cat(
        [model.rank(item_ids=ids, actions=actions, timestamps_ms=ts, candidate_ids=cands[i : i + 1]) for i in range(4)]
    )
    assert together.shape == (4, 4)
    assert torch.allclose(together, alone, atol=1e-5)
    swapped = model.rank(item_ids=ids, actions=actions, timestamps_ms=ts, candidate_ids=cands.flip(0))
    assert torch.allclose(swapped.flip(0), together, atol=1e-5)  # candidate order does not matter


def test_candidates_do_not_change_history_outputs() -> None:
    model = make(layout="interleaved", max_candidates=3).eval()
    offsets, ids, actions, ts = batch([5, 4])
    rows = model.table.lookup(ids)
    plain = model.encode(rows, actions, ts, model.layout(offsets))
    cand_offsets = torch.tensor([0, 2, 3])
    lay = model.layout(offsets, cand_offsets)
    with_c = model.encode(
        rows,
        actions,
        ts,
        lay,
        candidate_rows=model.table.lookup(torch.tensor([8, 9, 10])),
        candidate_timestamps_ms=torch.full((3,), int(ts[-1])),
    )
    history_tokens = torch.cat([lay.item_token, lay.action_token]).sort().values
    assert torch.allclose(with_c[history_tokens], plain, atol=1e-6)


def test_query_times_are_the_next_events_time() -> None:
    """query_time="next": a query token measures its time gaps from the event it retrieves."""
    ts = torch.tensor([10, 20, 35, 100, 130])
    items = build_layout(torch.tensor([0, 3, 3, 5]), interleaved=False)  # users of 3, 0 and 2 events
    assert HSTUModel.query_times(ts, ts, items).tolist() == [20, 35, 35, 130, 130]  # last: its own time
    request = torch.tensor([50, 999, 140])  # the empty user's request time is unused
    assert HSTUModel.query_times(ts, ts, items, request).tolist() == [20, 35, 50, 130, 140]
    # interleaved, with a candidate: action tokens retrieve, item and candidate tokens keep their own time
    inter = build_layout(torch.tensor([0, 2]), interleaved=True, candidate_offsets=torch.tensor([0, 1]))
    token_ts = torch.tensor([10, 10, 20, 20, 25])  # I0 A0 I1 A1 C
    got = HSTUModel.query_times(torch.tensor([10, 20]), token_ts, inter, torch.tensor([30]))
    assert got.tolist() == [10, 20, 20, 30, 25]


@pytest.mark.parametrize("layout", ["items", "interleaved"])
def test_next_query_time_changes_outputs_only_through_the_next_time(layout: str) -> None:
    model = make(layout=layout, query_time="next", num_time_buckets=64).eval()  # buckets up to 5 years
    offsets, ids, actions, ts = batch([10])
    lay = model.layout(offsets)
    rows = model.table.lookup(ids)
    base = model.encode(rows, actions, ts, lay)
    ids2 = ids.clone()
    ids2[6] = 59 if ids[6] != 59 else 58  # a later item: causal as before
    assert torch.allclose(
        model.encode(model.table.lookup(ids2), actions, ts, lay)[: int(lay.item_token[6])],
        base[: int(lay.item_token[6])],
        atol=1e-6,
    )
    ts2 = ts.clone()
    ts2[6:] += (
        10_000_000_000  # event 6 (10^7 s later) happens much later: event 5's query (and everything after) sees it
    )
    moved = model.encode(rows, actions, ts2, lay)
    q5 = int(lay.query_token[5])
    assert torch.allclose(moved[:q5], base[:q5], atol=1e-6)
    assert not torch.allclose(moved[q5], base[q5], atol=1e-6)
    # the request time drives the last query token; without one it is the last event's time
    last = int(lay.query_token[-1])
    same = model.encode(rows, actions, ts, lay, request_timestamps_ms=ts[-1:])
    later = model.encode(rows, actions, ts, lay, request_timestamps_ms=ts[-1:] + 10_000_000_000)
    assert torch.allclose(same, base, atol=1e-6)
    assert torch.allclose(later[:last], base[:last], atol=1e-6)
    assert not torch.allclose(later[last], base[last], atol=1e-6)


def test_rank_asks_at_the_candidates_time_under_next_query_time() -> None:
    """The last history token's query time is the request time: by default the candidates' time."""
    model = make(layout="interleaved", max_candidates=4, query_time="next", num_time_buckets=64).eval()
    _, ids, actions, ts = batch([7])
    cands = torch.tensor([3, 17, 29])
    when = torch.full((3,), int(ts[-1]) + 86_400_000)  # a day after the last event
    default = model.rank(
        item_ids=ids, actions=actions, timestamps_ms=ts, candidate_ids=cands, candidate_timestamps_ms=when
    )
    explicit = model.rank(
        item_ids=ids,
        actions=actions,
        timestamps_ms=ts,
        candidate_ids=cands,
        candidate_timestamps_ms=when,
        request_timestamps_ms=when[:1],
    )
    at_last = model.rank(
        item_ids=ids,
        actions=actions,
        timestamps_ms=ts,
        candidate_ids=cands,
        candidate_timestamps_ms=when,
        request_timestamps_ms=ts[-1:],
    )
    assert torch.allclose(default, explicit, atol=1e-6)
    assert not torch.allclose(default, at_last, atol=1e-6)


def test_interleaved_layout_indices() -> None:
    lay = build_layout(torch.tensor([0, 2, 3]), interleaved=True, candidate_offsets=torch.tensor([0, 1, 3]))
    # user 0: I0 A0 I1 A1 C ; user 1: I2 A2 C C
    assert lay.offsets.tolist() == [0, 5, 9]
    assert lay.item_token.tolist() == [0, 2, 5]
    assert lay.action_token.tolist() == [1, 3, 6]
    assert lay.candidate_token.tolist() == [4, 7, 8]
    assert lay.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 2]
    assert lay.num_candidates.tolist() == [1, 2] and lay.max_len == 5


def test_retrieve_returns_live_unseen_items() -> None:
    model = make().eval()
    _, ids, actions, ts = batch([6])
    top, scores = model.retrieve(item_ids=ids, actions=actions, timestamps_ms=ts, k=10)
    assert top.shape == (1, 10) and (scores[:, :-1] >= scores[:, 1:]).all()
    assert set(top[0].tolist()).isdisjoint(ids.tolist())
    assert set(top[0].tolist()) <= set(range(1, 60))


def test_input_errors() -> None:
    model = make()
    with pytest.raises(ModelInputError, match="at most max_seq_len"):
        model.layout(torch.tensor([0, 26]))
    with pytest.raises(ModelInputError, match="layout 'interleaved'"):
        model.layout(torch.tensor([0, 3]), torch.tensor([0, 1]))
    inter = make(layout="interleaved", max_candidates=1)
    with pytest.raises(ModelInputError, match="raise model.max_candidates"):
        inter.layout(torch.tensor([0, 25]), torch.tensor([0, 3]))
    with pytest.raises(ModelInputError, match="equal length"):
        model.retrieve(
            item_ids=torch.tensor([1, 2]), actions=torch.tensor([0]), timestamps_ms=torch.tensor([1, 2]), k=3
        )


def test_bias_seconds_is_the_one_unit_change() -> None:
    assert bias_seconds(torch.tensor([0, 999, 1000, 1_700_000_000_123])).tolist() == [0, 0, 1, 1_700_000_000]


def test_config_rejects_conflicts() -> None:
    with pytest.raises(ValueError, match="sasrec' supports layout 'items' only"):
        ModelConfig(encoder="sasrec", layout="interleaved")
    with pytest.raises(ValueError, match=r"model.dim \(50\) must be divisible by model.num_heads \(3\)"):
        ModelConfig(encoder="sasrec", num_heads=3)
    with pytest.raises(ValueError, match=r"model.dropout \(1.0\)"):
        ModelConfig(dropout=1.0)


# ----------------------------------------------------------------------------- cached scoring
def history(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One user's n events (ids, actions, times in ms) in 2023."""
    _, ids, actions, ts = batch([n], seed=seed)
    return ids, actions, ts + 1_700_000_000_000


def encode(model: HSTUModel, n: int):
    ids, actions, ts = history(n)
    return model.encode_history(item_ids=ids, actions=actions, timestamps_ms=ts)


@pytest.mark.parametrize("query_time", ["token", "next"])
@pytest.mark.parametrize("learned_positions", [True, False], ids=["pos-emb", "no-pos-emb"])
def test_cached_scoring_gives_the_full_pass_logits(query_time: str, learned_positions: bool) -> None:
    """The KV-cache form of M-FALCON is `rank`'s one pass, whatever the micro-batch."""
    model = make(
        layout="interleaved",
        max_candidates=20,
        query_time=query_time,
        learned_positions=learned_positions,
        num_time_buckets=64,  # buckets up to 5 years, so the later request below changes them
    ).eval()
    ids, actions, ts = history(24)
    cands = torch.tensor([3, 17, 29, 41, 1000, 5, 6, 7, 3, 58])  # an unknown id (OOV row) and a repeat
    when = torch.full((cands.numel(),), int(ts[-1]) + 86_400_000)
    full = model.rank(
        item_ids=ids, actions=actions, timestamps_ms=ts, candidate_ids=cands, candidate_timestamps_ms=when
    )
    cache = model.encode_history(item_ids=ids, actions=actions, timestamps_ms=ts)
    for micro_batch in (1, 3, 512):
        cached = model.score_candidates(
            cache, candidate_ids=cands, candidate_timestamps_ms=when, micro_batch=micro_batch
        )
        assert torch.allclose(cached, full, atol=1e-5), (micro_batch, (cached - full).abs().max())
    # defaults as in rank: candidates at the last event's time, the request at the first candidate's
    plain = model.rank(item_ids=ids, actions=actions, timestamps_ms=ts, candidate_ids=cands)
    assert torch.allclose(model.score_candidates(cache, candidate_ids=cands), plain, atol=1e-5)
    # one cache serves any request time: only the last token depends on it
    later = model.rank(
        item_ids=ids,
        actions=actions,
        timestamps_ms=ts,
        candidate_ids=cands,
        candidate_timestamps_ms=when + 10**9,
        request_timestamps_ms=when[:1] + 10**9,
    )
    cached_later = model.score_candidates(
        cache, candidate_ids=cands, candidate_timestamps_ms=when + 10**9, request_timestamp_ms=int(when[0]) + 10**9
    )
    assert torch.allclose(cached_later, later, atol=1e-5)
    assert not torch.allclose(later, full, atol=1e-4)  # the times matter, so the check above means something


def test_cached_scoring_with_candidates_at_different_times() -> None:
    model = make(layout="interleaved", max_candidates=6, query_time="next", num_time_buckets=64).eval()
    ids, actions, ts = history(10)
    cands = torch.tensor([3, 17, 29, 41])
    when = int(ts[-1]) + torch.tensor([0, 60_000, 86_400_000, 10**10])
    full = model.rank(
        item_ids=ids, actions=actions, timestamps_ms=ts, candidate_ids=cands, candidate_timestamps_ms=when
    )
    cache = model.encode_history(item_ids=ids, actions=actions, timestamps_ms=ts)
    cached = model.score_candidates(cache, candidate_ids=cands, candidate_timestamps_ms=when, micro_batch=3)
    assert torch.allclose(cached, full, atol=1e-5)


def test_encode_histories_batches_users_like_one_at_a_time() -> None:
    model = make(layout="interleaved", max_candidates=4).eval()
    offsets, ids, actions, ts = batch([5, 1, 12])
    caches = model.encode_histories(item_ids=ids, actions=actions, timestamps_ms=ts, offsets=offsets)
    cands = torch.tensor([8, 9, 10])
    for b, cache in enumerate(caches):
        s, e = int(offsets[b]), int(offsets[b + 1])
        alone = model.encode_history(item_ids=ids[s:e], actions=actions[s:e], timestamps_ms=ts[s:e])
        assert cache.num_tokens == alone.num_tokens == 2 * (e - s)
        full = model.rank(item_ids=ids[s:e], actions=actions[s:e], timestamps_ms=ts[s:e], candidate_ids=cands)
        assert torch.allclose(model.score_candidates(cache, candidate_ids=cands), full, atol=1e-5)
        assert torch.allclose(model.score_candidates(alone, candidate_ids=cands), full, atol=1e-5)


@pytest.mark.parametrize("query_time", ["token", "next"])
def test_many_users_score_in_one_pass_like_each_alone(query_time: str) -> None:
    """Histories of different lengths (padded) and candidate lists of different sizes (rounds
    that leave some users out) give each user's own full-pass logits."""
    model = make(layout="interleaved", max_candidates=12, query_time=query_time, num_time_buckets=64).eval()
    offsets, ids, actions, ts = batch([7, 1, 24, 3], seed=3)
    caches = model.encode_histories(item_ids=ids, actions=actions, timestamps_ms=ts, offsets=offsets)
    cands = [torch.tensor([3, 17, 29]), torch.tensor([5]), torch.arange(1, 13), torch.tensor([], dtype=torch.int64)]
    requests = [int(ts[int(offsets[b + 1]) - 1]) + 3_600_000 * (b + 1) for b in range(4)]
    times = [torch.full((c.numel(),), r) for c, r in zip(cands, requests)]
    got = model.score_candidates_many(caches, candidate_ids=cands, candidate_timestamps_ms=times, micro_batch=5)
    for b in range(4):
        s, e = int(offsets[b]), int(offsets[b + 1])
        if cands[b].numel() == 0:
            assert got[b].shape == (0, 4)
            continue
        full = model.rank(
            item_ids=ids[s:e],
            actions=actions[s:e],
            timestamps_ms=ts[s:e],
            candidate_ids=cands[b],
            candidate_timestamps_ms=times[b],
        )
        assert torch.allclose(got[b], full, atol=1e-5), (b, (got[b] - full).abs().max())


@pytest.mark.parametrize("layout", ["items", "interleaved"])
@pytest.mark.parametrize("query_time", ["token", "next"])
def test_cached_retrieval_gives_retrieve(layout: str, query_time: str) -> None:
    model = make(layout=layout, query_time=query_time).eval()
    ids, actions, ts = history(9)
    request = torch.tensor([int(ts[-1]) + 3_600_000])
    top, scores = model.retrieve(item_ids=ids, actions=actions, timestamps_ms=ts, k=7, request_timestamps_ms=request)
    cache = model.encode_history(item_ids=ids, actions=actions, timestamps_ms=ts)
    got, got_scores = model.retrieve_cached(cache, k=7, request_timestamp_ms=int(request[0]))
    assert got.tolist() == top[0].tolist()
    assert torch.allclose(got_scores, scores[0], atol=1e-5)
    given = model.retrieve_cached(
        cache, k=7, request_timestamp_ms=int(request[0]), item_embeddings=model.item_embeddings()
    )
    assert given[0].tolist() == top[0].tolist()
    with_seen, _ = model.retrieve_cached(cache, k=60, exclude_seen=False)
    assert set(ids.tolist()) <= set(with_seen.tolist())


def test_cached_scoring_input_errors() -> None:
    with pytest.raises(ModelInputError, match="normalize_by_length false"):
        encode(make(layout="interleaved", normalize_by_length=True), 3)
    with pytest.raises(ModelInputError, match="encoder 'hstu'"):
        encode(make(encoder="sasrec", num_time_buckets=0), 3)
    items = make().eval()
    with pytest.raises(ModelInputError, match="layout 'interleaved'"):
        items.score_candidates(encode(items, 3), candidate_ids=torch.tensor([1]))
    model = make(layout="interleaved").eval()  # positions for 25 events, candidates included
    full = encode(model, 25)
    with pytest.raises(ModelInputError, match=r"keep at most max_seq_len = 24 events"):
        model.score_candidates(full, candidate_ids=torch.tensor([1]))
    ok = encode(model, 24)
    with pytest.raises(ModelInputError, match=r"micro_batch \(0\)"):
        model.score_candidates(ok, candidate_ids=torch.tensor([1]), micro_batch=0)
    assert model.score_candidates(ok, candidate_ids=torch.tensor([], dtype=torch.int64)).shape == (0, 4)
