"""kernels.sampled_softmax: the reference against a naive loop, the dense CPU path against the
reference, the dispatcher, input errors, the Triton kernel through the interpreter (subprocess,
float32) and compiled on a GPU (bf16).

    python -m pytest tests/kernels/test_sampled_softmax.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from kernels._dispatch import KernelInputError, KernelUnavailableError, triton_interpreted
from kernels.pytorch.pt_sampled_softmax import pt_sampled_softmax_loss
from kernels.pytorch.pt_sampled_softmax_dense import DENSE_MAX_ROWS_PER_NEGATIVE, dense_pays_off
from kernels.sampled_softmax import sampled_softmax_loss
from tests.kernels.cases import EDGE_SOFTMAX_CASES, check_softmax_case, run_softmax, softmax_cases, softmax_inputs


def naive_loss(query, pos_ids, neg_ids, table, temperature):
    losses = []
    for i in range(query.shape[0]):
        q = query[i].double() / query[i].double().norm()
        rows = [table[int(pos_ids[i])]] + [table[int(n)] for n in neg_ids[i] if int(n) != int(pos_ids[i])]
        logits = [float(q @ (r.double() / r.double().norm())) / temperature for r in rows]
        top = max(logits)
        losses.append(top + math.log(sum(math.exp(x - top) for x in logits)) - logits[0])
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("shared", [False, True])
def test_reference_matches_naive_loop(shared):
    torch.manual_seed(0)
    table = torch.randn(20, 8, dtype=torch.float64)
    query = torch.randn(6, 8, dtype=torch.float64)
    pos_ids = torch.tensor([0, 1, 2, 3, 4, 5])
    neg_ids = torch.tensor([3, 0, 7, 7, 19]).expand(6, -1) if shared else torch.randint(0, 20, (6, 5))
    got = pt_sampled_softmax_loss(query, pos_ids, neg_ids, table, temperature=0.2)
    torch.testing.assert_close(got, naive_loss(query, pos_ids, neg_ids, table, 0.2).float(), atol=1e-6, rtol=1e-6)


def test_accidental_hits_are_masked():
    """A row whose negatives all equal its positive has loss 0, whatever the logits."""
    table = torch.randn(4, 8)
    loss = pt_sampled_softmax_loss(
        torch.randn(2, 8), torch.tensor([1, 2]), torch.tensor([[1, 1], [2, 2]]), table, temperature=0.1
    )
    torch.testing.assert_close(loss, torch.zeros(2))


def test_interpreted_triton_kernel_matches_reference(interpreted_pytest):
    """Loss and both gradients in float32, per-example and shared negatives; ~30 s."""
    interpreted_pytest("tests/kernels/interpreted_sampled_softmax.py")


@pytest.mark.parametrize("case", EDGE_SOFTMAX_CASES, ids=["no-rows", "one-item", "shared-k128-d64", "rows-k128-d64"])
def test_dense_cpu_path_matches_reference_on_edge_cases(case):
    check_softmax_case(case, "cpu", torch.float32, impl="dense")


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=softmax_cases())
def test_dense_cpu_path_matches_reference(case):
    """Loss, d_query and d_table in float32: accidental hits, shared sets, a zero row, V = 1."""
    check_softmax_case(case, "cpu", torch.float32, impl="dense")


def test_dense_cpu_path_chunks_queries(monkeypatch):
    """Several query chunks (a ragged last one) give the same loss and gradients as one."""
    from kernels.pytorch import pt_sampled_softmax_dense

    case = EDGE_SOFTMAX_CASES[3]
    whole = run_softmax(softmax_inputs(case, "cpu", torch.float32), "dense")
    monkeypatch.setattr(pt_sampled_softmax_dense, "CHUNK_ELEMENTS", 7 * case.vocab)  # 7 queries per chunk
    chunked = run_softmax(softmax_inputs(case, "cpu", torch.float32), "dense")
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], atol=1e-6, rtol=1e-5)


def test_cpu_tensors_use_pytorch_dense_for_small_tables_and_the_gather_otherwise():
    assert dense_pays_off(DENSE_MAX_ROWS_PER_NEGATIVE * 4, 4) and not dense_pays_off(
        DENSE_MAX_ROWS_PER_NEGATIVE * 4 + 1, 4
    )
    for vocab in (10, DENSE_MAX_ROWS_PER_NEGATIVE * 4 + 1):
        table = torch.randn(vocab, 16, requires_grad=True)
        args = (torch.randn(3, 16), torch.tensor([0, 1, 2]), torch.randint(0, vocab, (3, 4)), table)
        got = sampled_softmax_loss(*args, temperature=0.1)
        (d_got,) = torch.autograd.grad(got.sum(), table)
        want = pt_sampled_softmax_loss(*args, temperature=0.1)
        (d_want,) = torch.autograd.grad(want.sum(), table)
        # the gather path is the reference itself (bit-equal); the dense path agrees to float32 rounding
        tol = dict(atol=0, rtol=0) if vocab > 10 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(d_got, d_want, **tol)
        dense_fn = "_DenseSampledSoftmaxBackward" in type(got.grad_fn).__name__
        assert dense_fn == (vocab == 10), f"V={vocab}: grad_fn {type(got.grad_fn).__name__}"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    if triton_interpreted():
        pytest.skip("this process runs Triton in its interpreter, where triton on CPU tensors is allowed")
    monkeypatch.delenv("HSTU_KERNEL_IMPL", raising=False)
    args = (torch.randn(3, 16), torch.tensor([0, 1, 2]), torch.randint(0, 10, (3, 4)), torch.randn(10, 16))
    with pytest.raises(KernelUnavailableError, match="impl='pytorch'"):
        sampled_softmax_loss(*args, temperature=0.1, impl="triton")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(query=torch.randn(3, 8)), "query is \\[N, D=8\\] but table is \\[V, D=16\\]"),
        (dict(pos_ids=torch.tensor([0, 1])), "pos_ids must be \\[N\\] with N=3"),
        (dict(neg_ids=torch.randint(0, 10, (3,))), "neg_ids must be \\[N, K\\] with N=3"),
        (dict(neg_ids=torch.rand(3, 4)), "neg_ids must be int64"),
        (dict(temperature=0.0), "temperature must be a float > 0, got 0.0"),
        (dict(pos_ids=torch.tensor([0, 1, 10])), "0 <= id < V=10; got ids from 0 to 10"),
        (dict(neg_ids=torch.tensor([[0, -1]] * 3)), "got ids from -1 to 2"),
    ],
)
def test_bad_inputs_are_rejected_with_the_offending_value(overrides, message):
    args = dict(
        query=torch.randn(3, 16),
        pos_ids=torch.tensor([0, 1, 2]),
        neg_ids=torch.randint(0, 10, (3, 4)),
        table=torch.randn(10, 16),
        temperature=0.1,
    )
    args.update(overrides)
    temperature = args.pop("temperature")
    with pytest.raises(KernelInputError, match=message):
        sampled_softmax_loss(**args, temperature=temperature, impl="pytorch")


@pytest.mark.gpu
@pytest.mark.parametrize("case", EDGE_SOFTMAX_CASES, ids=["no-rows", "one-item", "shared-k128-d64", "rows-k128-d64"])
def test_gpu_bf16_edge_cases_match_reference(cuda_device, case):
    check_softmax_case(case, cuda_device, torch.bfloat16)


@pytest.mark.gpu
@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(case=softmax_cases())
def test_gpu_bf16_random_cases_match_reference(cuda_device, case):
    check_softmax_case(case, cuda_device, torch.bfloat16)
