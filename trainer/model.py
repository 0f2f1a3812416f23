"""The HSTU generative recommender: one definition, imported by training and serving alike.

HSTU (Zhai et al. 2024, "Actions Speak Louder than Words") replaces softmax attention with a
pointwise SiLU and gates the result with a fourth projection U. Each layer computes

    U, V, Q, K = split(silu(LN(X) @ W_uvqk))                 # one fused projection
    A V        = sum_j silu(alpha q_i.k_j + rab(i, j)) v_j / n  (causal; kernels.hstu_attention)
    Y          = X + W_o(dropout(LN(A V) * U))

where rab is a learned relative bias over position and time buckets (tables owned here, bucketed
by the kernel). A row's time gaps are measured from its query time: its own event's time, or,
with `query_time="next"`, the time of the event its output retrieves (at serving time, the
request time), as the paper's code does for public datasets. The model reads from top to
bottom: the token layout, `HSTULayer`, `HSTUEncoder`, `ModelConfig`, `HSTUModel`, `build_model`.

Token layouts (`ModelConfig.layout`):

- `items`: one token per event (the paper's public-dataset protocol). The output at event t
  retrieves event t+1's item.
- `interleaved`: `item_1, action_1, item_2, action_2, ...`. The output at an action token
  retrieves the next item; the output at an item token predicts (through `action_head`) the
  action taken on it, which is the ranking signal.

Ranking candidates (M-FALCON) are appended as item tokens that see the whole history and
themselves, never each other, so one pass scores all of a user's candidates.

    >>> import torch
    >>> from trainer.model import ModelConfig, build_model
    >>> model = build_model(ModelConfig(layout="interleaved", dim=16, qk_dim=8, v_dim=8,
    ...                                  max_seq_len=10, num_actions=3), capacity=100)
    >>> _ = model.table.observe(torch.arange(1, 6), now=0.0)
    >>> logits = model.rank(item_ids=torch.tensor([1, 2, 3]), actions=torch.tensor([0, 2, 1]),
    ...                     timestamps=torch.tensor([10, 20, 30]), candidate_ids=torch.tensor([4, 5]))
    >>> tuple(logits.shape)    # (candidates, actions)
    (2, 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.hstu_attention import hstu_attention
from trainer.embedding_table import DynamicEmbeddingTable, TableConfig


class ModelInputError(ValueError):
    """Inputs the model cannot encode (too long, wrong shapes, candidates in the items layout)."""


# ----------------------------------------------------------------------------- token layout
@dataclass(frozen=True, kw_only=True)
class AttentionGroup:
    """Sequences of similar length that share one attention call (see `ModelConfig.attention_groups`)."""

    offsets: Tensor  # [Bg+1] token offsets within the group's slice of the permuted tokens
    num_candidates: Tensor | None  # [Bg]
    max_len: int
    start: int  # the group's tokens are permuted[start:stop]
    stop: int


@dataclass(frozen=True, kw_only=True)
class TokenLayout:
    """Where each event and candidate sits in the flattened token sequence of a batch.

    Built on the host from event offsets; all index tensors are int64 on `device`.
    """

    offsets: Tensor  # [B+1] token offsets
    item_token: Tensor  # [E] token of each event's item
    has_next: Tensor  # [E] bool: the event is followed by another of its sequence
    last_event: Tensor  # [B'] the last event of each non-empty sequence
    nonempty: Tensor  # [B] bool: the sequence has events (the rows of last_event)
    action_token: Tensor | None  # [E] token of each event's action (interleaved only)
    query_token: Tensor  # [E] token whose output retrieves the event after this one
    candidate_token: Tensor  # [C] token of each candidate
    positions: Tensor  # [Ttok] position within the sequence (candidates share the first one's)
    num_candidates: Tensor | None  # [B] (None when there are none)
    max_len: int  # longest token sequence in the batch
    permutation: Tensor | None = None  # [Ttok] tokens grouped by length (None: one group)
    inverse_permutation: Tensor | None = None
    groups: tuple[AttentionGroup, ...] = ()

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())


def length_groups(lengths: np.ndarray, num_groups: int) -> list[np.ndarray]:
    """Split sequences into <= num_groups sets, sorted by length, minimising sum(B_g * max_len_g^2).

    That sum is the work of an attention implementation that pads each call to its longest
    sequence; a small dynamic program over the sorted lengths finds the best cut points.
    """
    order = np.argsort(lengths, kind="stable")
    sorted_len = lengths[order].astype(np.float64)
    n = sorted_len.size
    num_groups = max(1, min(num_groups, n))
    idx = np.arange(n + 1)
    # cost[i, j]: sequences i..j-1 (sorted) in one call = (j - i) * len[j-1]^2, for i < j.
    last = np.r_[0.0, sorted_len] ** 2
    cost = np.where(idx[:, None] < idx[None, :], (idx[None, :] - idx[:, None]) * last[None, :], np.inf)
    best = cost[0].copy()  # one group covering 0..j-1
    cuts = [np.zeros(n + 1, dtype=np.int64)]
    for _ in range(1, num_groups):
        total = best[:, None] + cost  # (i, j): best split of 0..i-1, then one group i..j-1
        choice = np.argmin(total, axis=0)
        best = total[choice, idx]
        cuts.append(choice)
    groups, j = [], n
    for level in range(num_groups - 1, -1, -1):
        i = int(cuts[level][j]) if level else 0
        if i < j:
            groups.append(order[i:j])
        j = i
    return groups[::-1]


def build_layout(
    event_offsets: Tensor,
    *,
    interleaved: bool,
    candidate_offsets: Tensor | None = None,
    attention_groups: int = 1,
    device: torch.device | str = "cpu",
) -> TokenLayout:
    """The `TokenLayout` of a batch with `event_offsets` [B+1] (and optional candidates).

    With `attention_groups > 1` the sequences are also split into length groups, each attended
    in its own call padded only to its own longest sequence.
    """
    event_offsets = event_offsets.to("cpu", torch.int64)
    num_seq = event_offsets.numel() - 1
    ev_len = event_offsets[1:] - event_offsets[:-1]  # (B,)
    per_event = 2 if interleaved else 1
    hist_len = per_event * ev_len  # (B,) tokens of history
    if candidate_offsets is not None:
        candidate_offsets = candidate_offsets.to("cpu", torch.int64)
        if candidate_offsets.numel() != num_seq + 1:
            raise ModelInputError(
                f"candidate_offsets has {candidate_offsets.numel()} entries for {num_seq} sequences (need B+1)"
            )
        n_cand = candidate_offsets[1:] - candidate_offsets[:-1]  # (B,)
    else:
        n_cand = torch.zeros(num_seq, dtype=torch.int64)
    tok_len = hist_len + n_cand
    offsets = torch.zeros(num_seq + 1, dtype=torch.int64)
    torch.cumsum(tok_len, 0, out=offsets[1:])
    seq_of_event = torch.repeat_interleave(torch.arange(num_seq), ev_len)  # (E,)
    pos_of_event = torch.arange(int(event_offsets[-1])) - event_offsets[seq_of_event]
    has_next = pos_of_event < (ev_len[seq_of_event] - 1)
    nonempty = ev_len > 0
    last_event = event_offsets[1:][nonempty] - 1
    item_token = offsets[seq_of_event] + per_event * pos_of_event
    action_token = item_token + 1 if interleaved else None
    query_token = action_token if interleaved else item_token
    seq_of_cand = torch.repeat_interleave(torch.arange(num_seq), n_cand)
    first_cand = offsets[:-1] + hist_len  # (B,)
    cand_rank = torch.arange(int(n_cand.sum())) - (torch.cumsum(n_cand, 0) - n_cand)[seq_of_cand]
    candidate_token = first_cand[seq_of_cand] + cand_rank
    seq_of_token = torch.repeat_interleave(torch.arange(num_seq), tok_len)
    positions = torch.arange(int(offsets[-1])) - offsets[seq_of_token]
    positions = torch.minimum(positions, hist_len[seq_of_token])
    permutation = inverse = None
    groups: list[AttentionGroup] = []
    if attention_groups > 1 and num_seq > 1:
        pieces, start = [], 0
        for members in length_groups(tok_len.numpy(), attention_groups):
            members_t = torch.from_numpy(members)
            g_len = tok_len[members_t]
            g_off = torch.zeros(members.size + 1, dtype=torch.int64)
            torch.cumsum(g_len, 0, out=g_off[1:])
            count = int(g_off[-1])
            # token ids of the group's sequences, each sequence's tokens contiguous
            pieces.append(torch.repeat_interleave(offsets[members_t] - g_off[:-1], g_len) + torch.arange(count))
            groups.append(
                AttentionGroup(
                    offsets=g_off.to(device),
                    num_candidates=n_cand[members_t].to(device) if candidate_offsets is not None else None,
                    max_len=int(g_len.max()),
                    start=start,
                    stop=start + count,
                )
            )
            start += count
        permutation = torch.cat(pieces)
        inverse = torch.empty_like(permutation)
        inverse[permutation] = torch.arange(permutation.numel())
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return TokenLayout(
        offsets=to(offsets),
        item_token=to(item_token),
        has_next=to(has_next),
        last_event=to(last_event),
        nonempty=to(nonempty),
        action_token=to(action_token),
        query_token=to(query_token),
        candidate_token=to(candidate_token),
        positions=to(positions),
        num_candidates=to(n_cand) if candidate_offsets is not None else None,
        max_len=int(tok_len.max()) if num_seq else 0,
        permutation=to(permutation),
        inverse_permutation=to(inverse),
        groups=tuple(groups),
    )


# ----------------------------------------------------------------------------- layers
class HSTULayer(nn.Module):
    """One HSTU block over jagged tokens `x` [T, dim]; see the module docstring for the maths."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        dropout: float,
        alpha: float,
        num_pos_buckets: int,
        num_time_buckets: int,
        norm_len: int,
        normalize_by_length: bool = False,
        attention_impl: str | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.dropout, self.alpha, self.eps = dropout, alpha, eps
        self.norm_len = norm_len
        self.normalize_by_length = normalize_by_length
        self.attention_impl = attention_impl
        self.uvqk = nn.Parameter(torch.empty(dim, 2 * num_heads * (v_dim + qk_dim)).normal_(0.0, 0.02))
        self.out = nn.Linear(num_heads * v_dim, dim)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.pos_bias = nn.Parameter(torch.empty(num_heads, num_pos_buckets).normal_(0.0, 0.02)) if num_pos_buckets else None
        self.time_bias = (
            nn.Parameter(torch.empty(num_heads, num_time_buckets).normal_(0.0, 0.02)) if num_time_buckets else None
        )

    def forward(
        self, x: Tensor, *, layout: TokenLayout, timestamps: Tensor, query_timestamps: Tensor | None = None
    ) -> Tensor:
        num_tokens, dim = x.shape
        h, dqk, dv = self.num_heads, self.qk_dim, self.v_dim
        normed = F.layer_norm(x, (dim,), eps=self.eps)
        uvqk = F.silu(normed @ self.uvqk)  # (T, 2 h dv + 2 h dqk)
        u, v, q, k = torch.split(uvqk, [h * dv, h * dv, h * dqk, h * dqk], dim=1)
        q = q.reshape(num_tokens, h, dqk)
        k = k.reshape(num_tokens, h, dqk)
        v = v.reshape(num_tokens, h, dv)
        if not layout.groups:
            attn = self._attend(
                q, k, v, timestamps, query_timestamps, layout.offsets, layout.max_len, layout.num_candidates
            )
        else:
            perm = layout.permutation
            qp, kp, vp, tp = q[perm], k[perm], v[perm], timestamps[perm]  # tokens grouped by length
            tqp = query_timestamps[perm] if query_timestamps is not None else None
            attn = torch.cat(
                [
                    self._attend(
                        qp[g.start : g.stop], kp[g.start : g.stop], vp[g.start : g.stop], tp[g.start : g.stop],
                        tqp[g.start : g.stop] if tqp is not None else None, g.offsets, g.max_len, g.num_candidates,
                    )
                    for g in layout.groups
                ]
            )[layout.inverse_permutation]  # (T, h, dv)
        attn = attn.reshape(num_tokens, h * dv)
        gated = u * F.layer_norm(attn, (h * dv,), eps=self.eps)
        return x + self.out(F.dropout(gated, p=self.dropout, training=self.training))

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        ts: Tensor,
        query_ts: Tensor | None,
        offsets: Tensor,
        max_len: int,
        num_targets: Tensor | None,
    ) -> Tensor:
        timed = self.time_bias is not None
        out = hstu_attention(
            q,
            k,
            v,
            offsets,
            max_len,
            alpha=self.alpha,
            num_targets=num_targets,
            timestamps=ts if timed else None,
            query_timestamps=query_ts if timed else None,
            pos_bias=self.pos_bias,
            time_bias=self.time_bias,
            normalize_by_length=self.normalize_by_length,
            impl=self.attention_impl,
        )  # (T, h, dv)
        if self.normalize_by_length:
            return out
        # The kernel divides by the longest sequence of the call; use the model's fixed n instead.
        return out * (max_len / self.norm_len)


