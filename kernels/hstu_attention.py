"""Jagged HSTU attention: one function, the Triton kernel on CUDA, the PyTorch reference elsewhere.

    >>> import torch
    >>> from kernels.hstu_attention import hstu_attention
    >>> T, H = 7, 2
    >>> q, k, v = torch.randn(T, H, 32), torch.randn(T, H, 32), torch.randn(T, H, 16)
    >>> out = hstu_attention(q, k, v, torch.tensor([0, 3, 7]), 4, alpha=32 ** -0.5,
    ...                      num_targets=torch.tensor([0, 2]), timestamps=torch.arange(T) * 60,
    ...                      pos_bias=torch.zeros(H, 8), time_bias=torch.zeros(H, 16))
    >>> tuple(out.shape)
    (7, 2, 16)

The function, the mask and the bucket functions are defined in
`kernels/pytorch/pt_hstu_attention.py` (run in length groups, `pt_length_groups.py`, to cut its
padding); the kernel is `kernels/triton/triton_hstu_attention.py`;
the choice between them follows `kernels/_dispatch.py` (argument `impl`, then the environment
variable HSTU_KERNEL_IMPL, then the tensors' device). The Triton path is the torch custom op
`hstu_rt::hstu_attention_triton` (with a fake implementation, so torch.compile can trace it)
and its backward `hstu_rt::hstu_attention_triton_bwd`, which returns dq, dk, dv and the
gradients of both bias tables.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._dispatch import KernelInputError, resolve_impl
from kernels.pytorch.pt_length_groups import pt_hstu_attention_grouped

MAX_HEAD_DIM = 256  # Triton path: one [block, D] tile per operand lives in registers
MAX_GRID_DIM = 65535  # CUDA's limit on the grid's second and third dimensions (heads, sequences)


def _triton_module():
    from kernels.triton import triton_hstu_attention

    return triton_hstu_attention


@torch.library.custom_op("hstu_rt::hstu_attention_triton", mutates_args=())
def _hstu_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    alpha: float,
    num_targets: Tensor | None,
    timestamps: Tensor | None,
    pos_bias: Tensor | None,
    time_bias: Tensor | None,
    normalize_by_length: bool,
    query_timestamps: Tensor | None,
) -> Tensor:
    return _triton_module().hstu_attention_fwd(
        q,
        k,
        v,
        seq_offsets,
        max_seq_len,
        alpha,
        num_targets,
        timestamps,
        pos_bias,
        time_bias,
        normalize_by_length,
        query_timestamps,
    )


@_hstu_attention_triton.register_fake
def _(
    q,
    k,
    v,
    seq_offsets,
    max_seq_len,
    alpha,
    num_targets,
    timestamps,
    pos_bias,
    time_bias,
    normalize_by_length,
    query_timestamps,
):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))


@torch.library.custom_op("hstu_rt::hstu_attention_triton_bwd", mutates_args=())
def _hstu_attention_triton_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    alpha: float,
    num_targets: Tensor | None,
    timestamps: Tensor | None,
    pos_bias: Tensor | None,
    time_bias: Tensor | None,
    normalize_by_length: bool,
    query_timestamps: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, d_pos, d_time = _triton_module().hstu_attention_bwd(
        dout,
        q,
        k,
        v,
        seq_offsets,
        max_seq_len,
        alpha,
        num_targets,
        timestamps,
        pos_bias,
        time_bias,
        normalize_by_length,
        query_timestamps,
    )
    # Custom ops return tensors only: an absent table's gradient travels as an empty tensor.
    return (
        dq,
        dk,
        dv,
        (d_pos if d_pos is not None else q.new_empty(0)),
        (d_time if d_time is not None else q.new_empty(0)),
    )


@_hstu_attention_triton_bwd.register_fake
def _(
    dout,
    q,
    k,
    v,
    seq_offsets,
    max_seq_len,
    alpha,
    num_targets,
    timestamps,
    pos_bias,
    time_bias,
    normalize_by_length,
    query_timestamps,
):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        torch.empty_like(pos_bias, memory_format=torch.contiguous_format) if pos_bias is not None else q.new_empty(0),
        torch.empty_like(time_bias, memory_format=torch.contiguous_format) if time_bias is not None else q.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    (
        q,
        k,
        v,
        seq_offsets,
        max_seq_len,
        alpha,
        num_targets,
        timestamps,
        pos_bias,
        time_bias,
        normalize_by_length,
        query_timestamps,
    ) = inputs
    ctx.save_for_backward(q, k, v, seq_offsets, num_targets, timestamps, pos_bias, time_bias, query_timestamps)
    ctx.max_seq_len, ctx.alpha, ctx.normalize_by_length = max_seq_len, alpha, normalize_by_length


def _backward(ctx, dout):
    q, k, v, seq_offsets, num_targets, timestamps, pos_bias, time_bias, query_timestamps = ctx.saved_tensors
    dq, dk, dv, d_pos, d_time = _hstu_attention_triton_bwd(
        dout,
        q,
        k,
        v,
        seq_offsets,
        ctx.max_seq_len,
        ctx.alpha,
        num_targets,
        timestamps,
        pos_bias,
        time_bias,
        ctx.normalize_by_length,
        query_timestamps,
    )
    return (
        dq,
        dk,
        dv,
        None,
        None,
        None,
        None,
        None,
        d_pos if pos_bias is not None else None,
        d_time if time_bias is not None else None,
        None,
        None,
    )


_hstu_attention_triton.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(
    q, k, v, seq_offsets, max_seq_len, alpha, num_targets, timestamps, pos_bias, time_bias, query_timestamps=None
) -> None:
    """Shape, dtype and device checks: free, no data read."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise KernelInputError(f"{name} must be a [T, H, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if not x.is_floating_point():
            raise KernelInputError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if k.shape != q.shape:
        raise KernelInputError(f"k must have q's shape [T, H, Dqk] = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise KernelInputError(f"v must be [T, H, Dv] with q's T, H = {tuple(q.shape[:2])}, got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise KernelInputError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise KernelInputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not isinstance(seq_offsets, Tensor) or seq_offsets.dim() != 1 or seq_offsets.numel() < 1:
        raise KernelInputError(f"seq_offsets must be a [B+1] tensor, got {getattr(seq_offsets, 'shape', seq_offsets)}")
    if seq_offsets.dtype not in (torch.int64, torch.int32):
        raise KernelInputError(f"seq_offsets must be int64 (or int32), got {seq_offsets.dtype}")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 0:
        raise KernelInputError(f"max_seq_len must be an int >= 0, got {max_seq_len!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise KernelInputError(f"alpha must be a float, got {alpha!r}")
    num_tokens, num_heads = q.shape[:2]
    batch = seq_offsets.numel() - 1
    optional = (
        ("seq_offsets", seq_offsets, (batch + 1,), "int"),
        ("num_targets", num_targets, (batch,), "int"),
        ("timestamps", timestamps, (num_tokens,), "int"),
        ("query_timestamps", query_timestamps, (num_tokens,), "int"),
        ("pos_bias", pos_bias, None, "float"),
        ("time_bias", time_bias, None, "float"),
    )
    for name, x, shape, kind in optional:
        if x is None:
            continue
        if x.device != q.device:
            raise KernelInputError(f"{name} must be on q's device {q.device}, got {x.device}")
        if shape is not None and tuple(x.shape) != shape:
            raise KernelInputError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if kind == "int" and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
            raise KernelInputError(f"{name} must be an integer tensor, got {x.dtype}")
        if kind == "float":
            if x.dim() != 2 or x.shape[0] != num_heads or x.shape[1] < 1:
                raise KernelInputError(f"{name} must be [H={num_heads}, num_buckets >= 1], got {tuple(x.shape)}")
            if not x.is_floating_point():
                raise KernelInputError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if time_bias is not None and timestamps is None:
        raise KernelInputError("time_bias needs timestamps ([T] int64 seconds); pass timestamps= or drop time_bias")
    if query_timestamps is not None and timestamps is None:
        raise KernelInputError("query_timestamps needs timestamps (the keys' times); pass timestamps= too")


MAX_TIME_SPAN_S = 2**30 - 1  # the kernel takes time gaps as int32 seconds


def _time_span(seq_offsets, timestamps, query_timestamps=None) -> Tensor:
    """The largest max(ts) - min(ts) within one sequence, query times included (0-d tensor, no host copy)."""
    num_tokens, batch = timestamps.numel(), seq_offsets.numel() - 1
    seg = torch.searchsorted(seq_offsets[1:], torch.arange(num_tokens, device=timestamps.device), right=True)
    seg = seg.clamp(max=batch - 1)
    ts = timestamps.to(torch.int64)
    if query_timestamps is not None:
        seg, ts = torch.cat([seg, seg]), torch.cat([ts, query_timestamps.to(torch.int64)])
    lo = torch.full((batch,), torch.iinfo(torch.int64).max, device=ts.device).scatter_reduce(0, seg, ts, "amin")
    hi = torch.full((batch,), torch.iinfo(torch.int64).min, device=ts.device).scatter_reduce(0, seg, ts, "amax")
    return (hi - lo).max()


def _check_offsets(q, seq_offsets, max_seq_len, num_targets, timestamps, query_timestamps=None) -> None:
    """Data checks (one device-to-host copy): offsets cover [0, T] in order, lengths fit,
    and each sequence's timestamps and query times span less than 2^30 s."""
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    checks = [seq_offsets[0] == 0, seq_offsets[-1] == q.shape[0]]
    if lengths.numel() > 0:
        checks += [lengths.min() >= 0, lengths.max() <= max_seq_len]
        checks += [num_targets.min() >= 0, (num_targets <= lengths).all()] if num_targets is not None else [True, True]
        if timestamps is not None and timestamps.numel() > 0:
            span = _time_span(seq_offsets, timestamps, query_timestamps)
            checks += [span <= MAX_TIME_SPAN_S, span]
    ok = torch.stack([torch.as_tensor(c, device=q.device).to(torch.int64) for c in checks]).tolist()
    if not (ok[0] and ok[1]):
        raise KernelInputError(
            f"seq_offsets must start at 0 and end at T={q.shape[0]}, "
            f"got {seq_offsets[0].item()} .. {seq_offsets[-1].item()}"
        )
    if lengths.numel() > 0:
        if not ok[2]:
            i = int((lengths < 0).nonzero()[0])
            raise KernelInputError(
                f"seq_offsets must be non-decreasing, got seq_offsets[{i}]={int(seq_offsets[i])} > "
                f"seq_offsets[{i + 1}]={int(seq_offsets[i + 1])}"
            )
        if not ok[3]:
            i = int(lengths.argmax())
            raise KernelInputError(
                f"a sequence has {int(lengths[i])} tokens (sequence {i}), more than max_seq_len={max_seq_len}: "
                "raise max_seq_len"
            )
        if num_targets is not None and not (ok[4] and ok[5]):
            i = int(((num_targets < 0) | (num_targets > lengths)).nonzero()[0])
            raise KernelInputError(
                f"num_targets must lie in [0, sequence length], got num_targets[{i}]={int(num_targets[i])} for a "
                f"sequence of {int(lengths[i])} tokens"
            )
        if len(ok) > 6 and not ok[6]:
            raise KernelInputError(
                f"the timestamps (and query times) of one sequence span {ok[7]} s, more than 2^30 - 1 s (34 years): "
                "timestamps are seconds; give candidates the request time rather than 0"
            )


def hstu_attention(
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
    impl: str | None = None,
    validate: bool = True,
) -> Tensor:
    """HSTU attention over jagged sequences: [T, H, Dv].

    out_i = sum_j silu(alpha * q_i.k_j + bias_ij) * mask_ij * v_j / n, with n = max_seq_len or
    the sequence's own length (normalize_by_length=True); see
    `kernels.pytorch.pt_hstu_attention` for the mask (causal history, candidates that see the
    history and themselves) and the bucket functions of `pos_bias` and `time_bias`.

    q, k: [T, H, Dqk]; v: [T, H, Dv]; seq_offsets: [B+1] int64; num_targets: [B] int64 or
    None; timestamps: [T] int64 seconds or None; pos_bias: [H, num_pos_buckets] or None;
    time_bias: [H, num_time_buckets] or None (needs timestamps); query_timestamps: [T] int64
    seconds or None, the time each row's output is for (its time gaps are
    query_timestamps[i] - timestamps[j]; default timestamps[i]).
    impl: None/"auto", "triton" or "pytorch" (see `kernels._dispatch`).
    validate: check the offsets, lengths, num_targets and the span of each sequence's
    timestamps (< 2^30 s) against the data (costs one device-to-host copy); shapes, dtypes and
    devices are always checked. With validate=False the caller guarantees them.
    """
    _check_inputs(
        q, k, v, seq_offsets, max_seq_len, alpha, num_targets, timestamps, pos_bias, time_bias, query_timestamps
    )
    if time_bias is None:
        query_timestamps = None  # no time bias: nothing reads them
    if validate:
        _check_offsets(
            q, seq_offsets, max_seq_len, num_targets, timestamps if time_bias is not None else None, query_timestamps
        )
    chosen = resolve_impl("hstu_attention", impl, q.device)
    alpha = float(alpha)
    if chosen == "pytorch":
        # The reference pads; in length groups it pads each group only to its own longest.
        return pt_hstu_attention_grouped(
            q,
            k,
            v,
            seq_offsets,
            max_seq_len,
            alpha=alpha,
            num_targets=num_targets,
            timestamps=timestamps,
            pos_bias=pos_bias,
            time_bias=time_bias,
            normalize_by_length=normalize_by_length,
            query_timestamps=query_timestamps,
        )
    if max(q.shape[2], v.shape[2]) > MAX_HEAD_DIM:
        raise KernelInputError(
            f"the Triton kernel takes head dims up to {MAX_HEAD_DIM}, got Dqk={q.shape[2]}, Dv={v.shape[2]}; "
            "use impl='pytorch'"
        )
    if q.shape[1] > MAX_GRID_DIM or seq_offsets.numel() - 1 > MAX_GRID_DIM:
        raise KernelInputError(
            f"the Triton kernel takes at most {MAX_GRID_DIM} heads and sequences per call, got H={q.shape[1]}, "
            f"B={seq_offsets.numel() - 1}; split the batch"
        )
    return _hstu_attention_triton(
        q,
        k,
        v,
        seq_offsets,
        max_seq_len,
        alpha,
        num_targets,
        timestamps,
        pos_bias,
        time_bias,
        bool(normalize_by_length),
        query_timestamps,
    )
