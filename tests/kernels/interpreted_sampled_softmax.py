"""Triton sampled-softmax loss against its PyTorch reference, through the Triton interpreter.

Run by `test_sampled_softmax.py` in its own pytest process with TRITON_INTERPRET=1 (see
interpreted_hstu_attention.py for why). By hand:

    TRITON_INTERPRET=1 python -m pytest tests/kernels/interpreted_sampled_softmax.py -q
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from kernels._dispatch import triton_interpreted
from tests.kernels.cases import EDGE_SOFTMAX_CASES, check_softmax_case, softmax_cases, softmax_inputs

pytestmark = pytest.mark.skipif(
    not triton_interpreted(),
    reason="needs TRITON_INTERPRET=1 before triton is imported (test_sampled_softmax.py sets it)",
)


@pytest.mark.parametrize("case", EDGE_SOFTMAX_CASES, ids=["no-rows", "one-item", "shared-k128-d64", "rows-k128-d64"])
def test_edge_cases_match_reference(case):
    check_softmax_case(case, "cpu", torch.float32)


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=softmax_cases())
def test_random_cases_match_reference(case):
    check_softmax_case(case, "cpu", torch.float32)


@pytest.mark.parametrize("shared", [False, True], ids=["rows", "shared"])
def test_custom_ops_pass_opcheck(shared):
    inputs = softmax_inputs(EDGE_SOFTMAX_CASES[2 if shared else 3], "cpu", torch.float32)
    args = (inputs["query"], inputs["pos_ids"], inputs["neg_ids"], inputs["table"], inputs["temperature"])
    torch.library.opcheck(torch.ops.hstu_rt.sampled_softmax_triton.default, args)


def test_all_negatives_masked_gives_exactly_zero_gradient():
    """Every negative equals the positive: the loss is 0 and so is every gradient, exactly."""
    from kernels.sampled_softmax import sampled_softmax_loss

    table = torch.randn(1, 16, requires_grad=True)
    query = torch.randn(49, 16, requires_grad=True)
    loss = sampled_softmax_loss(
        query,
        torch.zeros(49, dtype=torch.int64),
        torch.zeros(49, 2, dtype=torch.int64),
        table,
        temperature=0.05,
        impl="triton",
    )
    loss.backward(torch.randn(49))
    assert loss.abs().max().item() == 0.0
    assert table.grad.abs().max().item() == 0.0 and query.grad.abs().max().item() == 0.0
