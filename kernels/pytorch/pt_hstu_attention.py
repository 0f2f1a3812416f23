"""Jagged HSTU attention in plain PyTorch: the readable definition, the CPU path and the oracle.

HSTU attention (Zhai et al. 2024) replaces softmax by a pointwise SiLU and adds a learned
relative attention bias (rab) built from two per-head tables:

    out_i = sum_j silu(alpha * q_i . k_j + pos_bias[h, pb(i, j)] + time_bias[h, tb(i, j)])
                  * mask_ij * v_j / n

for the T tokens of B sequences packed back to back (`seq_offsets` [B+1], sequence b holds
tokens seq_offsets[b] .. seq_offsets[b+1]-1); n is `max_seq_len`, or the sequence's own length
with `normalize_by_length=True`.

Mask. The last `num_targets[b]` tokens of sequence b are candidates (M-FALCON), the rest is
history (`hist = length - num_targets`). A history token sees the history up to itself
(causal). A candidate sees the whole history and itself, never another candidate:

    mask_ij = (j <= i) and (j < hist or j == i)

Bucket functions (the Triton kernel computes exactly these, per pair, from the tables):

- positions: every history token keeps its index, every candidate takes the index of the first
  candidate (`pos_i = min(i, hist)`), so the order of the candidates does not matter;
  `pb(i, j) = min(pos_i - pos_j, num_pos_buckets - 1)` (always >= 0 under the mask).
- time: with `timestamps` in seconds (int64), the gap of a pair is `|tq_i - ts_j|`, where
  `tq_i` is the query time of token i: `query_timestamps[i]` when given, else `timestamps[i]`.
  A query time is the time the token's output is for (the request time): for next-item
  retrieval, the time of the next event, as the paper's public-dataset code does. Its bucket is

      tb(i, j) = the largest k in [0, NT - 1] with boundary[k] <= max(gap, 1),
      boundary[k] = the smallest integer g >= 1 with ln(g) / 0.301 >= k   (boundary[0] = 1),

  that is `clamp(floor(ln(max(gap, 1)) / 0.301), 0, NT - 1)` in exact arithmetic (0.301 the
  decimal). `time_bucket_boundaries` builds the integer table once (exact, in Python) and both
  implementations read it, so they agree on every gap: no float log decides a bucket (float32
  logs put some gaps one bucket off, the first at 417,901 s). About 2.3 buckets per doubling
  of the gap; the last of NT buckets starts at exp(0.301 (NT - 1)) s: 9 days for NT = 46, 5.4
  years for NT = 64. One sequence's timestamps must span less than 2^30 s (the kernel's int32
  gaps; the dispatcher checks).

This implementation pads to [B, H, N, N] (N = max_seq_len) and lets autograd give the
backward, so it costs O(B * H * N^2) memory: use it as the reference and on the CPU.

    >>> import torch
    >>> from kernels.pytorch.pt_hstu_attention import pt_hstu_attention
    >>> q = k = v = torch.randn(5, 2, 16)
    >>> out = pt_hstu_attention(q, k, v, torch.tensor([0, 2, 5]), 4, alpha=0.25)
    >>> tuple(out.shape)
    (5, 2, 16)
"""

from __future__ import annotations

import decimal
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._dispatch import KernelInputError

TIME_BUCKET_DIVISOR = 0.301
INT64_MAX = 2**63 - 1


def _time_bucket_edge(k: int) -> int:
    """boundary[k]: the smallest integer g >= 1 with ln(g) >= 0.301 k, exactly.

    A float64 guess, then checked and moved with 50-digit logs. exp(0.301 k) is never an integer
    for k >= 1 (Lindemann), and its nearest miss for k < 150 is 2e-21 relative, so 50 digits
    decide every comparison.
    """
    if k == 0:
        return 1
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        edge = decimal.Decimal(str(TIME_BUCKET_DIVISOR)) * k
        g = max(math.ceil(math.exp(float(edge))), 1)
        while g > 1 and decimal.Decimal(g - 1).ln() >= edge:
            g -= 1
        while decimal.Decimal(g).ln() < edge:
            g += 1
        return g


