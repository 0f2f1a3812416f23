"""Jagged HSTU attention in Triton: forward and backward, relative bias tables, candidate masks.

Computes exactly `kernels.pytorch.pt_hstu_attention.pt_hstu_attention` (read its docstring for
the mask and the bucket functions) without padding and without any [N, N] tensor in memory:

- forward: one program per (query block, head, sequence) walks the key blocks it may see,
  adds the two bias tables by gathering `pos_bias[h, bucket]` and `time_bias[h, bucket]` per
  pair, and accumulates `silu(s) @ v`. Blocks wholly below the diagonal skip the mask. A
  candidate's own (diagonal) term is a row-wise dot, so the key loop stops at the end of the
  history.
- backward: one program per (key block, head, sequence) walks the query blocks that see it,
  keeps dK and dV in registers, adds dQ with float32 atomics, and reduces dS into the bias
  tables in registers before any atomic: the time table by looping over the (few, for sorted
  timestamps) buckets present in a tile; the position table by skewing the tile (a gather
  that turns its diagonals into rows) so one row sum gives one relative position.

Time buckets are computed per pair, from a row's query time (`query_timestamps`, which the
launchers set to `timestamps` when absent) and a column's time, in int32 seconds relative to
the sequence's first token (the dispatcher checks that one sequence spans less than 2^30 s,
34 years). The bias is the bulk of the per-pair work, so the bucket is a first guess from the
hardware's approximate log2, then corrected to the exact bucket by one comparison with the
integer boundary table of `kernels.pytorch.pt_hstu_attention.time_bucket_boundaries` (int32,
passed as `TimeBounds`): the reference buckets with that same table, so the two agree on every
gap.

The autotune key buckets `max_seq_len` to a power of two, so jagged batches with varying
maximum lengths reuse the tuned choice.

Do not call these launchers directly: `kernels.hstu_attention.hstu_attention` validates the
inputs, picks the implementation and wraps them for autograd and torch.compile.
"""

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kernels.pytorch.pt_hstu_attention import time_bucket_boundaries

# floor(ln(gap) / 0.301) == floor(log2(gap) * ln(2) / 0.301); log2 is one hardware instruction.
# Only the first guess of a bucket: `_gap_bucket` corrects it against the integer boundaries.
_LOG2_TO_BUCKET = tl.constexpr(0.6931471805599453 / 0.301)
# Inline PTX runs on NVIDIA GPUs only; the interpreter takes tl.log2. Triton's own library tells
# which mode this process runs in (decorated when triton was imported).
_PTX_LOG2 = tl.constexpr(not isinstance(tl.standard.sigmoid, InterpretedFunction))


@triton.jit
def _log2(x):
    """log2 of float32 x >= 1: the hardware's approximate lg2 (abs error < 2^-22) when compiled.

    tl.log2 compiles to a dozen-instruction accurate polynomial; this runs per (i, j) pair.
    """
    if _PTX_LOG2:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _gap_bucket(gap, TimeBounds, num_time_buckets):
    """The exact time bucket of int32 gaps >= 0, elementwise: the largest k < NT with
    TimeBounds[k] <= max(gap, 1) (TimeBounds: NT boundaries and a sentinel, see `_time_bounds`).

    x = log2(gap) ln2 / 0.301 is within 1e-5 of ln(gap) / 0.301: float32(gap) is off by at most
    2^-24 relative, lg2.approx by 2^-22 absolute, the product (< 70) by 2^-24 relative. So with
    k = trunc(x), the exact bucket is k - 1 or k when x - k < 0.5, and k or k + 1 otherwise: one
    comparison with boundary k, or k + 1, decides (boundaries never decrease; clamping to NT - 1
    keeps this, the sentinel at [NT] lies above every gap). One table load per pair.
    """
    gap = tl.maximum(gap, 1)
    x = _log2(gap.to(tl.float32)) * _LOG2_TO_BUCKET  # > -1e-5: trunc == floor, or 0
    guess = x.to(tl.int32)
    upper = (x - guess.to(tl.float32)) >= 0.5  # the exact bucket is guess or guess + 1
    guess = tl.minimum(guess, num_time_buckets - 1)
    edge = tl.load(TimeBounds + guess + upper.to(tl.int32))  # index <= NT
    return tl.where(upper, guess + (gap >= edge).to(tl.int32), guess - (gap < edge).to(tl.int32))


