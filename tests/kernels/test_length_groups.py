"""kernels/pytorch/pt_length_groups.py: the padded reference in length groups computes the same
function (outputs and every gradient) for less padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.pytorch.pt_hstu_attention import pt_hstu_attention
from kernels.pytorch.pt_length_groups import length_groups, pt_hstu_attention_grouped


def inputs(lengths: list[int], *, targets: bool, seed: int = 0) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    t, h = int(offsets[-1]), 2
    leaf = lambda *shape: torch.randn(*shape, generator=g).requires_grad_()  # noqa: E731
    ts = torch.cumsum(torch.randint(0, 100_000, (t,), generator=g), 0)
    kwargs = dict(
        alpha=0.3,
        num_targets=torch.tensor([min(2, n) for n in lengths]) if targets else None,
        timestamps=ts,
        query_timestamps=ts + torch.randint(0, 5_000, (t,), generator=g),
        pos_bias=leaf(h, 40),
        time_bias=leaf(h, 30),
    )
    return (leaf(t, h, 8), leaf(t, h, 8), leaf(t, h, 6), offsets, max(lengths) + 3), kwargs


@pytest.mark.parametrize("targets", [False, True])
@pytest.mark.parametrize("normalize_by_length", [False, True])
def test_grouped_reference_equals_the_padded_one_with_every_gradient(targets: bool, normalize_by_length: bool) -> None:
    args, kwargs = inputs([3, 20, 7, 25, 1, 12, 5, 0], targets=targets)
    kwargs["normalize_by_length"] = normalize_by_length
    leaves = [args[0], args[1], args[2], kwargs["pos_bias"], kwargs["time_bias"]]
    plain = pt_hstu_attention(*args, **kwargs)
    grads_plain = torch.autograd.grad(plain.square().sum(), leaves)
    grouped = pt_hstu_attention_grouped(*args, num_groups=3, **kwargs)
    grads_grouped = torch.autograd.grad(grouped.square().sum(), leaves)
    torch.testing.assert_close(grouped, plain, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads_grouped, grads_plain):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_one_sequence_or_one_group_is_the_plain_call() -> None:
    args, kwargs = inputs([9], targets=False)
    torch.testing.assert_close(pt_hstu_attention_grouped(*args, **kwargs), pt_hstu_attention(*args, **kwargs))


def test_length_groups_minimise_padding() -> None:
    lengths = np.array([10, 1, 1, 1, 9, 2])
    groups = length_groups(lengths, 2)
    assert [sorted(g.tolist()) for g in groups] == [[1, 2, 3, 5], [0, 4]]
    assert sorted(np.concatenate(length_groups(lengths, 10)).tolist()) == list(range(6))
