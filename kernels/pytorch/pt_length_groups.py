"""Less padding for the padded PyTorch reference: attend sequences of similar length together.

`pt_hstu_attention` pads every sequence of a call to `max_seq_len`, so its work is
B * N^2 whatever the real lengths. Splitting the sequences into a few groups of similar length,
each padded only to its own longest, computes exactly the same function (each sequence attends
only to itself; the normaliser stays the call's `max_seq_len`) for a fraction of the work on
jagged batches. The dispatcher (`kernels.hstu_attention`) runs the reference through here; the
Triton kernel is jagged and needs none of it.

    >>> import numpy as np
    >>> [g.tolist() for g in length_groups(np.array([200, 3, 5, 190, 4]), 2)]
    [[1, 4, 2], [3, 0]]
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kernels.pytorch.pt_hstu_attention import pt_hstu_attention

DEFAULT_GROUPS = 4  # a few calls: each costs a little fixed overhead, and 4 takes most of the padding


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


def pt_hstu_attention_grouped(
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
    num_groups: int = DEFAULT_GROUPS,
) -> Tensor:
    """`pt_hstu_attention` computed in up to `num_groups` length-sorted calls; same arguments,
    same result (up to float rounding), less padding. Reads the lengths on the host."""
    kwargs = dict(alpha=alpha, pos_bias=pos_bias, time_bias=time_bias, normalize_by_length=normalize_by_length)
    batch = seq_offsets.numel() - 1
    if batch <= 1 or num_groups <= 1 or q.shape[0] == 0:
        return pt_hstu_attention(
            q,
            k,
            v,
            seq_offsets,
            max_seq_len,
            num_targets=num_targets,
            timestamps=timestamps,
            query_timestamps=query_timestamps,
            **kwargs,
        )
    offsets = seq_offsets.to("cpu", torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    groups = length_groups(lengths.numpy(), num_groups)
    if len(groups) == 1:
        return pt_hstu_attention(
            q,
            k,
            v,
            seq_offsets,
            max_seq_len,
            num_targets=num_targets,
            timestamps=timestamps,
            query_timestamps=query_timestamps,
            **kwargs,
        )
    device = q.device
    pieces, outs = [], []
    for members in groups:
        members_t = torch.from_numpy(members)
        g_len = lengths[members_t]
        g_off = torch.zeros(members.size + 1, dtype=torch.int64)
        torch.cumsum(g_len, 0, out=g_off[1:])
        # the tokens of the group's sequences, each sequence's tokens contiguous
        tokens = (torch.repeat_interleave(offsets[members_t] - g_off[:-1], g_len) + torch.arange(int(g_off[-1]))).to(
            device
        )
        g_max = int(g_len.max())
        out = pt_hstu_attention(
            q[tokens],
            k[tokens],
            v[tokens],
            g_off.to(device),
            g_max,
            num_targets=num_targets[members_t.to(num_targets.device)] if num_targets is not None else None,
            timestamps=timestamps[tokens] if timestamps is not None else None,
            query_timestamps=query_timestamps[tokens] if query_timestamps is not None else None,
            **kwargs,
        )  # (Tg, H, Dv), divided by g_max
        if not normalize_by_length and g_max != max_seq_len:
            out = out * (g_max / max_seq_len)  # the call's normaliser, not the group's
        pieces.append(tokens)
        outs.append(out)
    permutation = torch.cat(pieces)
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(permutation.numel(), device=device)
    return torch.cat(outs).index_select(0, inverse)  # (T, H, Dv) back in the call's token order