@triton.jit
def _time_bucket(rts_i, rts_j, TimeBounds, num_time_buckets):
    """Time bucket of every (i, j) pair from int32 seconds relative to the sequence's start."""
    return _gap_bucket(tl.abs(rts_i[:, None] - rts_j[None, :]), TimeBounds, num_time_buckets)


@triton.jit
def _rel_seconds(Timestamps, tokens, ts_base):
    """int32 seconds since the sequence's first token (the caller guarantees a span < 2^30 s)."""
    return (tl.load(Timestamps + tokens) - ts_base).to(tl.int32)


@triton.jit
def _pos_bucket(pos_i, offs_n, num_pos_buckets):
    """min(pos_i - j, P - 1), clamped at 0 for pairs outside the mask."""
    rel = pos_i[:, None] - offs_n[None, :]
    return tl.minimum(tl.maximum(rel, 0), num_pos_buckets - 1)


# Which mode this process runs Triton in (see kernels/triton/__init__.py). Triton's own library
# (tl.sum, tl.sigmoid) was decorated when triton was imported; ours must match it.
INTERPRETED = isinstance(_gap_bucket, InterpretedFunction)
if INTERPRETED != isinstance(tl.standard.sigmoid, InterpretedFunction):
    raise ImportError(
        f"TRITON_INTERPRET changed between importing triton (interpreted="
        f"{not INTERPRETED}) and {__name__} (interpreted={INTERPRETED}): set it before anything imports triton"
    )


