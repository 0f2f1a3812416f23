"""Time buckets of HSTU attention: the boundary table against the definition, and the Triton
kernel against the reference at every bucket edge (forward and the time table's gradient).

The definition (kernels/pytorch/pt_hstu_attention.py): bucket(gap) is the largest k < NT with
ln(max(gap, 1)) / 0.301 >= k. Here it is decided without logs or floats: e^(0.301 k) <= gap,
with e^(0.301 k) bounded by exact rational Taylor sums.

    python -m pytest tests/kernels/test_time_buckets.py -q          # reference + interpreter
    python -m pytest tests/kernels/test_time_buckets.py -m gpu -q   # the compiled kernel
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from kernels._dispatch import KernelInputError, triton_interpreted
from kernels.hstu_attention import MAX_TIME_SPAN_S, hstu_attention
from kernels.pytorch.pt_hstu_attention import INT64_MAX, time_bucket, time_bucket_boundaries

NUM_BUCKETS = (64, 100)  # the model's default, and one whose last edges pass the int32 gaps
EDGE_REACH = 4  # gaps boundary[k] - 4 .. boundary[k] + 4 for every k


@functools.cache
def _exp_bounds(k: int) -> tuple[Fraction, Fraction]:
    """Rational lower and upper bounds of e^(0.301 k), 1e-40 apart relative (Taylor series)."""
    x = Fraction(301 * k, 1000)
    total, term, n = Fraction(0), Fraction(1), 0
    while True:
        total += term
        n += 1
        term = term * x / n
        # past n > 2x the terms at least halve, so the tail is at most twice the next term
        if n > 2 * x and term * 2 <= total * Fraction(1, 10**40):
            return total, total + 2 * term


def _edge_at_most(k: int, gap: int) -> bool:
    """Whether e^(0.301 k) <= gap, i.e. ln(gap) / 0.301 >= k, decided exactly."""
    lo, hi = _exp_bounds(k)
    if hi <= gap:
        return True
    if lo > gap:
        return False
    raise AssertionError(f"e^(0.301 * {k}) lies within 1e-40 of the integer {gap}: widen _exp_bounds")


def definition_bucket(gap: int, num_buckets: int) -> int:
    """The largest k in [0, NT - 1] with ln(max(|gap|, 1)) / 0.301 >= k, one gap at a time."""
    gap = max(abs(gap), 1)
    bucket = 0
    while bucket + 1 < num_buckets and _edge_at_most(bucket + 1, gap):
        bucket += 1
    return bucket


def edge_gaps(num_buckets: int, reach: int = EDGE_REACH, largest: int = INT64_MAX) -> list[int]:
    """Every gap within `reach` of a bucket edge, in [0, largest], sorted, each once."""
    gaps = set()
    for edge in time_bucket_boundaries(num_buckets).tolist():
        gaps.update(g for g in range(edge - reach, edge + reach + 1) if 0 <= g <= largest)
    return sorted(gaps)


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("num_buckets", NUM_BUCKETS)
def test_boundaries_are_the_first_gap_of_each_bucket(num_buckets):
    bounds = time_bucket_boundaries(num_buckets)
    assert bounds.dtype == torch.int64 and tuple(bounds.shape) == (num_buckets,)
    assert bounds[0] == 1
    for k, edge in enumerate(bounds.tolist()[1:], start=1):
        assert _edge_at_most(k, edge), f"boundary[{k}] = {edge} is below e^(0.301 k)"
        assert not _edge_at_most(k, edge - 1), f"boundary[{k}] = {edge}: {edge - 1} is already in bucket {k}"


def test_boundaries_past_int64_are_capped_and_the_table_is_cached():
    bounds = time_bucket_boundaries(150)
    assert bounds[145] < INT64_MAX and (bounds[146:] == INT64_MAX).all()  # e^(0.301 * 146) > 2^63
    assert bool((bounds[1:] >= bounds[:-1]).all())
    assert time_bucket_boundaries(150) is bounds
    assert time_bucket_boundaries(150, "cpu") is bounds


@pytest.mark.parametrize("num_buckets", [0, -3, 2.5, True])
def test_a_bucket_count_below_one_is_rejected(num_buckets):
    with pytest.raises(KernelInputError, match=f"num_buckets must be an int >= 1, got {num_buckets!r}"):
        time_bucket_boundaries(num_buckets)


@pytest.mark.parametrize("num_buckets", NUM_BUCKETS)
def test_reference_buckets_match_the_definition_at_every_edge(num_buckets):
    gaps = edge_gaps(num_buckets)
    signed = torch.tensor(gaps + [-g for g in gaps])
    got = time_bucket(signed, num_buckets).tolist()
    want = [definition_bucket(g, num_buckets) for g in signed.tolist()]
    wrong = [(g, a, b) for g, a, b in zip(signed.tolist(), got, want) if a != b]
    assert not wrong, f"(gap, reference, definition), first of {len(wrong)}: {wrong[:10]}"
    small = [g for g in gaps if g <= 2**31 - 1]  # int32 gaps, as the kernel sees them, bucket alike
    assert time_bucket(torch.tensor(small, dtype=torch.int32), num_buckets).tolist() == want[: len(small)]


# ----------------------------------------------------------------------------- the kernel


GAPS_PER_CALL = 255  # 256-token sequences: the kernel's untuned smallest tile, a small dense reference


def check_kernel_buckets(num_buckets: int, device: str, gaps: list[int]) -> None:
    """The kernel's bucket of every gap in `gaps` (each in [0, 2^30)) is the reference's."""
    for first in range(0, len(gaps), GAPS_PER_CALL):
        _check_kernel_buckets(num_buckets, device, gaps[first : first + GAPS_PER_CALL])


def _check_kernel_buckets(num_buckets: int, device: str, gaps: list[int]) -> None:
    """One call of each implementation on these gaps: the same bucket for every one.

    One query per gap meets one key at that gap, in both directions: sequence 0 has its key at
    time 0 and queries at +gap, sequence 1 its key at 2^30 - 1 and queries at -gap. Every
    query but the first is a candidate whose own token sits at the key's time, so the
    candidate's own (diagonal) term meets the same gap. q = k = 0 and time_bias[0, k] = k leave
    s = bucket, so out = 2 silu(bucket) / n names the bucket the kernel chose; the time
    table's gradient then sums dS per bucket, in the backward's tile loop and diagonal term.
    """
    length = len(gaps) + 1
    starts = (0, MAX_TIME_SPAN_S)
    timestamps = torch.tensor([start for start in starts for _ in range(length)])
    query = torch.tensor(
        [t for start, sign in zip(starts, (1, -1)) for t in [start] + [start + sign * g for g in gaps]]
    )
    offsets = torch.tensor([0, length, 2 * length])
    num_targets = torch.tensor([length - 1, length - 1])
    q = torch.zeros(2 * length, 1, 16)
    v = torch.ones(2 * length, 1, 16)
    grad = torch.rand(2 * length, 1, 16, generator=torch.Generator().manual_seed(num_buckets)) + 0.5
    table = torch.arange(num_buckets, dtype=torch.float32)[None]

    results = {}
    for impl in ("triton", "pytorch"):
        time_bias = table.to(device, copy=True).requires_grad_()  # a fresh leaf per implementation
        out = hstu_attention(
            q.to(device),
            q.to(device),
            v.to(device),
            offsets.to(device),
            length,
            alpha=1.0,
            num_targets=num_targets.to(device),
            timestamps=timestamps.to(device),
            time_bias=time_bias,
            query_timestamps=query.to(device),
            impl=impl,
        )
        out.backward(grad.to(device))
        results[impl] = (out.detach().cpu(), time_bias.grad.cpu())

    want_bucket = time_bucket(query - timestamps, num_buckets)
    # out = 2 silu(bucket) / n: the nearest silu(k) of the table names the bucket
    silu_table = F.silu(table[0].double())
    got_bucket = (results["triton"][0][:, 0, 0].double() * length / 2 - silu_table[:, None]).abs().argmin(0)
    wrong = (got_bucket != want_bucket).nonzero().squeeze(1).tolist()
    gap_of = (query - timestamps).tolist()
    assert not wrong, (
        f"(gap, kernel, reference), first of {len(wrong)}: "
        f"{[(gap_of[i], int(got_bucket[i]), int(want_bucket[i])) for i in wrong[:10]]}"
    )
    torch.testing.assert_close(results["triton"][0], results["pytorch"][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results["triton"][1], results["pytorch"][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_buckets", NUM_BUCKETS)
def test_interpreted_kernel_picks_the_reference_bucket_at_every_edge(num_buckets):
    """Run by `test_kernel_buckets_in_the_interpreter` in its own TRITON_INTERPRET=1 process."""
    if not triton_interpreted():
        pytest.skip(
            "needs TRITON_INTERPRET=1 before triton is imported: test_kernel_buckets_in_the_interpreter runs it"
        )
    from kernels.triton.triton_hstu_attention import INT32_MAX, _time_bounds

    # the kernel's table is the reference's, capped to int32, with a sentinel at [NT]
    kernel_bounds = _time_bounds(num_buckets, torch.device("cpu"))
    assert kernel_bounds.dtype == torch.int32 and kernel_bounds[num_buckets] == INT32_MAX
    assert kernel_bounds[:-1].tolist() == time_bucket_boundaries(num_buckets).clamp(max=INT32_MAX).tolist()
    check_kernel_buckets(num_buckets, "cpu", edge_gaps(num_buckets, largest=MAX_TIME_SPAN_S) + [MAX_TIME_SPAN_S])


def test_kernel_buckets_in_the_interpreter(interpreted_pytest):
    """The Triton kernel through its interpreter (tl.log2) at every edge of NT = 64 and 100."""
    interpreted_pytest(
        "tests/kernels/test_time_buckets.py::test_interpreted_kernel_picks_the_reference_bucket_at_every_edge"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("num_buckets", NUM_BUCKETS)
def test_gpu_kernel_picks_the_reference_bucket(cuda_device, num_buckets):
    """The compiled kernel (hardware lg2.approx): 64 gaps either side of every edge, and 50,000
    log-uniform gaps up to 2^30 s."""
    gen = torch.Generator().manual_seed(num_buckets)
    spread = torch.exp(torch.rand(50_000, generator=gen, dtype=torch.float64) * math.log(MAX_TIME_SPAN_S))
    gaps = sorted(set(edge_gaps(num_buckets, reach=64, largest=MAX_TIME_SPAN_S)) | set(spread.long().tolist()))
    check_kernel_buckets(num_buckets, cuda_device, gaps)