@functools.cache
def _time_bucket_boundaries(num_buckets: int, device: torch.device) -> Tensor:
    edges = [1]
    for k in range(1, num_buckets):
        # past int64 every edge is capped: stop computing them (exp overflows a float past k = 2358)
        edges.append(min(_time_bucket_edge(k), INT64_MAX) if edges[-1] < INT64_MAX else INT64_MAX)
    return torch.tensor(edges, dtype=torch.int64, device=device)


def time_bucket_boundaries(num_buckets: int, device: torch.device | str | None = None) -> Tensor:
    """The first gap (int64 seconds) of each of the NT time buckets: [NT], boundary[0] = 1.

    boundary[k] is the smallest integer g >= 1 with ln(g) / 0.301 >= k (see the module
    docstring); entries past int64 (k >= 146) hold 2^63 - 1. The one table both the reference
    and the Triton kernel bucket time gaps with. Cached per (num_buckets, device): read it,
    never write it.

        >>> time_bucket_boundaries(8).tolist()
        [1, 2, 2, 3, 4, 5, 7, 9]
    """
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 1:
        raise KernelInputError(f"num_buckets must be an int >= 1, got {num_buckets!r}")
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _time_bucket_boundaries(num_buckets, device)


def relative_position_bucket(rel_pos: Tensor, num_buckets: int) -> Tensor:
    """Bucket of a relative position `pos_i - pos_j` (>= 0 under the mask): min(rel, P - 1)."""
    return rel_pos.clamp(0, num_buckets - 1)


def time_bucket(dt: Tensor, num_buckets: int) -> Tensor:
    """Bucket of integer time gaps in seconds: the largest k < NT with boundary[k] <= max(|dt|, 1).

    Integer comparisons against `time_bucket_boundaries`, no float log: exactly the kernel's.
    """
    gap = dt.to(torch.int64).abs().clamp_min_(1)
    # boundary[0] = 1 <= gap, so the count of boundaries <= gap lies in [1, NT]
    return torch.bucketize(gap, time_bucket_boundaries(num_buckets, dt.device), right=True).sub_(1)


class _BucketBias(torch.autograd.Function):
    """`table[:, bucket]` for a per-head table [H, P] and buckets [B, N, N] -> [B, H, N, N].

    Autograd's backward of that indexing accumulates B·N² values into a few hundred cells one
    by one (`index_put_` with accumulate), the slowest op of a CPU training step; a weighted
    `bincount` per head gives the same table gradient at memory speed.
    """

    @staticmethod
    def forward(ctx, table: Tensor, bucket: Tensor) -> Tensor:
        ctx.save_for_backward(bucket)
        ctx.num_buckets = table.shape[1]
        # index_select: the same as table[:, bucket], 1.35x faster on the CPU
        return table.index_select(1, bucket.reshape(-1)).view(table.shape[0], *bucket.shape).permute(1, 0, 2, 3)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (bucket,) = ctx.saved_tensors
        flat = bucket.reshape(-1)
        per_head = grad.transpose(0, 1).reshape(grad.shape[1], -1)  # (H, B·N·N)
        rows = [torch.bincount(flat, weights=g.double(), minlength=ctx.num_buckets) for g in per_head]
        return torch.stack(rows).to(grad.dtype), None


def bucket_bias(table: Tensor, bucket: Tensor) -> Tensor:
    """The bias [B, H, N, N] that a per-head table [H, P] gives the buckets [B, N, N]."""
    return _BucketBias.apply(table, bucket)


