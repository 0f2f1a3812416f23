"""Sampled-softmax retrieval loss in plain PyTorch: the readable definition, CPU path and oracle.

For query i with positive row p_i and K sampled negative rows n_i1..n_iK of an embedding table,
all L2-normalised (`F.normalize`, eps 1e-12) and divided by a temperature:

    logit_p  = <q_i, e_{p_i}> / temperature
    logit_ik = <q_i, e_{n_ik}> / temperature, or -inf where n_ik == p_i (an accidental hit)
    loss_i   = logsumexp(logit_p, logit_i1, ..., logit_iK) - logit_p

The per-example loss [N] is returned in float32 (inputs are upcast), so the caller chooses how
to weight and reduce it. This version gathers the [N, K, D] negatives, which is what the
Triton kernel avoids; autograd gives the backward.

    >>> import torch
    >>> from kernels.pytorch.pt_sampled_softmax import pt_sampled_softmax_loss
    >>> table = torch.randn(100, 16)
    >>> loss = pt_sampled_softmax_loss(torch.randn(4, 16), torch.tensor([1, 2, 3, 4]),
    ...                                torch.randint(0, 100, (4, 8)), table, temperature=0.05)
    >>> tuple(loss.shape), loss.dtype
    ((4,), torch.float32)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NORMALIZE_EPS = 1e-12


def pt_sampled_softmax_loss(
    query: Tensor, pos_ids: Tensor, neg_ids: Tensor, table: Tensor, *, temperature: float
) -> Tensor:
    """Per-example sampled-softmax loss [N] (float32); see the module docstring.

    query: [N, D]; pos_ids: [N] rows of `table`; neg_ids: [N, K] rows of `table` (an expanded
    view of one shared [K] set is fine); table: [V, D]. Inputs are validated by
    `kernels.sampled_softmax.sampled_softmax_loss`, not here.
    """
    q = F.normalize(query.float(), dim=-1, eps=NORMALIZE_EPS)  # (N, D)
    pos = F.normalize(table[pos_ids].float(), dim=-1, eps=NORMALIZE_EPS)  # (N, D)
    neg = F.normalize(table[neg_ids].float(), dim=-1, eps=NORMALIZE_EPS)  # (N, K, D)
    pos_logit = (q * pos).sum(-1) / temperature  # (N,)
    neg_logits = torch.einsum("nd,nkd->nk", q, neg) / temperature  # (N, K)
    neg_logits = neg_logits.masked_fill(neg_ids == pos_ids[:, None], float("-inf"))
    logits = torch.cat([pos_logit[:, None], neg_logits], dim=1)  # (N, 1 + K)
    return torch.logsumexp(logits, dim=1) - pos_logit
