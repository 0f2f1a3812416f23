"""Fused sampled-softmax loss in Triton: forward and backward, never an [N, K, D] tensor.

Computes exactly `kernels.pytorch.pt_sampled_softmax.pt_sampled_softmax_loss`. Each program
gathers the negative rows it needs straight from the table, normalises them in registers and
keeps an online logsumexp; the forward stores only the per-example loss and logsumexp [N],
and the backward recomputes the logits.

Two layouts of the negatives:

- per-example negatives [N, K]: a few queries per program; table gradients go to a dense float32
  [V, D] buffer by atomic adds of the rows' gradients (indexed accumulation).
- one shared set [K] (an expanded, stride-0 [N, K] view, as uniform negatives sampled once per
  batch are): blocks of queries meet blocks of negatives in `tl.dot` tiles, and the
  negatives' gradient w.r.t. their normalised rows is accumulated in a [K, D] buffer; the
  last step through the normalisation and the scatter into [V, D] are K rows of PyTorch.

Do not call these launchers directly: `kernels.sampled_softmax.sampled_softmax_loss`
validates the inputs, picks the implementation and wraps them for autograd.
"""

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

_EPS = tl.constexpr(1e-12)  # F.normalize's default
NORMALIZE_EPS = 1e-12


@triton.jit
def _normalize_bwd(x_hat, d_x_hat, norm, dot_axis: tl.constexpr):
    """Gradient through x / max(||x||, eps), given x_hat, dL/dx_hat and ||x|| (keep-dims form)."""
    proj = tl.sum(x_hat * d_x_hat, axis=dot_axis, keep_dims=True)
    return tl.where(norm > _EPS, (d_x_hat - x_hat * proj) / tl.maximum(norm, _EPS), d_x_hat / _EPS)


INTERPRETED = isinstance(_normalize_bwd, InterpretedFunction)
if INTERPRETED != isinstance(tl.standard.sigmoid, InterpretedFunction):
    raise ImportError(
        f"TRITON_INTERPRET changed between importing triton (interpreted="
        f"{not INTERPRETED}) and {__name__} (interpreted={INTERPRETED}): set it before anything imports triton"
    )


