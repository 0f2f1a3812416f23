"""Triton HSTU attention against its PyTorch reference, through the Triton interpreter, float32.

Not collected by the main test run (the name does not start with test_): Triton's interpreter
is chosen once per process, before triton is imported, so `test_hstu_attention.py` runs this
file in its own pytest process with TRITON_INTERPRET=1. By hand:

    TRITON_INTERPRET=1 python -m pytest tests/kernels/interpreted_hstu_attention.py -q
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from kernels._dispatch import triton_interpreted
from tests.kernels.cases import EDGE_HSTU_CASES, EDGE_HSTU_IDS, check_hstu_case, hstu_cases, hstu_inputs

pytestmark = pytest.mark.skipif(
    not triton_interpreted(),
    reason="needs TRITON_INTERPRET=1 before triton is imported (test_hstu_attention.py sets it)",
)


@pytest.mark.parametrize("case", EDGE_HSTU_CASES, ids=EDGE_HSTU_IDS)
def test_edge_cases_match_reference(case):
    check_hstu_case(case, "cpu", torch.float32)


@settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=hstu_cases())
def test_random_cases_match_reference(case):
    check_hstu_case(case, "cpu", torch.float32)


def test_custom_ops_pass_opcheck():
    """Schema, autograd registration, fake tensors and AOT dispatch of both custom ops."""
    inputs = hstu_inputs(EDGE_HSTU_CASES[4], "cpu", torch.float32)["args"]  # every optional input present
    args = (
        inputs["q"],
        inputs["k"],
        inputs["v"],
        inputs["seq_offsets"],
        inputs["max_seq_len"],
        inputs["alpha"],
        inputs["num_targets"],
        inputs["timestamps"],
        inputs["pos_bias"],
        inputs["time_bias"],
        False,
        inputs["query_timestamps"],
    )
    torch.library.opcheck(torch.ops.hstu_rt.hstu_attention_triton.default, args)
    dout = torch.randn(inputs["v"].shape)
    torch.library.opcheck(
        torch.ops.hstu_rt.hstu_attention_triton_bwd.default,
        (dout, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args]),
    )


def test_backward_of_strided_views_matches_contiguous():
    """q, k, v as views of one fused projection (the model's layout) give the same result."""
    from kernels.hstu_attention import hstu_attention

    torch.manual_seed(0)
    offsets = torch.tensor([0, 5, 40, 41])
    fused = torch.randn(41, 2, 3 * 32, requires_grad=True)
    q, k, v = fused.split(32, dim=-1)
    out = hstu_attention(q, k, v, offsets, 40, alpha=0.2, impl="triton")
    out.square().sum().backward()
    got = fused.grad.clone()
    fused.grad = None
    ref = hstu_attention(q.contiguous(), k.contiguous(), v.contiguous(), offsets, 40, alpha=0.2, impl="pytorch")
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got, fused.grad, atol=1e-5, rtol=1e-4)