def _fwd_configs() -> list[triton.Config]:
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # Shapes that spill at most a few registers for D = 128 with both tables (sm_90, ptxas 3.9).
    shapes = [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _bwd_configs() -> list[triton.Config]:
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # BLOCK_N <= BLOCK_M: the position-bias skew needs it (static_assert in the kernel). These
    # spill least for D = 128 with both tables (40 to 160 spilled stores; the rest spill more).
    shapes = [(64, 32, 4, 1), (128, 32, 8, 1), (64, 64, 8, 1), (128, 64, 8, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _prune_short(configs, named_args, **kwargs):
    """Sequences of at most 256 tokens get the smallest tile: nothing to tune, nothing to wait for."""
    autotune_n = kwargs["AUTOTUNE_N"] if "AUTOTUNE_N" in kwargs else named_args["AUTOTUNE_N"]
    if autotune_n > 256 or len(configs) == 1:
        return configs
    smallest = min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))
    return [smallest]


_KEY = ["AUTOTUNE_N", "BLOCK_DQK", "BLOCK_DV", "HAS_TARGETS", "HAS_POS", "HAS_TIME"]


@triton.jit
def _fwd_block(
    acc,
    q,
    K_h,
    V_h,
    PB_h,
    TB_h,
    TimeBounds,
    Timestamps,
    ts_base,
    seq_start,
    stride_kt,
    stride_vt,
    n0,
    n_end,
    offs_m,
    pos_i,
    rts_i,
    alpha,
    num_pos_buckets,
    num_time_buckets,
    offs_qk,
    offs_v,
    qk_ok,
    v_ok,
    HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
):
    """acc + silu(alpha q k^T + bias) v for one key block; MASKED for blocks that cross the mask."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    cols = seq_start + offs_n
    if MASKED:
        col_ok = offs_n < n_end
        k = tl.load(K_h + cols[:, None] * stride_kt + offs_qk[None, :], mask=col_ok[:, None] & qk_ok, other=0.0)
        v = tl.load(V_h + cols[:, None] * stride_vt + offs_v[None, :], mask=col_ok[:, None] & v_ok, other=0.0)
    else:
        k = tl.load(K_h + cols[:, None] * stride_kt + offs_qk[None, :], mask=qk_ok, other=0.0)
        v = tl.load(V_h + cols[:, None] * stride_vt + offs_v[None, :], mask=v_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * alpha  # (BLOCK_M, BLOCK_N)
    if HAS_POS:
        s += tl.load(PB_h + _pos_bucket(pos_i, offs_n, num_pos_buckets)).to(tl.float32)
    if HAS_TIME:
        rts_j = _rel_seconds(Timestamps, seq_start + tl.minimum(offs_n, n_end - 1), ts_base)
        s += tl.load(TB_h + _time_bucket(rts_i, rts_j, TimeBounds, num_time_buckets)).to(tl.float32)
    p = s / (1.0 + tl.exp(-s))  # silu
    if MASKED:
        p = tl.where((offs_n[None, :] <= offs_m[:, None]) & col_ok[None, :], p, 0.0)
    return tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)


@triton.autotune(configs=_fwd_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune_short})
@triton.jit(do_not_specialize=["AUTOTUNE_N", "num_pos_buckets", "num_time_buckets"])
def _hstu_attn_fwd(
    Q,
    K,
    V,
    Out,
    SeqOffsets,
    NumTargets,
    Timestamps,
    QueryTimestamps,
    PosBias,
    TimeBias,
    TimeBounds,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_pb,
    stride_tb,
    alpha,
    inv_max_len,
    num_pos_buckets,
    num_time_buckets,
    AUTOTUNE_N,
    D_QK: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr,
    NORM_BY_LEN: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    h = tl.program_id(1)
    b = tl.program_id(2)
    seq_start = tl.load(SeqOffsets + b)
    seq_len = (tl.load(SeqOffsets + b + 1) - seq_start).to(tl.int32)
    # Later query blocks see more keys: start them first.
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    if m0 >= seq_len:
        return
    hist = seq_len
    if HAS_TARGETS:
        hist = seq_len - tl.minimum(tl.maximum(tl.load(NumTargets + b).to(tl.int32), 0), seq_len)
    if NORM_BY_LEN:
        inv_n = 1.0 / seq_len.to(tl.float32)
    else:
        inv_n = inv_max_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_qk = tl.arange(0, BLOCK_DQK)
    offs_v = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seq_len
    rows = seq_start + offs_m  # int64 token indices
    qk_ok = offs_qk[None, :] < D_QK
    v_ok = offs_v[None, :] < D_V
    K_h, V_h = K + h * stride_kh, V + h * stride_vh
    PB_h, TB_h = PosBias + h * stride_pb, TimeBias + h * stride_tb
    q = tl.load(
        Q + rows[:, None] * stride_qt + h * stride_qh + offs_qk[None, :], mask=row_ok[:, None] & qk_ok, other=0.0
    )
    pos_i = tl.minimum(offs_m, hist)
    ts_base = tl.load(Timestamps + seq_start) if HAS_TIME else 0
    rts_i = _rel_seconds(QueryTimestamps, seq_start + tl.minimum(offs_m, seq_len - 1), ts_base) if HAS_TIME else offs_m

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    n_end = tl.minimum(m0 + BLOCK_M, hist)  # keys past the history only meet themselves (below)
    n_full = (tl.minimum(m0 + 1, hist) // BLOCK_N) * BLOCK_N  # key blocks below the diagonal: no mask
    for n0 in range(0, n_full, BLOCK_N):
        acc = _fwd_block(
            acc,
            q,
            K_h,
            V_h,
            PB_h,
            TB_h,
            TimeBounds,
            Timestamps,
            ts_base,
            seq_start,
            stride_kt,
            stride_vt,
            n0,
            n_end,
            offs_m,
            pos_i,
            rts_i,
            alpha,
            num_pos_buckets,
            num_time_buckets,
            offs_qk,
            offs_v,
            qk_ok,
            v_ok,
            HAS_POS,
            HAS_TIME,
            PRECISION,
            BLOCK_N,
            False,
        )
    for n0 in range(n_full, n_end, BLOCK_N):
        acc = _fwd_block(
            acc,
            q,
            K_h,
            V_h,
            PB_h,
            TB_h,
            TimeBounds,
            Timestamps,
            ts_base,
            seq_start,
            stride_kt,
            stride_vt,
            n0,
            n_end,
            offs_m,
            pos_i,
            rts_i,
            alpha,
            num_pos_buckets,
            num_time_buckets,
            offs_qk,
            offs_v,
            qk_ok,
            v_ok,
            HAS_POS,
            HAS_TIME,
            PRECISION,
            BLOCK_N,
            True,
        )

    if HAS_TARGETS:
        if m0 + BLOCK_M > hist:
            # A candidate's own term: silu(alpha q_i.k_i + bias(i, i)) v_i (position bucket 0).
            is_cand = row_ok & (offs_m >= hist)
            k_d = tl.load(K_h + rows[:, None] * stride_kt + offs_qk[None, :], mask=is_cand[:, None] & qk_ok, other=0.0)
            v_d = tl.load(V_h + rows[:, None] * stride_vt + offs_v[None, :], mask=is_cand[:, None] & v_ok, other=0.0)
            s_d = tl.sum(q.to(tl.float32) * k_d.to(tl.float32), axis=1) * alpha
            if HAS_POS:
                s_d += tl.load(PB_h).to(tl.float32)
            if HAS_TIME:
                rts_own = _rel_seconds(Timestamps, seq_start + tl.minimum(offs_m, seq_len - 1), ts_base)
                s_d += tl.load(TB_h + _gap_bucket(tl.abs(rts_i - rts_own), TimeBounds, num_time_buckets)).to(tl.float32)
            p_d = tl.where(is_cand, s_d / (1.0 + tl.exp(-s_d)), 0.0)
            acc += p_d[:, None] * v_d.to(tl.float32)

    out = acc * inv_n
    tl.store(
        Out + rows[:, None] * stride_ot + h * stride_oh + offs_v[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & v_ok,
    )


@triton.jit
def _bwd_block(
    dk,
    dv,
    d_pos_last,
    d_time,
    k,
    v,
    rts_j,
    Q_h,
    DO_h,
    DQ_h,
    DPB_h,
    PB_h,
    TB_h,
    TimeBounds,
    QueryTimestamps,
    ts_base,
    seq_start,
    seq_len,
    hist,
    stride_qt,
    stride_dot,
    stride_dqt,
    m0,
    n0,
    offs_n,
    alpha,
    inv_n,
    num_pos_buckets,
    num_time_buckets,
    offs_qk,
    offs_v,
    qk_ok,
    v_ok,
    offs_t,
    HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One (query block, key block) tile of the backward: dK, dV, dQ (atomics) and the tables."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seq_len
    rows = seq_start + offs_m
    # Rows past the sequence load q = dO = 0, so they add nothing even where unmasked.
    q = tl.load(Q_h + rows[:, None] * stride_qt + offs_qk[None, :], mask=row_ok[:, None] & qk_ok, other=0.0)
    do = tl.load(DO_h + rows[:, None] * stride_dot + offs_v[None, :], mask=row_ok[:, None] & v_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * alpha  # (BLOCK_M, BLOCK_N)
    if HAS_POS:
        s += tl.load(PB_h + _pos_bucket(tl.minimum(offs_m, hist), offs_n, num_pos_buckets)).to(tl.float32)
    if HAS_TIME:
        rts_i = _rel_seconds(QueryTimestamps, seq_start + tl.minimum(offs_m, seq_len - 1), ts_base)
        tb = _time_bucket(rts_i, rts_j, TimeBounds, num_time_buckets)
        s += tl.load(TB_h + tb).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-s))
    p = s * sig * inv_n
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = dp * sig * (1.0 + s * (1.0 - sig)) * inv_n  # dL/ds
    if MASKED:
        valid = (offs_n[None, :] <= offs_m[:, None]) & (offs_n < hist)[None, :]
        p = tl.where(valid, p, 0.0)
        ds = tl.where(valid, ds, 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * alpha
    tl.atomic_add(DQ_h + rows[:, None] * stride_dqt + offs_qk[None, :], dq, mask=row_ok[:, None] & qk_ok, sem="relaxed")

    if HAS_POS:
        if tl.minimum(m0, hist) - (n0 + BLOCK_N - 1) >= num_pos_buckets - 1:
            d_pos_last += tl.sum(ds, axis=None)  # every pair clamps to P - 1
        else:
            # History rows: bucket min(i - j, P - 1) is constant along diagonals. Skew
            # z[c, b] = ds[(b + c) % BLOCK_M, b] so row c holds diagonals i - j = c and
            # c - BLOCK_M (the wrapped part). (Built here, not kept live across the loop.)
            skew = tl.arange(0, BLOCK_M)[:, None] + tl.arange(0, BLOCK_N)[None, :]
            skew_wrap = skew >= BLOCK_M
            z = tl.gather(tl.where((offs_m < hist)[:, None], ds, 0.0), skew % BLOCK_M, 0)
            diag_lo = tl.sum(tl.where(skew_wrap, 0.0, z), axis=1)
            diag_hi = tl.sum(tl.where(skew_wrap, z, 0.0), axis=1)
            rel_lo = (m0 - n0) + tl.arange(0, BLOCK_M)
            rel_hi = rel_lo - BLOCK_M
            tl.atomic_add(
                DPB_h + tl.minimum(tl.maximum(rel_lo, 0), num_pos_buckets - 1), diag_lo, mask=rel_lo >= 0, sem="relaxed"
            )
            tl.atomic_add(
                DPB_h + tl.minimum(tl.maximum(rel_hi, 0), num_pos_buckets - 1), diag_hi, mask=rel_hi >= 0, sem="relaxed"
            )
            if m0 + BLOCK_M > hist:
                # Candidate rows share pos = hist: bucket min(hist - j, P - 1) per column.
                col_sum = tl.sum(tl.where((offs_m >= hist)[:, None], ds, 0.0), axis=0)
                rel_c = tl.minimum(tl.maximum(hist - offs_n, 0), num_pos_buckets - 1)
                tl.atomic_add(DPB_h + rel_c, col_sum, mask=offs_n < hist, sem="relaxed")
    if HAS_TIME:
        # Exact buckets never decrease with the gap, so the row and column time ranges bound
        # those in the tile; sorted timestamps leave few. Visit only those.
        lo_i, hi_i = tl.min(rts_i, axis=0), tl.max(rts_i, axis=0)
        lo_j, hi_j = tl.min(rts_j, axis=0), tl.max(rts_j, axis=0)
        gap_lo = tl.maximum(tl.maximum(lo_i - hi_j, lo_j - hi_i), 0)
        gap_hi = tl.maximum(hi_i - lo_j, hi_j - lo_i)
        t_lo = _gap_bucket(gap_lo, TimeBounds, num_time_buckets)
        t_hi = _gap_bucket(gap_hi, TimeBounds, num_time_buckets)
        for t in range(t_lo, t_hi + 1):
            part = tl.sum(tl.where(tb == t, ds, 0.0), axis=None)
            d_time += tl.where(offs_t == t, part, 0.0)
    return dk, dv, d_pos_last, d_time


@triton.autotune(
    configs=_bwd_configs(),
    key=_KEY,
    prune_configs_by={"early_config_prune": _prune_short},
    reset_to_zero=["DQ", "DPosBias", "DTimeBias"],
)
@triton.jit(do_not_specialize=["AUTOTUNE_N", "num_pos_buckets", "num_time_buckets"])
def _hstu_attn_bwd(
    Q,
    K,
    V,
    DOut,
    DQ,
    DK,
    DV,
    DPosBias,
    DTimeBias,
    SeqOffsets,
    NumTargets,
    Timestamps,
    QueryTimestamps,
    PosBias,
    TimeBias,
    TimeBounds,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    stride_pb,
    stride_tb,
    stride_dpb,
    stride_dtb,
    alpha,
    inv_max_len,
    num_pos_buckets,
    num_time_buckets,
    AUTOTUNE_N,
    D_QK: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr,
    NORM_BY_LEN: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_TIME: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_N <= BLOCK_M)
    h = tl.program_id(1)
    b = tl.program_id(2)
    seq_start = tl.load(SeqOffsets + b)
    seq_len = (tl.load(SeqOffsets + b + 1) - seq_start).to(tl.int32)
    n0 = tl.program_id(0) * BLOCK_N  # earlier key blocks are seen by more queries: first
    if n0 >= seq_len:
        return
    hist = seq_len
    if HAS_TARGETS:
        hist = seq_len - tl.minimum(tl.maximum(tl.load(NumTargets + b).to(tl.int32), 0), seq_len)
    if NORM_BY_LEN:
        inv_n = 1.0 / seq_len.to(tl.float32)
    else:
        inv_n = inv_max_len

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_qk = tl.arange(0, BLOCK_DQK)
    offs_v = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < seq_len
    cols = seq_start + offs_n
    qk_ok = offs_qk[None, :] < D_QK
    v_ok = offs_v[None, :] < D_V
    Q_h, DO_h, DQ_h = Q + h * stride_qh, DOut + h * stride_doh, DQ + h * stride_dqh
    PB_h, TB_h, DPB_h = PosBias + h * stride_pb, TimeBias + h * stride_tb, DPosBias + h * stride_dpb
    k = tl.load(
        K + cols[:, None] * stride_kt + h * stride_kh + offs_qk[None, :], mask=col_ok[:, None] & qk_ok, other=0.0
    )
    v = tl.load(V + cols[:, None] * stride_vt + h * stride_vh + offs_v[None, :], mask=col_ok[:, None] & v_ok, other=0.0)
    ts_base = tl.load(Timestamps + seq_start) if HAS_TIME else 0
    rts_j = _rel_seconds(Timestamps, seq_start + tl.minimum(offs_n, seq_len - 1), ts_base) if HAS_TIME else offs_n
    offs_t = tl.arange(0, BLOCK_TIME)
    d_time = tl.zeros([BLOCK_TIME], dtype=tl.float32)
    d_pos_last = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)  # bucket P - 1
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    if n0 < hist:
        # Query blocks from the diagonal, or all when the key block reaches past the history,
        # need the mask; the rest see every key of the block.
        m_first = (n0 // BLOCK_M) * BLOCK_M
        m_full = tl.where(n0 + BLOCK_N <= hist, (n0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M * BLOCK_M, seq_len)
        for m0 in range(m_first, tl.minimum(m_full, seq_len), BLOCK_M):
            dk, dv, d_pos_last, d_time = _bwd_block(
                dk,
                dv,
                d_pos_last,
                d_time,
                k,
                v,
                rts_j,
                Q_h,
                DO_h,
                DQ_h,
                DPB_h,
                PB_h,
                TB_h,
                TimeBounds,
                QueryTimestamps,
                ts_base,
                seq_start,
                seq_len,
                hist,
                stride_qt,
                stride_dot,
                stride_dqt,
                m0,
                n0,
                offs_n,
                alpha,
                inv_n,
                num_pos_buckets,
                num_time_buckets,
                offs_qk,
                offs_v,
                qk_ok,
                v_ok,
                offs_t,
                HAS_POS,
                HAS_TIME,
                PRECISION,
                BLOCK_M,
                BLOCK_N,
                True,
            )
        for m0 in range(m_full, seq_len, BLOCK_M):
            dk, dv, d_pos_last, d_time = _bwd_block(
                dk,
                dv,
                d_pos_last,
                d_time,
                k,
                v,
                rts_j,
                Q_h,
                DO_h,
                DQ_h,
                DPB_h,
                PB_h,
                TB_h,
                TimeBounds,
                QueryTimestamps,
                ts_base,
                seq_start,
                seq_len,
                hist,
                stride_qt,
                stride_dot,
                stride_dqt,
                m0,
                n0,
                offs_n,
                alpha,
                inv_n,
                num_pos_buckets,
                num_time_buckets,
                offs_qk,
                offs_v,
                qk_ok,
                v_ok,
                offs_t,
                HAS_POS,
                HAS_TIME,
                PRECISION,
                BLOCK_M,
                BLOCK_N,
                False,
            )

    if HAS_TARGETS:
        if n0 + BLOCK_N > hist:
            # Candidate keys are seen by themselves only (the diagonal term).
            is_cand = col_ok & (offs_n >= hist)
            q_d = tl.load(
                Q_h + cols[:, None] * stride_qt + offs_qk[None, :], mask=is_cand[:, None] & qk_ok, other=0.0
            ).to(tl.float32)
            do_d = tl.load(
                DO_h + cols[:, None] * stride_dot + offs_v[None, :], mask=is_cand[:, None] & v_ok, other=0.0
            ).to(tl.float32)
            s_d = tl.sum(q_d * k.to(tl.float32), axis=1) * alpha
            if HAS_POS:
                s_d += tl.load(PB_h).to(tl.float32)
            if HAS_TIME:
                rq_d = _rel_seconds(QueryTimestamps, seq_start + tl.minimum(offs_n, seq_len - 1), ts_base)
                tb_d = _gap_bucket(tl.abs(rq_d - rts_j), TimeBounds, num_time_buckets)  # (BLOCK_N,)
                s_d += tl.load(TB_h + tb_d).to(tl.float32)
            sig_d = 1.0 / (1.0 + tl.exp(-s_d))
            p_d = tl.where(is_cand, s_d * sig_d * inv_n, 0.0)
            dv += p_d[:, None] * do_d
            dp_d = tl.sum(do_d * v.to(tl.float32), axis=1)
            ds_d = tl.where(is_cand, dp_d * sig_d * (1.0 + s_d * (1.0 - sig_d)) * inv_n, 0.0)
            dk += ds_d[:, None] * q_d
            tl.atomic_add(
                DQ_h + cols[:, None] * stride_dqt + offs_qk[None, :],
                (alpha * ds_d)[:, None] * k.to(tl.float32),
                mask=is_cand[:, None] & qk_ok,
                sem="relaxed",
            )
            diag_sum = tl.sum(ds_d, axis=0)
            if HAS_POS:
                tl.atomic_add(DPB_h, diag_sum, sem="relaxed")
            if HAS_TIME:
                d_time += tl.sum(tl.where(tb_d[:, None] == offs_t[None, :], ds_d[:, None], 0.0), axis=0)

    dk = dk * alpha
    tl.store(
        DK + cols[:, None] * stride_dkt + h * stride_dkh + offs_qk[None, :],
        dk.to(DK.dtype.element_ty),
        mask=col_ok[:, None] & qk_ok,
    )
    tl.store(
        DV + cols[:, None] * stride_dvt + h * stride_dvh + offs_v[None, :],
        dv.to(DV.dtype.element_ty),
        mask=col_ok[:, None] & v_ok,
    )
    if HAS_POS:
        tl.atomic_add(DPB_h + num_pos_buckets - 1, d_pos_last, sem="relaxed")
    if HAS_TIME:
        tl.atomic_add(DTimeBias + h * stride_dtb + offs_t, d_time, mask=offs_t < num_time_buckets, sem="relaxed")


def _block_dim(d: int) -> int:
    # tl.dot needs at least 16 along the reduced dimension; tl.arange needs a power of two.
    return max(16, triton.next_power_of_2(d))


INT32_MAX = 2**31 - 1


@functools.cache
def _time_bounds(num_time_buckets: int, device: torch.device) -> torch.Tensor:
    """`time_bucket_boundaries` as the kernels read it: [NT + 1] int32, the reference's NT
    boundaries then a sentinel at [NT], capped at 2^31 - 1 (above every gap: gaps are < 2^30 s).

    Cached per (NT, device): built and copied to the device once, not per launch.
    """
    bounds = time_bucket_boundaries(num_time_buckets, device)
    return torch.cat([bounds, bounds.new_full((1,), INT32_MAX)]).clamp_(max=INT32_MAX).to(torch.int32)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any token and head strides but need a unit stride on the last dim."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _common_args(
    q,
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
    dummy = seq_offsets  # stands in for absent optional tensors; their constexpr flag is False
    timestamps = timestamps if timestamps is not None else dummy
    return dict(
        num_targets=num_targets if num_targets is not None else dummy,
        timestamps=timestamps,
        query_timestamps=query_timestamps if query_timestamps is not None else timestamps,
        pos_bias=pos_bias if pos_bias is not None else dummy,
        time_bias=time_bias if time_bias is not None else dummy,
        time_bounds=_time_bounds(time_bias.shape[1], time_bias.device) if time_bias is not None else dummy,
        stride_pb=pos_bias.stride(0) if pos_bias is not None else 0,
        stride_tb=time_bias.stride(0) if time_bias is not None else 0,
        scalars=dict(
            alpha=float(alpha),
            inv_max_len=1.0 / max(max_seq_len, 1),
            num_pos_buckets=pos_bias.shape[1] if pos_bias is not None else 1,
            num_time_buckets=time_bias.shape[1] if time_bias is not None else 1,
            AUTOTUNE_N=triton.next_power_of_2(max(max_seq_len, 1)),
        ),
        flags=dict(
            D_QK=q.shape[2],
            D_V=v.shape[2],
            BLOCK_DQK=_block_dim(q.shape[2]),
            BLOCK_DV=_block_dim(v.shape[2]),
            HAS_TARGETS=num_targets is not None,
            HAS_POS=pos_bias is not None,
            HAS_TIME=time_bias is not None,
            NORM_BY_LEN=bool(normalize_by_length),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ),
    )


def hstu_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    num_targets: torch.Tensor | None,
    timestamps: torch.Tensor | None,
    pos_bias: torch.Tensor | None,
    time_bias: torch.Tensor | None,
    normalize_by_length: bool,
    query_timestamps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward launcher: [T, H, Dv] output in q's dtype."""
    num_tokens, num_heads, _ = q.shape
    batch = seq_offsets.numel() - 1
    out = torch.empty((num_tokens, num_heads, v.shape[2]), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or batch == 0:
        return out
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    a = _common_args(
        q,
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

    def grid(meta):
        return (triton.cdiv(max_seq_len, meta["BLOCK_M"]), num_heads, batch)

    _hstu_attn_fwd[grid](
        q,
        k,
        v,
        out,
        seq_offsets,
        a["num_targets"],
        a["timestamps"],
        a["query_timestamps"],
        a["pos_bias"],
        a["time_bias"],
        a["time_bounds"],
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        a["stride_pb"],
        a["stride_tb"],
        **a["scalars"],
        **a["flags"],
    )
    return out


def hstu_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    num_targets: torch.Tensor | None,
    timestamps: torch.Tensor | None,
    pos_bias: torch.Tensor | None,
    time_bias: torch.Tensor | None,
    normalize_by_length: bool,
    query_timestamps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward launcher: (dq, dk, dv, d_pos_bias or None, d_time_bias or None)."""
    num_tokens, num_heads, _ = q.shape
    batch = seq_offsets.numel() - 1
    device = q.device
    dq = torch.zeros(q.shape, dtype=torch.float32, device=device)  # atomics accumulate here
    dk = torch.zeros(k.shape, dtype=k.dtype, device=device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=device)
    d_pos = torch.zeros(pos_bias.shape if pos_bias is not None else (1, 1), dtype=torch.float32, device=device)
    d_time = torch.zeros(time_bias.shape if time_bias is not None else (1, 1), dtype=torch.float32, device=device)
    if num_tokens > 0 and batch > 0:
        dout, q, k, v = _rows_contiguous(dout), _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
        a = _common_args(
            q,
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
        block_time = max(16, triton.next_power_of_2(a["scalars"]["num_time_buckets"]))

        def grid(meta):
            return (triton.cdiv(max_seq_len, meta["BLOCK_N"]), num_heads, batch)

        _hstu_attn_bwd[grid](
            q,
            k,
            v,
            dout,
            dq,
            dk,
            dv,
            d_pos,
            d_time,
            seq_offsets,
            a["num_targets"],
            a["timestamps"],
            a["query_timestamps"],
            a["pos_bias"],
            a["time_bias"],
            a["time_bounds"],
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            dout.stride(0),
            dout.stride(1),
            dq.stride(0),
            dq.stride(1),
            dk.stride(0),
            dk.stride(1),
            dv.stride(0),
            dv.stride(1),
            a["stride_pb"],
            a["stride_tb"],
            d_pos.stride(0),
            d_time.stride(0),
            **a["scalars"],
            **a["flags"],
            BLOCK_TIME=block_time,
        )
    return (
        dq.to(q.dtype),
        dk,
        dv,
        d_pos.to(pos_bias.dtype) if pos_bias is not None else None,
        d_time.to(time_bias.dtype) if time_bias is not None else None,
    )
