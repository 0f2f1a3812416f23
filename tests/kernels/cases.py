"""Shared test cases for the kernels: Hypothesis strategies, input builders and the comparisons.

The same case runs three ways: the PyTorch reference against naive loops, the Triton kernels
through the interpreter in float32 (tests/kernels/interpreted_*.py, in a subprocess), and the
compiled Triton kernels in bfloat16 on a GPU (the `gpu` tests).

Tolerances, as max|actual - expected| / max|expected| per tensor (outputs and every gradient),
with `expected` the PyTorch reference in float32 on the same (upcast) inputs:

- float32 (interpreter): 1e-4. Measured ~1e-6; only summation order differs.
- bfloat16 (GPU): 5e-2, and the norm ratio ||actual - expected|| / ||expected|| <= 2e-2. The
  kernels round P and dS to bf16 before the tensor-core products, as flash attention does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 2e-2)}  # (max ratio, norm ratio)
# Timestamps are log-uniform in [1, 2^29) s, query times up to 2^28 s later: gaps from seconds
# to 17 years, so the tables' buckets are met from the first to the last, and one sequence
# spans less than 2^30 s. Both implementations bucket gaps exactly (integer boundaries), so
# any gap compares.
TIMESTAMP_SPAN = 2**29


def _log_uniform_seconds(count: int, span: int, gen: torch.Generator) -> torch.Tensor:
    """`count` int64 seconds in [1, span), log-uniform: every decade of seconds equally likely."""
    return torch.exp(torch.rand(count, generator=gen, dtype=torch.float64) * math.log(span)).long().clamp(1, span - 1)


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Scaled comparison (see module docstring); NaN or Inf never passes."""
    max_tol, norm_tol = TOLERANCE[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if expected.numel() == 0:
        return
    scale = expected.abs().max().item()
    if scale == 0.0:  # e.g. every negative an accidental hit: only rounding noise may remain
        assert actual.abs().max().item() <= 1e-5, f"{name}: expected zeros, got max {actual.abs().max().item():.3g}"
        return
    max_err = (actual - expected).abs().max().item() / scale
    norm_err = ((actual - expected).norm() / expected.norm()).item()
    assert max_err <= max_tol and norm_err <= norm_tol, (
        f"{name}: max error {max_err:.3g} (tol {max_tol}), norm error {norm_err:.3g} (tol {norm_tol}), "
        f"scale {scale:.3g}"
    )


# ----------------------------------------------------------------------------- HSTU attention


@dataclass(frozen=True)
class HstuCase:
    lengths: tuple[int, ...]
    max_seq_len: int
    num_targets: tuple[int, ...] | None
    heads: int
    dqk: int
    dv: int
    pos_buckets: int | None
    time_buckets: int | None
    normalize_by_length: bool
    sorted_timestamps: bool
    seed: int
    query_times: bool = False  # rows take their own query time (query_timestamps), later than their token's

    @property
    def alpha(self) -> float:
        return 1.0 / math.sqrt(self.dqk)


@st.composite
def hstu_cases(draw, max_batch: int = 8, max_len: int = 128) -> HstuCase:
    """Jagged batches with empty and length-1 sequences, candidates, biases, odd head dims."""
    batch = draw(st.integers(1, max_batch))
    max_seq_len = draw(st.integers(1, max_len))
    lengths = tuple(draw(st.lists(st.integers(0, max_seq_len), min_size=batch, max_size=batch)))
    num_targets = None
    if draw(st.booleans()):
        num_targets = tuple(draw(st.integers(0, n)) for n in lengths)
    return HstuCase(
        lengths=lengths,
        max_seq_len=max_seq_len,
        num_targets=num_targets,
        heads=draw(st.sampled_from([1, 2])),
        dqk=draw(st.sampled_from([16, 24, 32, 64])),
        dv=draw(st.sampled_from([16, 32, 48, 64])),
        # 1: every pair in the last bucket; 7: tiles mix both; 300: every pair in its own bucket.
        pos_buckets=draw(st.sampled_from([None, 1, 7, 300])),
        time_buckets=draw(st.sampled_from([None, 1, 6, 40])),
        normalize_by_length=draw(st.booleans()),
        sorted_timestamps=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        query_times=draw(st.booleans()),
    )


EDGE_HSTU_CASES = [
    # every sequence empty
    HstuCase((0, 0, 0), 4, None, 1, 16, 16, 7, 6, False, True, 1),
    # one token that is a candidate, one plain token
    HstuCase((1, 1), 1, (1, 0), 2, 16, 32, 7, 6, False, True, 2),
    # B = 8, N = 128, lengths off the block sizes, candidates, both tables, per-length norm
    HstuCase((128, 0, 1, 127, 65, 33, 100, 64), 128, (0, 0, 1, 5, 65, 3, 0, 64), 2, 64, 64, 300, 40, True, True, 3),
    # unsorted timestamps, positions that straddle the clamp, candidates mid-block
    HstuCase((97, 31), 100, (10, 31), 1, 32, 16, 7, 40, False, False, 4),
    # query times (the next event's time) on rows, candidates whose own term has a time gap
    HstuCase((70, 1, 45), 80, (0, 1, 9), 2, 16, 16, 300, 40, False, True, 5, query_times=True),
]
EDGE_HSTU_IDS = ["all-empty", "length-1", "b8-n128", "unsorted-ts", "query-times"]


def hstu_inputs(case: HstuCase, device: str, dtype: torch.dtype) -> dict:
    """Tensors for a case (leaf tensors with requires_grad), plus the upstream gradient."""
    gen = torch.Generator().manual_seed(case.seed)
    total = sum(case.lengths)
    offsets = torch.tensor([0, *torch.tensor(case.lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()

    timestamps = _log_uniform_seconds(total, TIMESTAMP_SPAN, gen)
    if case.sorted_timestamps:
        pieces = [timestamps[s:e].sort().values for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        timestamps = torch.cat(pieces) if pieces else timestamps
    query_timestamps = None
    if case.query_times:
        query_timestamps = timestamps + _log_uniform_seconds(total, TIMESTAMP_SPAN // 2, gen)
    args = dict(
        q=leaf(total, case.heads, case.dqk),
        k=leaf(total, case.heads, case.dqk),
        v=leaf(total, case.heads, case.dv),
        seq_offsets=offsets.to(device),
        max_seq_len=case.max_seq_len,
        alpha=case.alpha,
        num_targets=torch.tensor(case.num_targets, dtype=torch.int64, device=device) if case.num_targets else None,
        timestamps=timestamps.to(device) if case.time_buckets else None,
        query_timestamps=query_timestamps.to(device) if case.time_buckets and query_timestamps is not None else None,
        pos_bias=leaf(case.heads, case.pos_buckets, scale=0.5) if case.pos_buckets else None,
        time_bias=leaf(case.heads, case.time_buckets, scale=0.5) if case.time_buckets else None,
        normalize_by_length=case.normalize_by_length,
    )
    grad = (torch.randn(total, case.heads, case.dv, generator=gen)).to(device=device, dtype=dtype)
    return dict(args=args, grad=grad)


def _grads_of(args: dict) -> dict:
    names = ("q", "k", "v", "pos_bias", "time_bias")
    return {n: args[n] for n in names if isinstance(args.get(n), torch.Tensor) and args[n].requires_grad}


def run_hstu(args: dict, grad: torch.Tensor, impl: str) -> dict:
    """Output and gradients of every differentiable input, through the dispatcher."""
    from kernels.hstu_attention import hstu_attention

    leaves = _grads_of(args)
    for x in leaves.values():
        x.grad = None
    call = dict(args)
    q, k, v, offsets, max_seq_len = (call.pop(n) for n in ("q", "k", "v", "seq_offsets", "max_seq_len"))
    out = hstu_attention(q, k, v, offsets, max_seq_len, impl=impl, **call)
    out.backward(grad)
    result = {"out": out.detach()}
    result.update({f"d_{n}": x.grad if x.grad is not None else torch.zeros_like(x) for n, x in leaves.items()})
    return result


def upcast(inputs: dict) -> dict:
    """The same case in float32 (fresh leaves), for the reference oracle."""
    args = {}
    for name, x in inputs["args"].items():
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            args[name] = x.detach().float().requires_grad_()
        else:
            args[name] = x
    return dict(args=args, grad=inputs["grad"].float())


def check_hstu_case(case: HstuCase, device: str, dtype: torch.dtype) -> None:
    """Triton (impl='triton') against the float32 PyTorch reference: output and all gradients."""
    inputs = hstu_inputs(case, device, dtype)
    got = run_hstu(inputs["args"], inputs["grad"], "triton")
    ref_inputs = upcast(inputs)
    want = run_hstu(ref_inputs["args"], ref_inputs["grad"], "pytorch")
    assert got.keys() == want.keys()
    for name in want:
        assert_close(f"{name} ({case})", got[name].float(), want[name], dtype)


# ----------------------------------------------------------------------------- sampled softmax


@dataclass(frozen=True)
class SoftmaxCase:
    rows: int
    negatives: int
    dim: int
    vocab: int
    shared: bool
    temperature: float
    zero_row: bool  # one table row of zeros: the normalisation's eps branch
    seed: int


@st.composite
def softmax_cases(draw, max_rows: int = 128) -> SoftmaxCase:
    """Per-example and shared negatives, accidental hits, duplicates, odd K and D."""
    return SoftmaxCase(
        rows=draw(st.integers(0, max_rows)),
        negatives=draw(st.integers(1, 200)),
        dim=draw(st.sampled_from([16, 24, 64, 100])),
        vocab=draw(st.integers(1, 300)),
        shared=draw(st.booleans()),
        temperature=draw(st.sampled_from([0.05, 1.0])),
        zero_row=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


EDGE_SOFTMAX_CASES = [
    SoftmaxCase(0, 5, 16, 10, False, 0.1, False, 1),  # no rows
    SoftmaxCase(1, 1, 16, 1, False, 0.1, False, 2),  # one item: every negative is a hit
    SoftmaxCase(128, 128, 64, 300, True, 0.05, True, 3),  # the benchmark's K and D, shared
    SoftmaxCase(128, 128, 64, 300, False, 0.05, False, 4),
]


def softmax_inputs(case: SoftmaxCase, device: str, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(case.seed)
    table = torch.randn(case.vocab, case.dim, generator=gen)
    if case.zero_row:
        table[0] = 0.0
    query = torch.randn(case.rows, case.dim, generator=gen)
    pos_ids = torch.randint(0, case.vocab, (case.rows,), generator=gen)
    if case.shared:
        neg_ids = torch.randint(0, case.vocab, (case.negatives,), generator=gen).expand(case.rows, -1)
    else:
        neg_ids = torch.randint(0, case.vocab, (case.rows, case.negatives), generator=gen)
        neg_ids[:, 0] = pos_ids  # an accidental hit in every row
    return dict(
        query=query.to(device=device, dtype=dtype).requires_grad_(),
        pos_ids=pos_ids.to(device),
        neg_ids=neg_ids.to(device),
        table=table.to(device=device, dtype=dtype).requires_grad_(),
        temperature=case.temperature,
        grad=torch.randn(case.rows, generator=gen).to(device),
    )


def run_softmax(inputs: dict, impl: str) -> dict:
    """Loss and gradients through the dispatch (`impl` "triton" or "pytorch"), or through one
    PyTorch function directly: "reference" (the readable oracle) or "dense" (the CPU fast path)."""
    from kernels.pytorch.pt_sampled_softmax import pt_sampled_softmax_loss
    from kernels.pytorch.pt_sampled_softmax_dense import pt_sampled_softmax_loss_dense
    from kernels.sampled_softmax import sampled_softmax_loss

    query, table = inputs["query"], inputs["table"]
    query.grad = table.grad = None
    args = (query, inputs["pos_ids"], inputs["neg_ids"], table)
    if impl == "reference":
        loss = pt_sampled_softmax_loss(*args, temperature=inputs["temperature"])
    elif impl == "dense":
        loss = pt_sampled_softmax_loss_dense(*args, temperature=inputs["temperature"])
    else:
        loss = sampled_softmax_loss(*args, temperature=inputs["temperature"], impl=impl)
    loss.backward(inputs["grad"])
    return {
        "loss": loss.detach(),
        "d_query": query.grad if query.grad is not None else torch.zeros_like(query),
        "d_table": table.grad if table.grad is not None else torch.zeros_like(table),
    }


def check_softmax_case(case: SoftmaxCase, device: str, dtype: torch.dtype, impl: str = "triton") -> None:
    """`impl` (Triton, or the dense CPU path) against the float32 readable reference: loss and
    both gradients."""
    inputs = softmax_inputs(case, device, dtype)
    got = run_softmax(inputs, impl)
    ref = dict(
        inputs,
        query=inputs["query"].detach().float().requires_grad_(),
        table=inputs["table"].detach().float().requires_grad_(),
    )
    want = run_softmax(ref, "reference")
    for name in want:
        assert_close(f"{name} ({case})", got[name].float(), want[name], dtype)
