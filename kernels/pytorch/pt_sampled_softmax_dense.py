"""The sampled-softmax loss for small tables on the CPU: logits against every row, then picked.

The same function as `pt_sampled_softmax.pt_sampled_softmax_loss` (the readable oracle), computed
the way a CPU is fast at it when the table is small, as in the paper's public datasets (ML-1M has
3.7k items): instead of gathering [N, K, D] negative rows, a chunk of C queries is multiplied
with the whole L2-normalised table ([C, D] @ [D, V], one BLAS call) and the K negative logits of
each query are picked out of the [C, V] scores. The backward scatters each query's logit
gradients into a [C, V] matrix and takes two more matmuls (queries and table rows), so autograd
never holds an [N, K, D] tensor; the softmax probabilities [N, 1 + K] are kept from the forward.

It costs O(N·V·D) FLOPs against the gather's O(N·K·D) memory traffic, so it pays while V is at
most a few dozen times K; `kernels.sampled_softmax` picks it by `dense_pays_off`.

    >>> import torch
    >>> from kernels.pytorch.pt_sampled_softmax import pt_sampled_softmax_loss
    >>> from kernels.pytorch.pt_sampled_softmax_dense import pt_sampled_softmax_loss_dense
    >>> args = (torch.randn(4, 16), torch.tensor([1, 2, 3, 4]), torch.randint(0, 100, (4, 8)), torch.randn(100, 16))
    >>> torch.allclose(pt_sampled_softmax_loss_dense(*args, temperature=0.05),
    ...                pt_sampled_softmax_loss(*args, temperature=0.05), atol=1e-5)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.pytorch.pt_sampled_softmax import NORMALIZE_EPS

# The dense path computes V logits per query to use K of them; past this ratio the gather wins
# (measured on the 2-core box: equal cost near V = 100 K for D = 50).
DENSE_MAX_ROWS_PER_NEGATIVE = 64
# [C, V] float32 scores per chunk: 2 MiB, one buffer reused by every chunk, so it stays in cache
# (16 MiB chunks measured 1.6x slower on the 2-core box: page faults and cache misses).
CHUNK_ELEMENTS = 1 << 19


def dense_pays_off(num_rows: int, num_negatives: int) -> bool:
    """Whether the dense path is the faster CPU path for a table of `num_rows` rows."""
    return num_rows <= DENSE_MAX_ROWS_PER_NEGATIVE * max(num_negatives, 1)


def _chunk_rows(num_rows: int) -> int:
    """Queries per chunk, so that one chunk's [C, V] scores hold about CHUNK_ELEMENTS values."""
    return max(1, CHUNK_ELEMENTS // max(num_rows, 1))


class _DenseSampledSoftmax(torch.autograd.Function):
    """Loss [N] from normalised queries [N, D] and normalised rows [V, D]."""

    @staticmethod
    def forward(ctx, qn: Tensor, rows: Tensor, pos_ids: Tensor, neg_ids: Tensor, temperature: float) -> Tensor:
        num_queries, num_rows = qn.shape[0], rows.shape[0]
        loss = qn.new_empty(num_queries)
        probs = qn.new_empty(num_queries, 1 + neg_ids.shape[1])  # softmax over (positive, negatives)
        step = _chunk_rows(num_rows)
        buffer = qn.new_empty(min(step, num_queries), num_rows)
        for start in range(0, num_queries, step):
            end = min(start + step, num_queries)
            scores = torch.mm(qn[start:end], rows.T, out=buffer[: end - start])  # (C, V) cosine similarities
            scores.div_(temperature)
            pos = pos_ids[start:end, None]
            neg = neg_ids[start:end]
            logits = torch.cat([scores.gather(1, pos), scores.gather(1, neg)], dim=1)  # (C, 1 + K)
            logits[:, 1:].masked_fill_(neg == pos, float("-inf"))
            lse = torch.logsumexp(logits, dim=1)
            loss[start:end] = lse - logits[:, 0]
            probs[start:end] = torch.exp(logits - lse[:, None])
        ctx.save_for_backward(qn, rows, pos_ids, neg_ids, probs)
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        qn, rows, pos_ids, neg_ids, probs = ctx.saved_tensors
        num_queries, num_rows = qn.shape[0], rows.shape[0]
        d_qn = torch.empty_like(qn)
        d_rows = torch.zeros_like(rows)
        # d loss_i / d logit_ij = p_ij - [j is the positive]; logits are scores / temperature.
        d_logits = probs * (grad_loss[:, None] / ctx.temperature)
        d_logits[:, 0] -= grad_loss / ctx.temperature
        step = _chunk_rows(num_rows)
        buffer = qn.new_empty(min(step, num_queries), num_rows)
        for start in range(0, num_queries, step):
            end = min(start + step, num_queries)
            d_scores = buffer[: end - start].zero_()  # (C, V)
            d_scores.scatter_add_(1, neg_ids[start:end], d_logits[start:end, 1:])  # masked hits add 0
            d_scores.scatter_add_(1, pos_ids[start:end, None], d_logits[start:end, :1])
            torch.mm(d_scores, rows, out=d_qn[start:end])
            d_rows.addmm_(d_scores.T, qn[start:end])
        return d_qn, d_rows, None, None, None


def pt_sampled_softmax_loss_dense(
    query: Tensor, pos_ids: Tensor, neg_ids: Tensor, table: Tensor, *, temperature: float
) -> Tensor:
    """Per-example sampled-softmax loss [N] (float32), equal to `pt_sampled_softmax_loss`.

    Same arguments; neg_ids may be an expanded stride-0 view of one shared [K] set. The table's
    gradient is dense [V, D] (the whole table is normalised every call).
    """
    qn = F.normalize(query.float(), dim=-1, eps=NORMALIZE_EPS)
    rows = F.normalize(table.float(), dim=-1, eps=NORMALIZE_EPS)
    return _DenseSampledSoftmax.apply(qn, rows, pos_ids.long(), neg_ids.long(), float(temperature))
