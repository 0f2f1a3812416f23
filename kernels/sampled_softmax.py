"""Sampled-softmax retrieval loss: one function, the fused Triton kernel on CUDA, PyTorch elsewhere.

    >>> import torch
    >>> from kernels.sampled_softmax import sampled_softmax_loss
    >>> table = torch.randn(1000, 64, requires_grad=True)
    >>> query = torch.randn(32, 64, requires_grad=True)
    >>> shared = torch.randint(0, 1000, (128,))            # one negative set for the batch
    >>> loss = sampled_softmax_loss(query, torch.randint(0, 1000, (32,)), shared.expand(32, -1),
    ...                             table, temperature=0.05)
    >>> loss.mean().backward(); tuple(loss.shape), tuple(table.grad.shape)
    ((32,), (1000, 64))

The loss is defined in `kernels/pytorch/pt_sampled_softmax.py`; the kernel is
`kernels/triton/triton_sampled_softmax.py`; the choice follows `kernels/_dispatch.py`. On the
PyTorch side, tables of at most 64 rows per negative (`dense_pays_off`) (the public
datasets' catalogues) take `kernels/pytorch/pt_sampled_softmax_dense.py`, the same function
through [chunk, V] matmuls, about 15x faster on a CPU than the readable reference's [N, K, D]
gather; larger tables take the reference. The
Triton path is the torch custom op `hstu_rt::sampled_softmax_triton` (with a fake
implementation) and its backward `hstu_rt::sampled_softmax_triton_bwd`; the table's gradient
is dense [V, D], accumulated by index.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._dispatch import KernelInputError, resolve_impl
from kernels.pytorch.pt_sampled_softmax import pt_sampled_softmax_loss
from kernels.pytorch.pt_sampled_softmax_dense import dense_pays_off, pt_sampled_softmax_loss_dense

MAX_DIM = 1024  # Triton path: a [16, D] float32 tile per program


def _triton_module():
    from kernels.triton import triton_sampled_softmax

    return triton_sampled_softmax


@torch.library.custom_op("hstu_rt::sampled_softmax_triton", mutates_args=())
def _sampled_softmax_triton(
    query: Tensor, pos_ids: Tensor, neg_ids: Tensor, table: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    return _triton_module().sampled_softmax_fwd(query, pos_ids, neg_ids, table, temperature)


@_sampled_softmax_triton.register_fake
def _(query, pos_ids, neg_ids, table, temperature):
    n = query.shape[0]
    return query.new_empty(n, dtype=torch.float32), query.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("hstu_rt::sampled_softmax_triton_bwd", mutates_args=())
def _sampled_softmax_triton_bwd(
    grad_loss: Tensor,
    query: Tensor,
    pos_ids: Tensor,
    neg_ids: Tensor,
    table: Tensor,
    loss: Tensor,
    lse: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    return _triton_module().sampled_softmax_bwd(grad_loss, query, pos_ids, neg_ids, table, loss, lse, temperature)


@_sampled_softmax_triton_bwd.register_fake
def _(grad_loss, query, pos_ids, neg_ids, table, loss, lse, temperature):
    return (
        torch.empty_like(query, memory_format=torch.contiguous_format),
        torch.empty_like(table, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    query, pos_ids, neg_ids, table, temperature = inputs
    loss, lse = output
    ctx.save_for_backward(query, pos_ids, neg_ids, table, loss, lse)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_loss, _grad_lse):
    query, pos_ids, neg_ids, table, loss, lse = ctx.saved_tensors
    d_query, d_table = _sampled_softmax_triton_bwd(
        grad_loss, query, pos_ids, neg_ids, table, loss, lse, ctx.temperature
    )
    return d_query, None, None, d_table, None


_sampled_softmax_triton.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(query, pos_ids, neg_ids, table, temperature) -> None:
    """Shape, dtype and device checks: free, no data read."""
    if not isinstance(query, Tensor) or query.dim() != 2 or not query.is_floating_point():
        raise KernelInputError(f"query must be a floating-point [N, D] tensor, got {getattr(query, 'shape', query)}")
    if not isinstance(table, Tensor) or table.dim() != 2 or not table.is_floating_point():
        raise KernelInputError(f"table must be a floating-point [V, D] tensor, got {getattr(table, 'shape', table)}")
    if table.shape[1] != query.shape[1]:
        raise KernelInputError(f"query is [N, D={query.shape[1]}] but table is [V, D={table.shape[1]}]: D must match")
    num_rows = query.shape[0]
    for name, x, dims in (("pos_ids", pos_ids, 1), ("neg_ids", neg_ids, 2)):
        if not isinstance(x, Tensor) or x.dim() != dims or x.shape[0] != num_rows:
            want = "[N]" if dims == 1 else "[N, K]"
            raise KernelInputError(f"{name} must be {want} with N={num_rows}, got {getattr(x, 'shape', x)}")
        if x.dtype not in (torch.int64, torch.int32):
            raise KernelInputError(f"{name} must be int64 row ids of the table, got {x.dtype}")
    for name, x in (("pos_ids", pos_ids), ("neg_ids", neg_ids), ("table", table)):
        if x.device != query.device:
            raise KernelInputError(f"{name} must be on query's device {query.device}, got {x.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise KernelInputError(f"temperature must be a float > 0, got {temperature!r}")


def _check_ids(pos_ids, neg_ids, table) -> None:
    """Data check (one device-to-host copy): every id is a row of the table."""
    num_items = table.shape[0]
    parts = [x.reshape(-1) for x in (pos_ids, neg_ids) if x.numel() > 0]
    if not parts:
        return
    lo, hi = torch.stack([torch.stack([p.min(), p.max()]) for p in parts]).T.tolist()
    if min(lo) < 0 or max(hi) >= num_items:
        raise KernelInputError(
            f"ids must be rows of the table, 0 <= id < V={num_items}; got ids from {min(lo)} to {max(hi)}"
        )


def sampled_softmax_loss(
    query: Tensor,
    pos_ids: Tensor,
    neg_ids: Tensor,
    table: Tensor,
    *,
    temperature: float,
    impl: str | None = None,
    validate: bool = True,
) -> Tensor:
    """Per-example sampled-softmax loss [N] (float32) over L2-normalised embeddings.

    query: [N, D]; pos_ids: [N] int64 rows of `table`; neg_ids: [N, K] int64 rows of `table`
    (an expanded stride-0 view of one shared [K] set takes the faster shared path);
    table: [V, D]. Logits are cosine similarities / temperature; a negative equal to its
    positive is masked out. Gradients flow to query and table (dense [V, D]).
    impl: None/"auto", "triton" or "pytorch" (see `kernels._dispatch`).
    validate: check that every id is a row of the table (one device-to-host copy).
    """
    _check_inputs(query, pos_ids, neg_ids, table, temperature)
    if validate:
        _check_ids(pos_ids, neg_ids, table)
    chosen = resolve_impl("sampled_softmax_loss", impl, query.device)
    if chosen == "pytorch":
        if dense_pays_off(table.shape[0], neg_ids.shape[1]):
            return pt_sampled_softmax_loss_dense(query, pos_ids, neg_ids, table, temperature=float(temperature))
        return pt_sampled_softmax_loss(query, pos_ids, neg_ids, table, temperature=float(temperature))
    if query.shape[1] > MAX_DIM:
        raise KernelInputError(f"the Triton kernel takes D up to {MAX_DIM}, got D={query.shape[1]}; use impl='pytorch'")
    loss, _ = _sampled_softmax_triton(query, pos_ids, neg_ids, table, float(temperature))
    return loss
