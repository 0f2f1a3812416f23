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
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.hstu_attention import hstu_attention
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
        num_tokens, dim = x.shape
        h, dqk, dv = self.num_heads, self.qk_dim, self.v_dim
        normed = F.layer_norm(x, (dim,), eps=self.eps)
        uvqk = F.silu(normed @ self.uvqk)  # (T, 2 h dv + 2 h dqk)
        u, v, q, k = torch.split(uvqk, [h * dv, h * dv, h * dqk, h * dqk], dim=1)
        q = q.reshape(num_tokens, h, dqk)
        k = k.reshape(num_tokens, h, dqk)
        v = v.reshape(num_tokens, h, dv)
        attn = self._attend(q, k, v, seconds, query_seconds, layout.offsets, layout.max_len, layout.num_candidates)
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
        self, x: Tensor, *, layout: TokenLayout, seconds: Tensor, query_seconds: Tensor | None = None
    ) -> Tensor:
        for layer in self.layers:
            x = layer(x, layout=layout, seconds=seconds, query_seconds=query_seconds)
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
        if self.config.query_time == "next" and self.config.encoder == "hstu" and self.config.num_time_buckets:
            request = bias_seconds(request_timestamps_ms) if request_timestamps_ms is not None else None
            query_ts = self.query_times(seconds, ts, layout, request)
        return self.encoder(x, layout=layout, seconds=ts, query_seconds=query_ts)

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