@triton.jit
def _ssm_fwd_rows(
    Query,
    PosIds,
    NegIds,
    Table,
    Loss,
    Lse,
    stride_qn,
    stride_negn,
    stride_negk,
    stride_tv,
    num_rows,
    num_neg,
    inv_temp,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < num_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Query + offs_m[:, None] * stride_qn + offs_d[None, :], mask=md_ok, other=0.0).to(tl.float32)
    q_hat = q / tl.maximum(tl.sqrt(tl.sum(q * q, axis=1, keep_dims=True)), _EPS)  # (BLOCK_M, BLOCK_D)
    pos = tl.load(PosIds + offs_m, mask=m_ok, other=0)
    e = tl.load(Table + pos[:, None] * stride_tv + offs_d[None, :], mask=md_ok, other=0.0).to(tl.float32)
    e_hat = e / tl.maximum(tl.sqrt(tl.sum(e * e, axis=1, keep_dims=True)), _EPS)
    logit_p = tl.sum(q_hat * e_hat, axis=1) * inv_temp  # (BLOCK_M,)
    run_max = logit_p
    run_sum = tl.exp(logit_p - run_max)  # ones
    for k0 in range(0, num_neg, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk_ok = m_ok[:, None] & (offs_k < num_neg)[None, :]
        ids = tl.load(NegIds + offs_m[:, None] * stride_negn + offs_k[None, :] * stride_negk, mask=mk_ok, other=0)
        rows = tl.load(
            Table + ids[:, :, None] * stride_tv + offs_d[None, None, :],
            mask=mk_ok[:, :, None] & d_ok[None, None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_M, BLOCK_K, BLOCK_D)
        norms = tl.sqrt(tl.sum(rows * rows, axis=2))  # (BLOCK_M, BLOCK_K)
        logits = tl.sum(rows * q_hat[:, None, :], axis=2) / tl.maximum(norms, _EPS) * inv_temp
        logits = tl.where(mk_ok & (ids != pos[:, None]), logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    tl.store(Lse + offs_m, lse, mask=m_ok)
    tl.store(Loss + offs_m, lse - logit_p, mask=m_ok)


@triton.jit
def _ssm_bwd_rows(
    Query,
    PosIds,
    NegIds,
    Table,
    Loss,
    Lse,
    GradLoss,
    DQuery,
    DTable,
    stride_qn,
    stride_negn,
    stride_negk,
    stride_tv,
    stride_dqn,
    stride_dtv,
    num_rows,
    num_neg,
    inv_temp,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < num_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Query + offs_m[:, None] * stride_qn + offs_d[None, :], mask=md_ok, other=0.0).to(tl.float32)
    q_norm = tl.sqrt(tl.sum(q * q, axis=1, keep_dims=True))
    q_hat = q / tl.maximum(q_norm, _EPS)  # (BLOCK_M, BLOCK_D)
    pos = tl.load(PosIds + offs_m, mask=m_ok, other=0)
    e = tl.load(Table + pos[:, None] * stride_tv + offs_d[None, :], mask=md_ok, other=0.0).to(tl.float32)
    e_norm = tl.sqrt(tl.sum(e * e, axis=1, keep_dims=True))
    e_hat = e / tl.maximum(e_norm, _EPS)
    lse = tl.load(Lse + offs_m, mask=m_ok, other=0.0)[:, None]
    loss = tl.load(Loss + offs_m, mask=m_ok, other=0.0)[:, None]
    g = tl.load(GradLoss + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None]

    # softmax(positive) = exp(logit_p - lse) = exp(-loss): taken from the forward's own loss, so
    # a row whose negatives are all masked (loss 0) gets exactly zero gradient.
    w_p = g * (tl.exp(-loss) - 1.0) * inv_temp  # dL/d<q_hat, e_hat>
    d_q_hat = w_p * e_hat
    d_e = _normalize_bwd(e_hat, w_p * q_hat, e_norm, 1)
    tl.atomic_add(DTable + pos[:, None] * stride_dtv + offs_d[None, :], d_e, mask=md_ok, sem="relaxed")
    for k0 in range(0, num_neg, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk_ok = m_ok[:, None] & (offs_k < num_neg)[None, :]
        ids = tl.load(NegIds + offs_m[:, None] * stride_negn + offs_k[None, :] * stride_negk, mask=mk_ok, other=0)
        rows = tl.load(
            Table + ids[:, :, None] * stride_tv + offs_d[None, None, :],
            mask=mk_ok[:, :, None] & d_ok[None, None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_M, BLOCK_K, BLOCK_D)
        norms = tl.sqrt(tl.sum(rows * rows, axis=2, keep_dims=True))  # (BLOCK_M, BLOCK_K, 1)
        r_hat = rows / tl.maximum(norms, _EPS)
        logits = tl.sum(r_hat * q_hat[:, None, :], axis=2) * inv_temp  # (BLOCK_M, BLOCK_K)
        keep = mk_ok & (ids != pos[:, None])
        w = tl.where(keep, g * tl.exp(logits - lse) * inv_temp, 0.0)[:, :, None]  # (BLOCK_M, BLOCK_K, 1)
        d_q_hat += tl.sum(w * r_hat, axis=1)
        d_rows = _normalize_bwd(r_hat, w * q_hat[:, None, :], norms, 2)
        tl.atomic_add(
            DTable + ids[:, :, None] * stride_dtv + offs_d[None, None, :],
            d_rows,
            mask=keep[:, :, None] & d_ok[None, None, :],
            sem="relaxed",
        )
    d_q = _normalize_bwd(q_hat, d_q_hat, q_norm, 1)
    tl.store(DQuery + offs_m[:, None] * stride_dqn + offs_d[None, :], d_q.to(DQuery.dtype.element_ty), mask=md_ok)


@triton.jit
def _ssm_fwd_shared(
    Query,
    PosIds,
    NegIds,
    Table,
    Loss,
    Lse,
    stride_qn,
    stride_negk,
    stride_tv,
    num_rows,
    num_neg,
    inv_temp,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < num_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(
        Query + offs_m[:, None] * stride_qn + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0
    ).to(tl.float32)
    q_hat = q / tl.maximum(tl.sqrt(tl.sum(q * q, axis=1, keep_dims=True)), _EPS)  # (BLOCK_M, BLOCK_D)
    pos = tl.load(PosIds + offs_m, mask=m_ok, other=0)
    e = tl.load(Table + pos[:, None] * stride_tv + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(
        tl.float32
    )
    e_hat = e / tl.maximum(tl.sqrt(tl.sum(e * e, axis=1, keep_dims=True)), _EPS)
    logit_p = tl.sum(q_hat * e_hat, axis=1) * inv_temp  # (BLOCK_M,)
    run_max = logit_p
    run_sum = tl.exp(logit_p - run_max)
    for k0 in range(0, num_neg, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < num_neg
        ids = tl.load(NegIds + offs_k * stride_negk, mask=k_ok, other=0)
        rows = tl.load(
            Table + ids[:, None] * stride_tv + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        r_hat = rows / tl.maximum(tl.sqrt(tl.sum(rows * rows, axis=1, keep_dims=True)), _EPS)  # (BLOCK_K, BLOCK_D)
        logits = tl.dot(q_hat, tl.trans(r_hat), input_precision="ieee") * inv_temp  # (BLOCK_M, BLOCK_K)
        logits = tl.where(k_ok[None, :] & (ids[None, :] != pos[:, None]), logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    tl.store(Lse + offs_m, lse, mask=m_ok)
    tl.store(Loss + offs_m, lse - logit_p, mask=m_ok)


@triton.jit
def _ssm_bwd_shared(
    Query,
    PosIds,
    NegIds,
    Table,
    Loss,
    Lse,
    GradLoss,
    DQuery,
    DTable,
    DNegHat,
    stride_qn,
    stride_negk,
    stride_tv,
    stride_dqn,
    stride_dtv,
    num_rows,
    num_neg,
    inv_temp,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < num_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Query + offs_m[:, None] * stride_qn + offs_d[None, :], mask=md_ok, other=0.0).to(tl.float32)
    q_norm = tl.sqrt(tl.sum(q * q, axis=1, keep_dims=True))
    q_hat = q / tl.maximum(q_norm, _EPS)  # (BLOCK_M, BLOCK_D)
    pos = tl.load(PosIds + offs_m, mask=m_ok, other=0)
    e = tl.load(Table + pos[:, None] * stride_tv + offs_d[None, :], mask=md_ok, other=0.0).to(tl.float32)
    e_norm = tl.sqrt(tl.sum(e * e, axis=1, keep_dims=True))
    e_hat = e / tl.maximum(e_norm, _EPS)
    lse = tl.load(Lse + offs_m, mask=m_ok, other=0.0)[:, None]
    loss = tl.load(Loss + offs_m, mask=m_ok, other=0.0)[:, None]
    g = tl.load(GradLoss + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None]

    # softmax(positive) = exp(logit_p - lse) = exp(-loss): taken from the forward's own loss, so
    # a row whose negatives are all masked (loss 0) gets exactly zero gradient.
    w_p = g * (tl.exp(-loss) - 1.0) * inv_temp  # dL/d<q_hat, e_hat>
    d_q_hat = w_p * e_hat
    d_e = _normalize_bwd(e_hat, w_p * q_hat, e_norm, 1)
    tl.atomic_add(DTable + pos[:, None] * stride_dtv + offs_d[None, :], d_e, mask=md_ok, sem="relaxed")
    for k0 in range(0, num_neg, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < num_neg
        ids = tl.load(NegIds + offs_k * stride_negk, mask=k_ok, other=0)
        rows = tl.load(
            Table + ids[:, None] * stride_tv + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        r_hat = rows / tl.maximum(tl.sqrt(tl.sum(rows * rows, axis=1, keep_dims=True)), _EPS)  # (BLOCK_K, BLOCK_D)
        logits = tl.dot(q_hat, tl.trans(r_hat), input_precision="ieee") * inv_temp  # (BLOCK_M, BLOCK_K)
        keep = m_ok[:, None] & k_ok[None, :] & (ids[None, :] != pos[:, None])
        w = tl.where(keep, g * tl.exp(logits - lse) * inv_temp, 0.0)  # dL/d<q_hat, r_hat>
        d_q_hat += tl.dot(w, r_hat, input_precision="ieee")
        d_r_hat = tl.dot(tl.trans(w), q_hat, input_precision="ieee")  # (BLOCK_K, BLOCK_D)
        tl.atomic_add(
            DNegHat + offs_k[:, None] * BLOCK_D + offs_d[None, :],
            d_r_hat,
            mask=k_ok[:, None] & d_ok[None, :],
            sem="relaxed",
        )
    d_q = _normalize_bwd(q_hat, d_q_hat, q_norm, 1)
    tl.store(DQuery + offs_m[:, None] * stride_dqn + offs_d[None, :], d_q.to(DQuery.dtype.element_ty), mask=md_ok)


def _blocks(dim: int) -> tuple[int, int, int]:
    """(BLOCK_D, rows per tile, queries per program of the per-example path).

    A [rows, BLOCK_D] float32 tile holds at most 8192 values; the per-example path gathers
    [queries, rows, BLOCK_D]. The interpreter pays per operation, not per element, so it takes
    16 queries at a time.
    """
    block_d = max(16, triton.next_power_of_2(dim))
    block = max(16, min(64, 8192 // block_d))
    return block_d, block, (16 if INTERPRETED else 2)


def shared_negatives(neg_ids: torch.Tensor) -> bool:
    """Whether [N, K] negatives are one [K] set expanded over the rows (stride 0)."""
    return neg_ids.shape[0] > 1 and neg_ids.stride(0) == 0


def sampled_softmax_fwd(query, pos_ids, neg_ids, table, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher: (loss [N] float32, logsumexp [N] float32)."""
    num_rows, dim = query.shape
    loss = torch.empty(num_rows, dtype=torch.float32, device=query.device)
    lse = torch.empty(num_rows, dtype=torch.float32, device=query.device)
    if num_rows == 0:
        return loss, lse
    query = query if query.stride(1) == 1 else query.contiguous()
    table = table if table.stride(1) == 1 else table.contiguous()
    pos_ids = pos_ids.contiguous()
    block_d, block, block_rows = _blocks(dim)
    inv_temp = 1.0 / float(temperature)
    if shared_negatives(neg_ids):
        _ssm_fwd_shared[(triton.cdiv(num_rows, block),)](
            query,
            pos_ids,
            neg_ids,
            table,
            loss,
            lse,
            query.stride(0),
            neg_ids.stride(1),
            table.stride(0),
            num_rows,
            neg_ids.shape[1],
            inv_temp,
            D=dim,
            BLOCK_D=block_d,
            BLOCK_M=block,
            BLOCK_K=block,
        )
    else:
        _ssm_fwd_rows[(triton.cdiv(num_rows, block_rows),)](
            query,
            pos_ids,
            neg_ids,
            table,
            loss,
            lse,
            query.stride(0),
            neg_ids.stride(0),
            neg_ids.stride(1),
            table.stride(0),
            num_rows,
            neg_ids.shape[1],
            inv_temp,
            D=dim,
            BLOCK_D=block_d,
            BLOCK_M=block_rows,
            BLOCK_K=max(16, block // block_rows),
        )
    return loss, lse


def sampled_softmax_bwd(
    grad_loss, query, pos_ids, neg_ids, table, loss, lse, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward launcher: (d_query in query's dtype, dense d_table in table's dtype)."""
    num_rows, dim = query.shape
    d_query = torch.empty_like(query, memory_format=torch.contiguous_format)
    d_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
    if num_rows == 0:
        return d_query, d_table.to(table.dtype)
    query = query if query.stride(1) == 1 else query.contiguous()
    table = table if table.stride(1) == 1 else table.contiguous()
    # `loss.sum().backward()` hands over a stride-0 gradient: the kernels index rows densely.
    pos_ids, loss, lse, grad_loss = pos_ids.contiguous(), loss.contiguous(), lse.contiguous(), grad_loss.contiguous()
    block_d, block, block_rows = _blocks(dim)
    inv_temp = 1.0 / float(temperature)
    num_neg = neg_ids.shape[1]
    if shared_negatives(neg_ids):
        d_neg_hat = torch.zeros((num_neg, block_d), dtype=torch.float32, device=query.device)
        _ssm_bwd_shared[(triton.cdiv(num_rows, block),)](
            query,
            pos_ids,
            neg_ids,
            table,
            loss,
            lse,
            grad_loss,
            d_query,
            d_table,
            d_neg_hat,
            query.stride(0),
            neg_ids.stride(1),
            table.stride(0),
            d_query.stride(0),
            d_table.stride(0),
            num_rows,
            num_neg,
            inv_temp,
            D=dim,
            BLOCK_D=block_d,
            BLOCK_M=block,
            BLOCK_K=block,
        )
        # K rows: through the normalisation of each negative, then into the table.
        shared = neg_ids[0]
        rows = table[shared].float()  # (K, D)
        norms = rows.norm(dim=1, keepdim=True)
        r_hat = rows / norms.clamp_min(NORMALIZE_EPS)
        d_r_hat = d_neg_hat[:, :dim]
        proj = (r_hat * d_r_hat).sum(1, keepdim=True)
        d_rows = torch.where(
            norms > NORMALIZE_EPS, (d_r_hat - r_hat * proj) / norms.clamp_min(NORMALIZE_EPS), d_r_hat / NORMALIZE_EPS
        )
        d_table.index_add_(0, shared, d_rows)
    else:
        _ssm_bwd_rows[(triton.cdiv(num_rows, block_rows),)](
            query,
            pos_ids,
            neg_ids,
            table,
            loss,
            lse,
            grad_loss,
            d_query,
            d_table,
            query.stride(0),
            neg_ids.stride(0),
            neg_ids.stride(1),
            table.stride(0),
            d_query.stride(0),
            d_table.stride(0),
            num_rows,
            num_neg,
            inv_temp,
            D=dim,
            BLOCK_D=block_d,
            BLOCK_M=block_rows,
            BLOCK_K=max(16, block // block_rows),
        )
    return d_query, d_table.to(table.dtype)