class HSTUEncoder(nn.Module):
    """A stack of `HSTULayer`s over jagged tokens."""

    def __init__(self, *, layers: list[HSTULayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(
        self, x: Tensor, *, layout: TokenLayout, timestamps: Tensor, query_timestamps: Tensor | None = None
    ) -> Tensor:
        for layer in self.layers:
            x = layer(x, layout=layout, timestamps=timestamps, query_timestamps=query_timestamps)
        return x


# ----------------------------------------------------------------------------- model
@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture. Defaults are the paper's ML-1M HSTU config (2 layers, 1 head, d=50)."""

    encoder: Literal["hstu", "sasrec"] = "hstu"
    layout: Literal["items", "interleaved"] = "items"
    dim: int = 50
    num_layers: int = 2
    num_heads: int = 1
    qk_dim: int = 50  # per head
    v_dim: int = 50  # per head
    max_seq_len: int = 200  # events of context; training sequences hold max_seq_len + 1 events
    max_candidates: int = 0  # ranking candidates per user that positions are sized for
    num_actions: int = 5
    dropout: float = 0.2  # inside the layers
    input_dropout: float = 0.2  # on the input embeddings
    alpha: float = 1.0  # scale of q.k inside the SiLU
    num_time_buckets: int = 64  # 0 disables the time bias
    # The time each query token's bias is measured from: "token", its own event's time; "next",
    # the time of the event it retrieves (the request time: known when a recommendation is
    # asked for; the paper's public-dataset code does this). See `HSTUModel.query_times`.
    query_time: Literal["token", "next"] = "token"
    position_bias: bool = True
    learned_positions: bool = True  # absolute position embedding added to the input
    action_input: bool = False  # items layout: add the event's action embedding to its item token
    scale_item_embeddings: bool = True  # multiply item embeddings by sqrt(dim) at the input
    normalize_by_length: bool = False
    attention_groups: int = 1  # length-sorted attention calls per batch (cuts padding of padded impls)
    ffn_dim: int = 0  # SASRec only: width of the feed-forward block (0 = dim)
    attention_impl: str | None = None  # passed to kernels.hstu_attention (None: pick by device)

    def __post_init__(self) -> None:
        for name in ("dim", "num_layers", "num_heads", "qk_dim", "v_dim", "max_seq_len", "num_actions"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} ({getattr(self, name)}) must be >= 1")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.input_dropout < 1.0:
            raise ValueError(
                f"model.dropout ({self.dropout}) and model.input_dropout ({self.input_dropout}) must lie in [0, 1)"
            )
        if self.attention_groups < 1:
            raise ValueError(f"model.attention_groups ({self.attention_groups}) must be >= 1")
        if self.max_candidates < 0 or self.num_time_buckets < 0:
            raise ValueError(
                f"model.max_candidates ({self.max_candidates}) and model.num_time_buckets "
                f"({self.num_time_buckets}) must be >= 0"
            )
        if self.encoder == "sasrec":
            if self.layout != "items":
                raise ValueError(f"model.encoder 'sasrec' supports layout 'items' only, got {self.layout!r}")
            if self.dim % self.num_heads:
                raise ValueError(f"model.dim ({self.dim}) must be divisible by model.num_heads ({self.num_heads})")
        if self.query_time not in ("token", "next"):
            raise ValueError(f"model.query_time must be 'token' or 'next', got {self.query_time!r}")
        if self.action_input and self.layout == "interleaved":
            raise ValueError("model.action_input applies to layout 'items'; the interleaved layout has action tokens")

    @property
    def tokens_per_event(self) -> int:
        return 2 if self.layout == "interleaved" else 1

    @property
    def max_tokens(self) -> int:
        """Longest token sequence the model is built for (positions, bias tables, normaliser)."""
        return self.tokens_per_event * (self.max_seq_len + 1) + self.max_candidates


class HSTUModel(nn.Module):
    """Item/action embeddings -> an encoder (HSTU, or SASRec as the baseline) -> heads.

    The item embeddings live in the `DynamicEmbeddingTable` passed in; callers map raw ids to
    rows with `model.table.lookup` (training does it on the host, before moving to the device).
    `encode()` returns per-token embeddings; `retrieval_scores`, `retrieve` and `rank` are the
    scoring helpers serving uses.
    """

    def __init__(self, *, config: ModelConfig, table: DynamicEmbeddingTable, encoder: nn.Module) -> None:
        super().__init__()
        if table.config.dim != config.dim:
            raise ValueError(f"table dim ({table.config.dim}) must equal model.dim ({config.dim})")
        self.config = config
        self.table = table
        self.encoder = encoder
        uses_actions = config.layout == "interleaved" or config.action_input
        self.action_emb = nn.Embedding(config.num_actions, config.dim) if uses_actions else None
        if self.action_emb is not None:
            nn.init.normal_(self.action_emb.weight, 0.0, 0.02)
        self.pos_emb = nn.Embedding(config.max_tokens, config.dim) if config.learned_positions else None
        if self.pos_emb is not None:
            nn.init.xavier_normal_(self.pos_emb.weight)
        # Ranking head over action types, read at item tokens: only the interleaved layout has one.
        self.action_head = nn.Linear(config.dim, config.num_actions) if config.layout == "interleaved" else None
        self.input_scale = math.sqrt(config.dim) if config.scale_item_embeddings else 1.0

    @property
    def interleaved(self) -> bool:
        return self.config.layout == "interleaved"

    def layout(self, event_offsets: Tensor, candidate_offsets: Tensor | None = None) -> TokenLayout:
        """Token positions of a batch (computed on the host, returned on the model's device)."""
        if candidate_offsets is not None and not self.interleaved:
            raise ModelInputError("ranking candidates need model.layout 'interleaved' (they are scored by action_head)")
        longest = int((event_offsets[1:] - event_offsets[:-1]).max()) if event_offsets.numel() > 1 else 0
        if longest > self.config.max_seq_len + 1:
            raise ModelInputError(
                f"a sequence has {longest} events, the model takes at most max_seq_len + 1 = "
                f"{self.config.max_seq_len + 1}: keep only the latest events"
            )
        layout = build_layout(
            event_offsets,
            interleaved=self.interleaved,
            candidate_offsets=candidate_offsets,
            attention_groups=self.config.attention_groups if self.config.encoder == "hstu" else 1,
            device=self.device,
        )
        if layout.max_len > self.config.max_tokens:
            raise ModelInputError(
                f"a sequence needs {layout.max_len} tokens, the model is sized for {self.config.max_tokens}: "
                "raise model.max_candidates or pass fewer candidates"
            )
        return layout

    @property
    def device(self) -> torch.device:
        return self.table.weight.device

    def encode(
        self,
        rows: Tensor,
        actions: Tensor,
        timestamps: Tensor,
        layout: TokenLayout,
        *,
        candidate_rows: Tensor | None = None,
        candidate_timestamps: Tensor | None = None,
        request_timestamps: Tensor | None = None,
    ) -> Tensor:
        """Per-token output embeddings [Ttok, dim] of events (rows/actions/timestamps: [E]).

        request_timestamps [B]: the time each user's recommendation is for, the query time of
        its last query token under `query_time="next"` (default: its last event's time).
        """
        item = self.table(rows) * self.input_scale  # (E, D)
        if self.config.action_input:
            item = item + self.action_emb(actions)
        cands = candidate_rows is not None and candidate_rows.numel() > 0
        if not self.interleaved and not cands:
            x, ts = item, timestamps  # tokens are the events themselves
        else:
            x = item.new_zeros(layout.num_tokens, item.shape[1])
            ts = timestamps.new_zeros(layout.num_tokens)
            x = x.index_put((layout.item_token,), item)
            ts = ts.index_put((layout.item_token,), timestamps)
            if self.interleaved:
                x = x.index_put((layout.action_token,), self.action_emb(actions))
                ts = ts.index_put((layout.action_token,), timestamps)
            if cands:
                x = x.index_put((layout.candidate_token,), self.table(candidate_rows) * self.input_scale)
                ts = ts.index_put((layout.candidate_token,), candidate_timestamps)
        if self.pos_emb is not None:
            x = x + self.pos_emb(layout.positions)
        x = F.dropout(x, p=self.config.input_dropout, training=self.training)
        query_ts = None
        if self.config.query_time == "next" and self.config.encoder == "hstu" and self.config.num_time_buckets:
            query_ts = self.query_times(timestamps, ts, layout, request_timestamps)
        return self.encoder(x, layout=layout, timestamps=ts, query_timestamps=query_ts)

    @staticmethod
    def query_times(
        timestamps: Tensor, token_timestamps: Tensor, layout: TokenLayout, request_timestamps: Tensor | None = None
    ) -> Tensor:
        """Per-token query times [Ttok] for `query_time="next"`.

        A query token (the one whose output retrieves the next event) takes the next event's
        time; the last query token of a user takes `request_timestamps` [B] (or its own event's
        time); every other token (items of the interleaved layout, candidates) keeps its own.
        """
        nxt = torch.cat([timestamps[1:], timestamps[-1:]])  # event e + 1 (the same sequence where has_next)
        per_event = torch.where(layout.has_next, nxt, timestamps)  # (E,)
        if request_timestamps is not None:
            request = request_timestamps.to(per_event.device, per_event.dtype)[layout.nonempty]
            per_event = per_event.index_put((layout.last_event,), request)
        return token_timestamps.index_put((layout.query_token,), per_event)

    def forward(self, rows: Tensor, actions: Tensor, timestamps: Tensor, layout: TokenLayout) -> Tensor:
        return self.encode(rows, actions, timestamps, layout)

    # -------------------------------------------------------------------- scoring helpers
    def _prepare(
        self, item_ids: Tensor, actions: Tensor, timestamps: Tensor, offsets: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if offsets is None:
            offsets = torch.tensor([0, item_ids.numel()], dtype=torch.int64)
        offsets = offsets.to("cpu", torch.int64)
        if not (item_ids.shape == actions.shape == timestamps.shape) or item_ids.dim() != 1:
            raise ModelInputError(
                f"item_ids {tuple(item_ids.shape)}, actions {tuple(actions.shape)} and timestamps "
                f"{tuple(timestamps.shape)} must be 1-D and of equal length"
            )
        if int(offsets[-1]) != item_ids.numel() or bool(((offsets[1:] - offsets[:-1]) < 1).any()):
            raise ModelInputError(
                f"offsets {offsets.tolist()[:8]}... must start at 0, end at {item_ids.numel()} and give "
                "every user at least one event"
            )
        rows = self.table.lookup(item_ids).to(self.device)
        return rows, actions.to(self.device), timestamps.to(self.device), offsets

    def user_embeddings(
        self, rows: Tensor, actions: Tensor, timestamps: Tensor, offsets: Tensor, request_timestamps: Tensor | None = None
    ) -> Tensor:
        """The retrieval query of each user (after its last event), L2-normalised: [B, dim].

        request_timestamps [B]: when each recommendation is for (see `encode`). Under
        `query_time="next"` a caller that knows it (serving: the request's time; evaluation: the
        held-out event's) should pass it: the default, the last event's own time, is a query time
        training never gives a retrieving token.
        """
        layout = self.layout(offsets)
        out = self.encode(rows, actions, timestamps, layout, request_timestamps=request_timestamps)
        last = layout.query_token[offsets[1:].to(layout.query_token.device) - 1]
        return F.normalize(out[last], dim=-1)

    def item_embeddings(self, rows: Tensor | None = None) -> Tensor:
        """L2-normalised output-side embeddings of table rows (all rows by default)."""
        weight = self.table.weight if rows is None else self.table(rows)
        return F.normalize(weight, dim=-1)

    def retrieval_scores(
        self, rows: Tensor, actions: Tensor, timestamps: Tensor, offsets: Tensor, request_timestamps: Tensor | None = None
    ) -> Tensor:
        """Cosine scores [B, num_rows] of every table row; padding, OOV and free rows get -inf."""
        user = self.user_embeddings(rows, actions, timestamps, offsets, request_timestamps)
        scores = user @ self.item_embeddings().T
        return scores.masked_fill(~self.table.live_mask().to(scores.device), -math.inf)

    @torch.no_grad()
    def retrieve(
        self,
        *,
        item_ids: Tensor,
        actions: Tensor,
        timestamps: Tensor,
        k: int,
        offsets: Tensor | None = None,
        exclude_seen: bool = True,
        request_timestamps: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Top-k raw item ids [B, k] (and their scores) over all live rows, for jagged histories.

        request_timestamps [B] (seconds): when the recommendations are for; default each
        user's last event (matters under `query_time="next"`).
        """
        rows, acts, ts, offsets = self._prepare(item_ids, actions, timestamps, offsets)
        if request_timestamps is not None and request_timestamps.numel() != offsets.numel() - 1:
            raise ModelInputError(
                f"request_timestamps has {request_timestamps.numel()} entries for {offsets.numel() - 1} users"
            )
        scores = self.retrieval_scores(rows, acts, ts, offsets, request_timestamps)
        if exclude_seen:
            lengths = offsets[1:] - offsets[:-1]
            users = torch.repeat_interleave(torch.arange(lengths.numel()), lengths).to(scores.device)
            scores[users, rows] = -math.inf
        k = min(k, len(self.table))
        top = scores.topk(k, dim=1)
        return self.table.row_ids(top.indices.cpu()), top.values.cpu()

    @torch.no_grad()
    def rank(
        self,
        *,
        item_ids: Tensor,
        actions: Tensor,
        timestamps: Tensor,
        candidate_ids: Tensor,
        offsets: Tensor | None = None,
        candidate_offsets: Tensor | None = None,
        candidate_timestamps: Tensor | None = None,
        request_timestamps: Tensor | None = None,
    ) -> Tensor:
        """Action logits [C, num_actions] of every candidate, all of a user's candidates in one pass.

        Without offsets the inputs are one user's history and candidates. Candidates default to
        the time of the user's last event. request_timestamps [B] (the query time of each user's
        last history token under `query_time="next"`) default to the time of the user's first
        candidate: in training that token's query time is the next item's time.
        """
        rows, acts, ts, offsets = self._prepare(item_ids, actions, timestamps, offsets)
        if candidate_offsets is None:
            if offsets.numel() != 2:
                raise ModelInputError("candidate_offsets is required when ranking for more than one user")
            candidate_offsets = torch.tensor([0, candidate_ids.numel()], dtype=torch.int64)
        candidate_offsets = candidate_offsets.to("cpu", torch.int64)
        layout = self.layout(offsets, candidate_offsets)
        last_ts = ts[offsets[1:].to(ts.device) - 1]  # (B,)
        if candidate_timestamps is None:
            candidate_timestamps = torch.repeat_interleave(last_ts, layout.num_candidates)
        candidate_timestamps = candidate_timestamps.to(self.device)
        if request_timestamps is None and candidate_timestamps.numel() > 0:
            first = candidate_offsets[:-1].clamp(max=candidate_timestamps.numel() - 1).to(self.device)
            request_timestamps = torch.where(layout.num_candidates > 0, candidate_timestamps[first], last_ts)
        cand_rows = self.table.lookup(candidate_ids).to(self.device)
        out = self.encode(
            rows, acts, ts, layout, candidate_rows=cand_rows, candidate_timestamps=candidate_timestamps,
            request_timestamps=request_timestamps,
        )
        assert self.action_head is not None  # layout() rejected candidates in the items layout
        return self.action_head(out[layout.candidate_token])


def build_model(
    config: ModelConfig, *, table: DynamicEmbeddingTable | None = None, capacity: int = 100_000
) -> HSTUModel:
    """The model of `config` over `table` (a fresh `capacity`-row LRU table if none is given)."""
    if table is None:
        table = DynamicEmbeddingTable(config=TableConfig(capacity=capacity, dim=config.dim))
    if config.encoder == "sasrec":
        from trainer.sasrec import SASRecEncoder

        encoder: nn.Module = SASRecEncoder(
            dim=config.dim,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            ffn_dim=config.ffn_dim or config.dim,
            dropout=config.dropout,
        )
    else:
        encoder = HSTUEncoder(
            layers=[
                HSTULayer(
                    dim=config.dim,
                    num_heads=config.num_heads,
                    qk_dim=config.qk_dim,
                    v_dim=config.v_dim,
                    dropout=config.dropout,
                    alpha=config.alpha,
                    num_pos_buckets=config.max_tokens if config.position_bias else 0,
                    num_time_buckets=config.num_time_buckets,
                    norm_len=config.max_tokens,
                    normalize_by_length=config.normalize_by_length,
                    attention_impl=config.attention_impl,
                )
                for _ in range(config.num_layers)
            ]
        )
    return HSTUModel(config=config, table=table, encoder=encoder)