def _pad(x: Tensor, token: Tensor, valid: Tensor) -> Tensor:
    """Jagged [T, ...] -> padded [B, N, ...] with zeros past each sequence's end."""
    # index_select rather than x[token]: its backward is index_add_, 2x faster on the CPU than
    # the accumulating index_put_ of advanced indexing
    rows = x.index_select(0, token.reshape(-1)).view(*token.shape, *x.shape[1:])  # (B, N, ...)
    keep = valid.reshape(valid.shape + (1,) * (rows.dim() - 2))
    return torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def pt_hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    *,
    alpha: float,
    num_targets: Tensor | None = None,
    timestamps: Tensor | None = None,
    pos_bias: Tensor | None = None,
    time_bias: Tensor | None = None,
    normalize_by_length: bool = False,
    query_timestamps: Tensor | None = None,
) -> Tensor:
    """HSTU attention over jagged sequences, padded and dense; see the module docstring.

    q, k: [T, H, Dqk]; v: [T, H, Dv]; seq_offsets: [B+1] int64 with seq_offsets[0] == 0 and
    seq_offsets[-1] == T; num_targets: [B] or None; timestamps: [T] int64 seconds or None;
    query_timestamps: [T] int64 seconds or None (the rows' times; default `timestamps`);
    pos_bias: [H, num_pos_buckets] or None; time_bias: [H, num_time_buckets] or None.
    Returns [T, H, Dv] in q's dtype. Inputs are not validated here: `kernels.hstu_attention`
    does that once for both implementations.
    """
    num_tokens, num_heads, _ = q.shape
    dv = v.shape[-1]
    if num_tokens == 0 or max_seq_len == 0:
        return v * 0.0
    device = q.device
    lengths = seq_offsets[1:] - seq_offsets[:-1]  # (B,)
    cols = torch.arange(max_seq_len, device=device)
    valid = cols[None, :] < lengths[:, None]  # (B, N)
    token = (seq_offsets[:-1, None] + cols[None, :]).clamp(max=num_tokens - 1)  # (B, N)

    qp = _pad(q, token, valid).permute(0, 2, 1, 3)  # (B, H, N, Dqk)
    kp = _pad(k, token, valid).permute(0, 2, 1, 3)  # (B, H, N, Dqk)
    vp = _pad(v, token, valid).permute(0, 2, 1, 3)  # (B, H, N, Dv)
    scores = alpha * (qp @ kp.transpose(-1, -2))  # (B, H, N, N)

    if num_targets is None:
        hist = lengths
    else:
        hist = lengths - torch.minimum(num_targets.clamp_min(0), lengths)  # (B,)
    i = cols[:, None]
    j = cols[None, :]
    mask = (j <= i) & ((j < hist[:, None, None]) | (j == i))  # (B, N, N)
    mask = mask & valid[:, :, None] & valid[:, None, :]

    if pos_bias is not None:
        pos = torch.minimum(cols[None, :], hist[:, None])  # (B, N)
        bucket = relative_position_bucket(pos[:, :, None] - pos[:, None, :], pos_bias.shape[1])
        scores = scores + bucket_bias(pos_bias.to(scores.dtype), bucket)  # (B, H, N, N)
    if time_bias is not None:
        ts = _pad(timestamps, token, valid)  # (B, N)
        tq = ts if query_timestamps is None else _pad(query_timestamps, token, valid)  # (B, N)
        bucket = time_bucket(tq[:, :, None] - ts[:, None, :], time_bias.shape[1])  # (B, N, N)
        scores = scores + bucket_bias(time_bias.to(scores.dtype), bucket)

    weights = torch.where(mask[:, None], F.silu(scores), torch.zeros((), dtype=scores.dtype, device=device))
    if normalize_by_length:
        n = lengths.clamp_min(1).to(scores.dtype).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
    else:
        n = float(max_seq_len)
    out = (weights @ vp) / n  # (B, H, N, Dv)
    flat = out.permute(0, 2, 1, 3).reshape(-1, num_heads, dv)  # (B N, H, Dv)
    return flat.index_select(0, valid.reshape(-1).nonzero().squeeze(1))  # (T, H, Dv): row-major = jagged order
