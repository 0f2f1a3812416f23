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
    ...                     timestamps_ms=torch.tensor([10_000, 20_000, 30_000]), candidate_ids=torch.tensor([4, 5]))
    >>> tuple(logits.shape)    # (candidates, actions)
    (2, 3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.hstu_attention import hstu_attention
from kernels.pytorch.pt_hstu_attention import relative_position_bucket, time_bucket
from trainer.embedding_table import DynamicEmbeddingTable, TableConfig
from trainer.layout import ModelInputError, TokenLayout, build_layout
from trainer.sasrec import SASRecEncoder


def bias_seconds(timestamps_ms: Tensor) -> Tensor:
    """Event times in ms (the unit of every sequence outside the model) -> the whole seconds
    the time bias buckets (`kernels.hstu_attention`). The one place the unit changes."""
    return torch.div(timestamps_ms, 1000, rounding_mode="floor")


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
        self.pos_bias = (
            nn.Parameter(torch.empty(num_heads, num_pos_buckets).normal_(0.0, 0.02)) if num_pos_buckets else None
        )
        self.time_bias = (
            nn.Parameter(torch.empty(num_heads, num_time_buckets).normal_(0.0, 0.02)) if num_time_buckets else None
        )

    def forward(
        self, x: Tensor, *, layout: TokenLayout, seconds: Tensor, query_seconds: Tensor | None = None
    ) -> Tensor:
        """x [T, dim]; seconds [T]: each token's time (`bias_seconds`); query_seconds [T]: the
        time each token's output is for (None: its own)."""
        return self.forward_kv(x, layout=layout, seconds=seconds, query_seconds=query_seconds)[0]

    def forward_kv(
        self, x: Tensor, *, layout: TokenLayout, seconds: Tensor, query_seconds: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`forward`, also returning the layer's keys k [T, h, dqk] and values v [T, h, dv]
        (what a later token attends to: `HSTUModel.encode_histories` caches them)."""
        u, q, k, v = self.project(x)
        attn = self._attend(q, k, v, seconds, query_seconds, layout.offsets, layout.max_len, layout.num_candidates)
        return self.output(x, u, attn), k, v

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The fused projection of tokens x [T, dim]: u [T, h dv], q, k [T, h, dqk], v [T, h, dv]."""
        num_tokens, dim = x.shape
        h, dqk, dv = self.num_heads, self.qk_dim, self.v_dim
        normed = F.layer_norm(x, (dim,), eps=self.eps)
        uvqk = F.silu(normed @ self.uvqk)  # (T, 2 h dv + 2 h dqk)
        u, v, q, k = torch.split(uvqk, [h * dv, h * dv, h * dqk, h * dqk], dim=1)
        q = q.reshape(num_tokens, h, dqk)
        k = k.reshape(num_tokens, h, dqk)
        v = v.reshape(num_tokens, h, dv)
        return u, q, k, v

    def output(self, x: Tensor, u: Tensor, attn: Tensor) -> Tensor:
        """The layer's output from its input x [T, dim], gate u [T, h dv] and attention [T, h, dv]."""
        num_tokens = x.shape[0]
        attn = attn.reshape(num_tokens, self.num_heads * self.v_dim)
        gated = u * F.layer_norm(attn, (self.num_heads * self.v_dim,), eps=self.eps)
        return x + self.out(F.dropout(gated, p=self.dropout, training=self.training))

    def attend_cached(
        self, q: Tensor, k: Tensor, v: Tensor, *, keys: Tensor, values: Tensor, bias: CachedBias
    ) -> Tensor:
        """Attention [B, N, h, dv] of new tokens that see cached tokens and themselves, never each other.

        The KV-cache form of the kernel's mask for candidates (M-FALCON): user b's cached tokens
        are a history at positions 0..P_b-1 (keys [B, h, dqk, P], values [B, h, P, dv], padded to
        the longest P; padded values must be zero), and its N new tokens (q, k [B, N, h, dqk],
        v [B, N, h, dv]) share one position after them. `bias` holds the position and time
        buckets (`HSTUModel._cached_bias`: the reference kernel's bucket functions, computed once
        for every layer), so a new token's output is `hstu_attention`'s. Cost: N x P per user,
        not (P + N)^2.
        """
        # Called under no_grad (the model's cached scoring): in-place ops on the [B, h, N, P] scores
        # keep them to two passes besides the matmuls. Padded keys need no mask: their values are 0.
        q = q * self.alpha
        scores = torch.matmul(q.transpose(1, 2), keys)  # (B, h, N, P)
        own = (q * k).sum(-1)  # (B, N, h): each new token with itself
        row = None  # (B, h, N or 1, P): the bias, summed while it is small
        if self.pos_bias is not None:
            row = self.pos_bias[:, bias.pos].transpose(0, 1)[:, :, None, :]
            own = own + self.pos_bias[:, 0]
        if self.time_bias is not None:
            timed = self.time_bias[:, bias.time].transpose(0, 1)
            row = timed if row is None else row + timed
            own = own + self.time_bias[:, bias.own_time].permute(1, 2, 0)  # (B, N, h)
        if row is not None:
            scores.add_(row)
        out = torch.matmul(F.silu(scores, inplace=True), values).transpose(1, 2)  # (B, N, h, dv)
        out = out + F.silu(own)[..., None] * v
        return out / self.norm_len

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
        self, x: Tensor, *, layout: TokenLayout, seconds: Tensor, query_seconds: Tensor | None = None
    ) -> Tensor:
        for layer in self.layers:
            x = layer(x, layout=layout, seconds=seconds, query_seconds=query_seconds)
        return x


# ----------------------------------------------------------------------------- model
@dataclass(frozen=True, kw_only=True, eq=False)
class HistoryCache:
    """One user's encoded history: what candidates attend to (`HSTUModel.encode_histories`).

    Per layer, the keys [h, dqk, T-1] and values [h, T-1, dv] of every history token but the last
    (laid out for q @ K and W @ V), and their times [T-1] (s); the last token's input [dim] and
    time, which each request runs through the layers at its own request time. Immutable: many
    requests may read one cache at once. ~ 4 (dqk + dv) h (T - 1) layers bytes.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    seconds: Tensor
    last_input: Tensor
    last_seconds: Tensor
    num_tokens: int  # history tokens, the last one included
    last_event_ms: int
    rows: Tensor  # [E] the history's table rows (`exclude_seen`)

    @property
    def nbytes(self) -> int:
        tensors = (*self.keys, *self.values, self.seconds, self.last_input, self.rows)
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True, kw_only=True)
class CachedBias:
    """Bucket indices of one pass of new tokens against cached ones, shared by every layer.

    pos [B, P]: the position bucket of each cached token for the new tokens (who share one
    position); time [B, N or 1, P]: the time bucket of each (new, cached) pair (one row when the
    new tokens of a user share their query time); own_time [B, N]: each new token with itself.
    Cached tokens padded past a shorter history need no mask: their values are zero.
    """

    pos: Tensor | None
    time: Tensor | None
    own_time: Tensor | None


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
            event_offsets, interleaved=self.interleaved, candidate_offsets=candidate_offsets, device=self.device
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
        timestamps_ms: Tensor,
        layout: TokenLayout,
        *,
        candidate_rows: Tensor | None = None,
        candidate_timestamps_ms: Tensor | None = None,
        request_timestamps_ms: Tensor | None = None,
    ) -> Tensor:
        """Per-token output embeddings [Ttok, dim] of events (rows/actions/timestamps_ms: [E], times in ms).

        request_timestamps_ms [B]: the time each user's recommendation is for, the query time of
        its last query token under `query_time="next"` (default: its last event's time).
        """
        x, ts, query_ts = self._embed(
            rows,
            actions,
            timestamps_ms,
            layout,
            candidate_rows=candidate_rows,
            candidate_timestamps_ms=candidate_timestamps_ms,
            request_timestamps_ms=request_timestamps_ms,
        )
        return self.encoder(x, layout=layout, seconds=ts, query_seconds=query_ts)

    def _embed(
        self,
        rows: Tensor,
        actions: Tensor,
        timestamps_ms: Tensor,
        layout: TokenLayout,
        *,
        candidate_rows: Tensor | None = None,
        candidate_timestamps_ms: Tensor | None = None,
        request_timestamps_ms: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The encoder's input: tokens x [Ttok, dim], their times [Ttok] and query times [Ttok] (s)."""
        seconds = bias_seconds(timestamps_ms)  # (E,) the time bias's unit
        item = self.table(rows) * self.input_scale  # (E, D)
        if self.config.action_input:
            item = item + self.action_emb(actions)
        cands = candidate_rows is not None and candidate_rows.numel() > 0
        if not self.interleaved and not cands:
            x, ts = item, seconds  # tokens are the events themselves
        else:
            x = item.new_zeros(layout.num_tokens, item.shape[1])
            ts = seconds.new_zeros(layout.num_tokens)
            x = x.index_put((layout.item_token,), item)
            ts = ts.index_put((layout.item_token,), seconds)
            if self.interleaved:
                x = x.index_put((layout.action_token,), self.action_emb(actions))
                ts = ts.index_put((layout.action_token,), seconds)
            if cands:
                x = x.index_put((layout.candidate_token,), self.table(candidate_rows) * self.input_scale)
                ts = ts.index_put((layout.candidate_token,), bias_seconds(candidate_timestamps_ms))
        if self.pos_emb is not None:
            x = x + self.pos_emb(layout.positions)
        x = F.dropout(x, p=self.config.input_dropout, training=self.training)
        query_ts = None
        if self.next_query_time:
            request = bias_seconds(request_timestamps_ms) if request_timestamps_ms is not None else None
            query_ts = self.query_times(seconds, ts, layout, request)
        return x, ts, query_ts

    @property
    def next_query_time(self) -> bool:
        """Whether the last query token's output depends on the request time (`query_time="next"`)."""
        return self.config.query_time == "next" and self.config.encoder == "hstu" and self.config.num_time_buckets > 0

    @staticmethod
    def query_times(
        seconds: Tensor, token_seconds: Tensor, layout: TokenLayout, request_seconds: Tensor | None = None
    ) -> Tensor:
        """Per-token query times [Ttok] (seconds) for `query_time="next"`.

        A query token (the one whose output retrieves the next event) takes the next event's
        time; the last query token of a user takes `request_seconds` [B] (or its own event's
        time); every other token (items of the interleaved layout, candidates) keeps its own.
        """
        nxt = torch.cat([seconds[1:], seconds[-1:]])  # event e + 1 (the same sequence where has_next)
        per_event = torch.where(layout.has_next, nxt, seconds)  # (E,)
        if request_seconds is not None:
            request = request_seconds.to(per_event.device, per_event.dtype)[layout.nonempty]
            per_event = per_event.index_put((layout.last_event,), request)
        return token_seconds.index_put((layout.query_token,), per_event)

    def forward(self, rows: Tensor, actions: Tensor, timestamps_ms: Tensor, layout: TokenLayout) -> Tensor:
        return self.encode(rows, actions, timestamps_ms, layout)

    # -------------------------------------------------------------------- scoring helpers
    def _prepare(
        self, item_ids: Tensor, actions: Tensor, timestamps_ms: Tensor, offsets: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if offsets is None:
            offsets = torch.tensor([0, item_ids.numel()], dtype=torch.int64)
        offsets = offsets.to("cpu", torch.int64)
        if not (item_ids.shape == actions.shape == timestamps_ms.shape) or item_ids.dim() != 1:
            raise ModelInputError(
                f"item_ids {tuple(item_ids.shape)}, actions {tuple(actions.shape)} and timestamps_ms "
                f"{tuple(timestamps_ms.shape)} must be 1-D and of equal length"
            )
        if int(offsets[-1]) != item_ids.numel() or bool(((offsets[1:] - offsets[:-1]) < 1).any()):
            raise ModelInputError(
                f"offsets {offsets.tolist()[:8]}... must start at 0, end at {item_ids.numel()} and give "
                "every user at least one event"
            )
        rows = self.table.lookup(item_ids).to(self.device)
        return rows, actions.to(self.device), timestamps_ms.to(self.device), offsets

    def user_embeddings(
        self,
        rows: Tensor,
        actions: Tensor,
        timestamps_ms: Tensor,
        offsets: Tensor,
        request_timestamps_ms: Tensor | None = None,
    ) -> Tensor:
        """The retrieval query of each user (after its last event), L2-normalised: [B, dim].

        request_timestamps_ms [B]: when each recommendation is for (see `encode`). Under
        `query_time="next"` a caller that knows it (serving: the request's time; evaluation: the
        held-out event's) should pass it: the default, the last event's own time, is a query time
        training never gives a retrieving token.
        """
        layout = self.layout(offsets)
        out = self.encode(rows, actions, timestamps_ms, layout, request_timestamps_ms=request_timestamps_ms)
        last = layout.query_token[offsets[1:].to(layout.query_token.device) - 1]
        return F.normalize(out[last], dim=-1)

    def item_embeddings(self, rows: Tensor | None = None) -> Tensor:
        """L2-normalised output-side embeddings of table rows (all rows by default)."""
        weight = self.table.weight if rows is None else self.table(rows)
        return F.normalize(weight, dim=-1)

    def retrieval_scores(
        self,
        rows: Tensor,
        actions: Tensor,
        timestamps_ms: Tensor,
        offsets: Tensor,
        request_timestamps_ms: Tensor | None = None,
    ) -> Tensor:
        """Cosine scores [B, num_rows] of every table row; padding, OOV and free rows get -inf."""
        user = self.user_embeddings(rows, actions, timestamps_ms, offsets, request_timestamps_ms)
        scores = user @ self.item_embeddings().T
        return scores.masked_fill(~self.table.live_mask().to(scores.device), -math.inf)

    @torch.no_grad()
    def retrieve(
        self,
        *,
        item_ids: Tensor,
        actions: Tensor,
        timestamps_ms: Tensor,
        k: int,
        offsets: Tensor | None = None,
        exclude_seen: bool = True,
        request_timestamps_ms: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Top-k raw item ids [B, k] (and their scores) over all live rows, for jagged histories.

        request_timestamps_ms [B] (ms): when the recommendations are for; default each
        user's last event (matters under `query_time="next"`).
        """
        rows, acts, ts, offsets = self._prepare(item_ids, actions, timestamps_ms, offsets)
        if request_timestamps_ms is not None and request_timestamps_ms.numel() != offsets.numel() - 1:
            raise ModelInputError(
                f"request_timestamps_ms has {request_timestamps_ms.numel()} entries for {offsets.numel() - 1} users"
            )
        scores = self.retrieval_scores(rows, acts, ts, offsets, request_timestamps_ms)
        if exclude_seen:
            lengths = offsets[1:] - offsets[:-1]
            users = torch.repeat_interleave(torch.arange(lengths.numel()), lengths).to(scores.device)
            scores[users, rows] = -math.inf
        return self._top_live(scores, k)

    def _top_live(self, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Raw ids and scores of the top-k rows of scores [B, num_rows] (-inf rows masked out)."""
        k = min(k, len(self.table))
        top = scores.topk(k, dim=1)
        return self.table.row_ids(top.indices.cpu()), top.values.cpu()

    @torch.no_grad()
    def rank(
        self,
        *,
        item_ids: Tensor,
        actions: Tensor,
        timestamps_ms: Tensor,
        candidate_ids: Tensor,
        offsets: Tensor | None = None,
        candidate_offsets: Tensor | None = None,
        candidate_timestamps_ms: Tensor | None = None,
        request_timestamps_ms: Tensor | None = None,
    ) -> Tensor:
        """Action logits [C, num_actions] of every candidate, all of a user's candidates in one pass.

        Without offsets the inputs are one user's history and candidates. Candidates default to
        the time of the user's last event. request_timestamps_ms [B] (the query time of each user's
        last history token under `query_time="next"`) default to the time of the user's first
        candidate: in training that token's query time is the next item's time.
        """
        rows, acts, ts, offsets = self._prepare(item_ids, actions, timestamps_ms, offsets)
        if candidate_offsets is None:
            if offsets.numel() != 2:
                raise ModelInputError("candidate_offsets is required when ranking for more than one user")
            candidate_offsets = torch.tensor([0, candidate_ids.numel()], dtype=torch.int64)
        candidate_offsets = candidate_offsets.to("cpu", torch.int64)
        layout = self.layout(offsets, candidate_offsets)
        last_ts = ts[offsets[1:].to(ts.device) - 1]  # (B,)
        if candidate_timestamps_ms is None:
            candidate_timestamps_ms = torch.repeat_interleave(last_ts, layout.num_candidates)
        candidate_timestamps_ms = candidate_timestamps_ms.to(self.device)
        if request_timestamps_ms is None and candidate_timestamps_ms.numel() > 0:
            first = candidate_offsets[:-1].clamp(max=candidate_timestamps_ms.numel() - 1).to(self.device)
            request_timestamps_ms = torch.where(layout.num_candidates > 0, candidate_timestamps_ms[first], last_ts)
        cand_rows = self.table.lookup(candidate_ids).to(self.device)
        out = self.encode(
            rows,
            acts,
            ts,
            layout,
            candidate_rows=cand_rows,
            candidate_timestamps_ms=candidate_timestamps_ms,
            request_timestamps_ms=request_timestamps_ms,
        )
        assert self.action_head is not None  # layout() rejected candidates in the items layout
        return self.action_head(out[layout.candidate_token])

    # -------------------------------------------------------------------- cached scoring (serving)
    # The KV-cache form of M-FALCON. A candidate attends to the history's keys and values and to
    # itself, so the history's per-layer keys and values are all it needs: encode them once
    # (`encode_histories`), then score any number of candidates against them (`score_candidates`)
    # at C x history cost instead of (history + C)^2, and keep them between requests.
    #
    # The last history token is the one query token whose output depends on the request time
    # (`query_time="next"`), and only candidates see it (it is the last): the cache holds every
    # other token's keys and values plus the last token's input, and each request runs that
    # token through the layers at its own time (`_request_state`, the cost of one candidate).

    def _check_cacheable(self) -> None:
        if self.config.encoder != "hstu":
            raise ModelInputError(f"cached scoring needs model.encoder 'hstu', got {self.config.encoder!r}")
        if self.config.normalize_by_length:
            raise ModelInputError(
                "cached scoring needs model.normalize_by_length false: with it every history token's "
                "output depends on the number of candidates, so a history cannot be encoded once"
            )

    @torch.no_grad()
    def encode_histories(
        self, *, item_ids: Tensor, actions: Tensor, timestamps_ms: Tensor, offsets: Tensor | None = None
    ) -> list[HistoryCache]:
        """Encode jagged histories (one call, the attention kernel's batching) into one
        `HistoryCache` per user, for `score_candidates` and `retrieve_cached`.

        Inputs as in `rank`: raw item ids, action codes and times in ms [E], offsets [B+1]
        (None: one user); every user needs at least one event.
        """
        self._check_cacheable()
        rows, acts, ts, offsets = self._prepare(item_ids, actions, timestamps_ms, offsets)
        layout = self.layout(offsets)
        x, tok_seconds, query_seconds = self._embed(rows, acts, ts, layout)
        first = x
        kvs = []
        for layer in self.encoder.layers:
            x, k, v = layer.forward_kv(x, layout=layout, seconds=tok_seconds, query_seconds=query_seconds)
            kvs.append((k, v))
        tok = layout.offsets.tolist()
        ev = offsets.tolist()
        caches = []
        for b in range(len(tok) - 1):
            start, last = tok[b], tok[b + 1] - 1
            caches.append(
                HistoryCache(
                    keys=tuple(k[start:last].permute(1, 2, 0).contiguous() for k, _ in kvs),
                    values=tuple(v[start:last].permute(1, 0, 2).contiguous() for _, v in kvs),
                    seconds=tok_seconds[start:last].clone(),
                    last_input=first[last].clone(),
                    last_seconds=tok_seconds[last].clone(),
                    num_tokens=last + 1 - start,
                    last_event_ms=int(ts[ev[b + 1] - 1]),
                    rows=rows[ev[b] : ev[b + 1]].clone(),
                )
            )
        return caches

    def encode_history(self, *, item_ids: Tensor, actions: Tensor, timestamps_ms: Tensor) -> HistoryCache:
        """One user's `encode_histories`."""
        return self.encode_histories(item_ids=item_ids, actions=actions, timestamps_ms=timestamps_ms)[0]

    def _stack(self, caches: Sequence[HistoryCache]) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """The caches' keys [B, h, dqk, P] and values [B, h, P, dv] per layer, times [B, P] and
        lengths [B], padded to the longest history with zeros (a zero value adds nothing)."""
        lengths = [c.seconds.numel() for c in caches]
        longest = max(lengths)
        if min(lengths) == longest:
            keys = [torch.stack([c.keys[i] for c in caches]) for i in range(len(self.encoder.layers))]
            values = [torch.stack([c.values[i] for c in caches]) for i in range(len(self.encoder.layers))]
            seconds = torch.stack([c.seconds for c in caches])
        else:
            keys, values = [], []
            for i in range(len(self.encoder.layers)):
                keys.append(torch.stack([F.pad(c.keys[i], (0, longest - n)) for c, n in zip(caches, lengths)]))
                values.append(
                    torch.stack([F.pad(c.values[i], (0, 0, 0, longest - n)) for c, n in zip(caches, lengths)])
                )
            seconds = torch.stack([F.pad(c.seconds, (0, longest - n)) for c, n in zip(caches, lengths)])
        return keys, values, seconds, torch.tensor(lengths, device=self.device)

    def _cached_bias(
        self, *, positions: Tensor, cached_seconds: Tensor, seconds: Tensor, query_seconds: Tensor
    ) -> CachedBias:
        """`CachedBias` for new tokens at `positions` [B] with times and query times [B, N]
        against cached tokens with times [B, P]."""
        layer = self.encoder.layers[0]
        longest = cached_seconds.shape[1]
        cols = torch.arange(longest, device=self.device)
        pos = time = own = None
        if layer.pos_bias is not None:
            pos = relative_position_bucket(positions[:, None] - cols[None, :], layer.pos_bias.shape[1])
        if layer.time_bias is not None:
            buckets = layer.time_bias.shape[1]
            # One query time for all of a user's new tokens (the usual request): one row, broadcast.
            shared = bool((query_seconds == query_seconds[:, :1]).all())
            rows = query_seconds[:, :1] if shared else query_seconds
            time = time_bucket(rows[:, :, None] - cached_seconds[:, None, :], buckets)  # (B, N or 1, P)
            own = time_bucket(query_seconds - seconds, buckets)  # (B, N)
        return CachedBias(pos=pos, time=time, own_time=own)

    def _extend(
        self, x: Tensor, *, keys: list[Tensor], values: list[Tensor], bias: CachedBias
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Run new tokens x [B, N, dim] through every layer against cached keys and values: their
        outputs [B, N, dim] and per-layer keys [B, N, h, dqk] and values [B, N, h, dv]."""
        batch, num_new, dim = x.shape
        flat = x.reshape(batch * num_new, dim)
        new_keys, new_values = [], []
        for layer, cached_k, cached_v in zip(self.encoder.layers, keys, values):
            u, q, k, v = layer.project(flat)
            q, k, v = (t.reshape(batch, num_new, *t.shape[1:]) for t in (q, k, v))
            attn = layer.attend_cached(q, k, v, keys=cached_k, values=cached_v, bias=bias)
            flat = layer.output(flat, u, attn.reshape(batch * num_new, *attn.shape[2:]))
            new_keys.append(k)
            new_values.append(v)
        return flat.reshape(batch, num_new, dim), new_keys, new_values

    def _request_states(
        self, caches: Sequence[HistoryCache], request_seconds: Tensor | None
    ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor, Tensor]:
        """Each full history at its request time: keys and values per layer, times [B, T] and
        lengths [B] (padded as in `_stack`), and the last token's output [B, dim]."""
        keys, values, seconds, lengths = self._stack(caches)
        last = torch.stack([c.last_input for c in caches])[:, None, :]  # (B, 1, dim)
        own = torch.stack([c.last_seconds for c in caches])[:, None]  # (B, 1)
        query = request_seconds[:, None].to(own) if self.next_query_time and request_seconds is not None else own
        bias = self._cached_bias(positions=lengths, cached_seconds=seconds, seconds=own, query_seconds=query)
        out, new_keys, new_values = self._extend(last, keys=keys, values=values, bias=bias)
        # The last token joins its history at index lengths[b] (after a shorter history's padding
        # that is one column of the padding).
        rows = torch.arange(len(caches), device=self.device)
        full_keys, full_values = [], []
        for cached_k, cached_v, k, v in zip(keys, values, new_keys, new_values):
            cached_k, cached_v = F.pad(cached_k, (0, 1)), F.pad(cached_v, (0, 0, 0, 1))
            cached_k[rows, :, :, lengths] = k[:, 0]
            cached_v[rows, :, lengths, :] = v[:, 0]
            full_keys.append(cached_k)
            full_values.append(cached_v)
        seconds = F.pad(seconds, (0, 1))
        seconds[rows, lengths] = own[:, 0]
        return full_keys, full_values, seconds, lengths + 1, out[:, 0]

    @torch.no_grad()
    def score_candidates_many(
        self,
        caches: Sequence[HistoryCache],
        *,
        candidate_ids: Sequence[Tensor],
        candidate_timestamps_ms: Sequence[Tensor | None] | None = None,
        request_timestamps_ms: Sequence[int | None] | None = None,
        micro_batch: int = 512,
    ) -> list[Tensor]:
        """`score_candidates` for many users in one pass (their histories padded to the longest):
        action logits [C_b, num_actions] per user. Candidates go through in rounds of up to
        `micro_batch` per user."""
        if self.action_head is None:
            raise ModelInputError("ranking candidates needs model.layout 'interleaved' (action_head scores them)")
        if micro_batch < 1:
            raise ModelInputError(f"micro_batch ({micro_batch}) must be >= 1")
        users = len(caches)
        if users == 0:
            return []
        if len(candidate_ids) != users:
            raise ModelInputError(f"{len(candidate_ids)} candidate lists for {users} histories")
        times = list(candidate_timestamps_ms) if candidate_timestamps_ms is not None else [None] * users
        requests = list(request_timestamps_ms) if request_timestamps_ms is not None else [None] * users
        if len(times) != users or len(requests) != users:
            raise ModelInputError(
                f"candidate_timestamps_ms ({len(times)}) and request_timestamps_ms ({len(requests)}) need one "
                f"entry per history ({users})"
            )
        ids, secs = [], []
        for cache, cands, when in zip(caches, candidate_ids, times):
            position = cache.num_tokens  # every candidate takes the position after the history
            if self.pos_emb is not None and position >= self.pos_emb.num_embeddings:
                raise ModelInputError(
                    f"a history of {cache.num_tokens} tokens puts candidates at position {position}, the model has "
                    f"positions up to {self.pos_emb.num_embeddings - 1}: keep at most max_seq_len = "
                    f"{self.config.max_seq_len} events"
                )
            cands = cands.reshape(-1)
            when = torch.full_like(cands, cache.last_event_ms, dtype=torch.int64) if when is None else when
            if when.shape != cands.shape:
                raise ModelInputError(
                    f"candidate_timestamps_ms {tuple(when.shape)} must match candidate_ids {tuple(cands.shape)}"
                )
            ids.append(cands)
            secs.append(bias_seconds(when.to(self.device, torch.int64)))
        counts = [c.numel() for c in ids]
        rows = self.table.lookup(torch.cat(ids)).to(self.device).split(counts)
        request_seconds = torch.stack(
            [
                bias_seconds(torch.tensor(int(r), device=self.device))
                if r is not None
                else (s[0] if s.numel() else c.last_seconds)
                for r, s, c in zip(requests, secs, caches)
            ]
        )
        keys, values, seconds, lengths, _ = self._request_states(caches, request_seconds)
        positions = torch.tensor([c.num_tokens for c in caches], device=self.device)
        place = self.pos_emb(positions)[:, None, :] if self.pos_emb is not None else 0.0  # (B, 1, dim)
        logits: list[list[Tensor]] = [[] for _ in caches]
        for start in range(0, max(counts), micro_batch):
            sizes = [max(0, min(micro_batch, n - start)) for n in counts]
            width = max(sizes)
            # Users with fewer candidates this round are padded (row 0, their first time); dropped after.
            chunk_rows = torch.zeros(users, width, dtype=torch.int64, device=self.device)
            chunk_secs = torch.stack([s[:1] if s.numel() else c.last_seconds.reshape(1) for s, c in zip(secs, caches)])
            chunk_secs = chunk_secs.expand(users, width).clone()
            for b, size in enumerate(sizes):
                chunk_rows[b, :size] = rows[b][start : start + size]
                chunk_secs[b, :size] = secs[b][start : start + size]
            x = self.table(chunk_rows) * self.input_scale + place
            x = F.dropout(x, p=self.config.input_dropout, training=self.training)
            bias = self._cached_bias(
                positions=positions,
                cached_seconds=seconds,
                seconds=chunk_secs,
                query_seconds=chunk_secs,  # candidates keep their own time (`query_times`)
            )
            out, _, _ = self._extend(x, keys=keys, values=values, bias=bias)
            chunk_logits = self.action_head(out)  # (B, width, A)
            for b, size in enumerate(sizes):
                if size:
                    logits[b].append(chunk_logits[b, :size])
        empty = torch.zeros(0, self.config.num_actions, device=self.device)
        return [torch.cat(parts) if parts else empty for parts in logits]

    def score_candidates(
        self,
        cache: HistoryCache,
        *,
        candidate_ids: Tensor,
        candidate_timestamps_ms: Tensor | None = None,
        request_timestamp_ms: int | None = None,
        micro_batch: int = 512,
    ) -> Tensor:
        """Action logits [C, num_actions] of candidates against an encoded history: `rank`'s
        result for the same inputs (tests/trainer/test_model.py holds them equal), in micro-batches
        of `micro_batch` candidates. Defaults as in `rank`: candidates at the last event's time,
        the request at the first candidate's time.
        """
        return self.score_candidates_many(
            [cache],
            candidate_ids=[candidate_ids],
            candidate_timestamps_ms=[candidate_timestamps_ms],
            request_timestamps_ms=[request_timestamp_ms],
            micro_batch=micro_batch,
        )[0]

    @torch.no_grad()
    def query_embedding(self, cache: HistoryCache, *, request_timestamp_ms: int | None = None) -> Tensor:
        """The retrieval query [dim] of an encoded history (L2-normalised): `user_embeddings`'s
        row for the same history; request_timestamp_ms defaults to the last event's time."""
        request = None
        if request_timestamp_ms is not None:
            request = bias_seconds(torch.tensor([int(request_timestamp_ms)], device=self.device))
        *_, last = self._request_states([cache], request)
        return F.normalize(last[0], dim=-1)

    @torch.no_grad()
    def retrieve_cached(
        self,
        cache: HistoryCache,
        *,
        k: int,
        exclude_seen: bool = True,
        request_timestamp_ms: int | None = None,
        item_embeddings: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """`retrieve` for one encoded history: top-k raw ids [k] and scores [k] over the live rows.

        item_embeddings: `self.item_embeddings()` when the caller keeps one (serving computes it
        once per model version); computed here otherwise.
        """
        query = self.query_embedding(cache, request_timestamp_ms=request_timestamp_ms)
        items = self.item_embeddings() if item_embeddings is None else item_embeddings
        scores = (items @ query)[None]  # (1, num_rows)
        scores = scores.masked_fill(~self.table.live_mask().to(scores.device), -math.inf)
        if exclude_seen:
            scores[0, cache.rows] = -math.inf
        ids, values = self._top_live(scores, k)
        return ids[0], values[0]


def build_model(
    config: ModelConfig, *, table: DynamicEmbeddingTable | None = None, capacity: int = 100_000
) -> HSTUModel:
    """The model of `config` over `table` (a fresh `capacity`-row LRU table if none is given)."""
    if table is None:
        table = DynamicEmbeddingTable(config=TableConfig(capacity=capacity, dim=config.dim))
    if config.encoder == "sasrec":
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
