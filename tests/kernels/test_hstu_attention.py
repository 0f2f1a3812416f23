"""kernels.hstu_attention: the reference against naive loops, the dispatcher, input errors, the
Triton kernel through the interpreter (subprocess, float32) and compiled on a GPU (bf16).

    python -m pytest tests/kernels/test_hstu_attention.py -q          # CPU: ~2 min
    python -m pytest tests/kernels -m gpu -q                           # GPU only
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from kernels import _dispatch
from kernels._dispatch import KernelImplError, KernelInputError, KernelUnavailableError, triton_interpreted
from kernels.hstu_attention import hstu_attention
from kernels.pytorch.pt_hstu_attention import pt_hstu_attention, relative_position_bucket, time_bucket
from tests.kernels.cases import EDGE_HSTU_CASES, EDGE_HSTU_IDS, check_hstu_case, hstu_cases, hstu_inputs


def naive_hstu(
    q, k, v, offsets, max_seq_len, alpha, num_targets, timestamps, pos_bias, time_bias, normalize, query_timestamps=None
):
    """The formula, one pair at a time, in float64: the oracle for the reference."""
    query_timestamps = timestamps if query_timestamps is None else query_timestamps
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    for b in range(len(offsets) - 1):
        start, length = int(offsets[b]), int(offsets[b + 1] - offsets[b])
        hist = length - (int(num_targets[b]) if num_targets is not None else 0)
        n = length if normalize else max_seq_len
        for h in range(q.shape[1]):
            for i in range(length):
                for j in range(length):
                    if not (j <= i and (j < hist or j == i)):
                        continue
                    x = alpha * float(q[start + i, h].double() @ k[start + j, h].double())
                    if pos_bias is not None:
                        x += float(pos_bias[h, min(min(i, hist) - min(j, hist), pos_bias.shape[1] - 1)])
                    if time_bias is not None:
                        gap = max(abs(int(query_timestamps[start + i]) - int(timestamps[start + j])), 1)
                        x += float(time_bias[h, min(max(math.floor(math.log(gap) / 0.301), 0), time_bias.shape[1] - 1)])
                    out[start + i, h] += x / (1.0 + math.exp(-x)) * v[start + j, h].double() / n
    return out


@pytest.mark.parametrize("targets", [None, (0, 2, 3, 1)])
@pytest.mark.parametrize("bias", ["none", "pos", "time", "both", "time-query"])
@pytest.mark.parametrize("normalize", [False, True])
def test_reference_matches_naive_loops(targets, bias, normalize):
    torch.manual_seed(0)
    lengths = [5, 0, 3, 1]
    offsets = torch.tensor([0, 5, 5, 8, 9])
    q, k, v = (
        torch.randn(9, 2, 8, dtype=torch.float64),
        torch.randn(9, 2, 8, dtype=torch.float64),
        torch.randn(9, 2, 4, dtype=torch.float64),
    )
    num_targets = torch.tensor(targets) if targets else None
    timestamps = torch.tensor([0, 1, 5, 100, 4000, 7, 7, 9000, 3])
    pos_bias = torch.randn(2, 3, dtype=torch.float64) if bias in ("pos", "both") else None
    time_bias = torch.randn(2, 30, dtype=torch.float64) if bias in ("time", "both", "time-query") else None
    # query times: each row's time gaps are measured from the next token's time (the request time)
    query = torch.tensor([1, 5, 100, 4000, 4100, 7, 9000, 9000, 50]) if bias == "time-query" else None
    args = (q, k, v, offsets, max(lengths) + 1)
    kwargs = dict(
        alpha=0.4,
        num_targets=num_targets,
        timestamps=timestamps,
        pos_bias=pos_bias,
        time_bias=time_bias,
        normalize_by_length=normalize,
        query_timestamps=query,
    )
    got = pt_hstu_attention(*args, **kwargs)
    want = naive_hstu(*args, 0.4, num_targets, timestamps, pos_bias, time_bias, normalize, query)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("targets", [None, (0, 2, 3, 1)])
def test_reference_gradients_match_finite_differences(targets):
    """gradcheck in float64: q, k, v and both bias tables (their backward is a per-head bincount)."""
    torch.manual_seed(1)
    offsets = torch.tensor([0, 5, 5, 8, 9])
    q, k, v = (torch.randn(9, 2, d, dtype=torch.float64, requires_grad=True) for d in (4, 4, 3))
    pos_bias = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    time_bias = torch.randn(2, 30, dtype=torch.float64, requires_grad=True)
    timestamps = torch.tensor([0, 1, 5, 100, 4000, 7, 7, 9000, 3])
    num_targets = torch.tensor(targets) if targets else None

    def attention(q, k, v, pos_bias, time_bias):
        return pt_hstu_attention(
            q,
            k,
            v,
            offsets,
            6,
            alpha=0.4,
            num_targets=num_targets,
            timestamps=timestamps,
            pos_bias=pos_bias,
            time_bias=time_bias,
        )

    assert torch.autograd.gradcheck(attention, (q, k, v, pos_bias, time_bias))


def test_bucket_functions():
    gaps = torch.tensor([0, 1, 2, 3, -60, 3600, 86400, 10**9])
    # floor(ln(gap) / 0.301): ln 2 = 0.69 -> 2, ln 3 = 1.10 -> 3, ln 60 = 4.09 -> 13, ...
    assert time_bucket(gaps, 64).tolist() == [0, 0, 2, 3, 13, 27, 37, 63]
    assert time_bucket(gaps, 10).tolist() == [0, 0, 2, 3, 9, 9, 9, 9]
    # ln(417,901) / 0.301 = 42.9999995: a float32 log says 43; the integer boundaries do not
    assert time_bucket(torch.tensor([417_901, 417_902]), 64).tolist() == [42, 43]
    assert relative_position_bucket(torch.tensor([0, 1, 5, 99]), 6).tolist() == [0, 1, 5, 5]


def test_candidate_order_does_not_change_their_outputs():
    """Candidates see the history and themselves only, and share one position."""
    torch.manual_seed(1)
    q, k, v = torch.randn(10, 1, 8), torch.randn(10, 1, 8), torch.randn(10, 1, 8)
    timestamps = torch.arange(10) * 1000
    kwargs = dict(
        alpha=0.3,
        num_targets=torch.tensor([4]),
        timestamps=timestamps,
        pos_bias=torch.randn(1, 12),
        time_bias=torch.randn(1, 40),
    )
    out = hstu_attention(q, k, v, torch.tensor([0, 10]), 10, **kwargs)
    perm = torch.tensor([0, 1, 2, 3, 4, 5, 9, 7, 6, 8])  # shuffle the last four tokens
    out_perm = hstu_attention(
        q[perm], k[perm], v[perm], torch.tensor([0, 10]), 10, **dict(kwargs, timestamps=timestamps[perm])
    )
    torch.testing.assert_close(out_perm, out[perm])


def test_interpreted_triton_kernel_matches_reference(interpreted_pytest):
    """Forward and every gradient (q, k, v, both tables) in float32, Hypothesis shapes; ~2 min."""
    interpreted_pytest("tests/kernels/interpreted_hstu_attention.py")


# ----------------------------------------------------------------------------- dispatch


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(_dispatch, "_logged", set())
    monkeypatch.delenv(_dispatch.IMPL_ENV, raising=False)


def _tiny():
    return torch.randn(3, 1, 16), torch.randn(3, 1, 16), torch.randn(3, 1, 16), torch.tensor([0, 3])


def test_cpu_tensors_use_the_reference_and_log_it_once(fresh_log, caplog):
    q, k, v, offsets = _tiny()
    with caplog.at_level(logging.INFO, logger="kernels"):
        out = hstu_attention(q, k, v, offsets, 3, alpha=0.5)
        hstu_attention(q, k, v, offsets, 3, alpha=0.5)
    torch.testing.assert_close(out, pt_hstu_attention(q, k, v, offsets, 3, alpha=0.5), atol=0, rtol=0)
    messages = [r.getMessage() for r in caplog.records if r.name == "kernels"]
    assert messages == ["hstu_attention: using the pytorch implementation (auto for cpu tensors)"]


def test_environment_forces_an_implementation(fresh_log, monkeypatch, caplog):
    q, k, v, offsets = _tiny()
    monkeypatch.setenv("HSTU_KERNEL_IMPL", "pytorch")
    with caplog.at_level(logging.INFO, logger="kernels"):
        hstu_attention(q, k, v, offsets, 3, alpha=0.5)
    assert "forced by HSTU_KERNEL_IMPL='pytorch'" in caplog.text
    monkeypatch.setenv("HSTU_KERNEL_IMPL", "cuda-please")
    with pytest.raises(KernelImplError, match="HSTU_KERNEL_IMPL='cuda-please'"):
        hstu_attention(q, k, v, offsets, 3, alpha=0.5)
    with pytest.raises(KernelImplError, match="impl='fast'"):
        hstu_attention(q, k, v, offsets, 3, alpha=0.5, impl="fast")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(fresh_log):
    if triton_interpreted():
        pytest.skip("this process runs Triton in its interpreter, where triton on CPU tensors is allowed")
    q, k, v, offsets = _tiny()
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        hstu_attention(q, k, v, offsets, 3, alpha=0.5, impl="triton")


def _bad(**overrides):
    args = dict(
        q=torch.randn(5, 2, 16),
        k=torch.randn(5, 2, 16),
        v=torch.randn(5, 2, 8),
        seq_offsets=torch.tensor([0, 2, 5]),
        max_seq_len=4,
        alpha=0.5,
        num_targets=None,
        timestamps=None,
        pos_bias=None,
        time_bias=None,
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(q=torch.randn(5, 16)), "q must be a \\[T, H, D\\] tensor"),
        (dict(k=torch.randn(5, 2, 8)), "k must have q's shape"),
        (dict(v=torch.randn(4, 2, 8)), "v must be \\[T, H, Dv\\]"),
        (dict(v=torch.randn(5, 2, 8, dtype=torch.float64)), "q, k, v must share a dtype"),
        (dict(seq_offsets=torch.tensor([0.0, 5.0])), "seq_offsets must be int64"),
        (dict(max_seq_len=-1), "max_seq_len must be an int >= 0, got -1"),
        (dict(num_targets=torch.tensor([1])), "num_targets must have shape \\(2,\\)"),
        (dict(pos_bias=torch.randn(3, 4)), "pos_bias must be \\[H=2, num_buckets >= 1\\]"),
        (dict(time_bias=torch.randn(2, 4)), "time_bias needs timestamps"),
        (dict(timestamps=torch.randn(5), time_bias=torch.randn(2, 4)), "timestamps must be an integer tensor"),
        (dict(query_timestamps=torch.arange(5)), "query_timestamps needs timestamps"),
        (
            dict(timestamps=torch.arange(5), query_timestamps=torch.arange(4)),
            "query_timestamps must have shape \\(5,\\)",
        ),
        (
            dict(timestamps=torch.arange(5), query_timestamps=torch.rand(5)),
            "query_timestamps must be an integer tensor",
        ),
        (dict(seq_offsets=torch.tensor([0, 2, 4])), "seq_offsets must start at 0 and end at T=5"),
        (
            dict(seq_offsets=torch.tensor([0, 3, 2, 5])),
            "non-decreasing, got seq_offsets\\[1\\]=3 > seq_offsets\\[2\\]=2",
        ),
        (dict(max_seq_len=2), "a sequence has 3 tokens \\(sequence 1\\), more than max_seq_len=2"),
        (dict(num_targets=torch.tensor([0, 4])), "got num_targets\\[1\\]=4 for a sequence of 3 tokens"),
    ],
)
def test_bad_inputs_are_rejected_with_the_offending_value(overrides, message):
    args = _bad(**overrides)
    q, k, v, offsets, max_seq_len = (args.pop(n) for n in ("q", "k", "v", "seq_offsets", "max_seq_len"))
    with pytest.raises(KernelInputError, match=message):
        hstu_attention(q, k, v, offsets, max_seq_len, impl="pytorch", **args)


# ----------------------------------------------------------------------------- GPU, bf16


@pytest.mark.gpu
@pytest.mark.parametrize("case", EDGE_HSTU_CASES, ids=EDGE_HSTU_IDS)
def test_gpu_bf16_edge_cases_match_reference(cuda_device, case):
    check_hstu_case(case, cuda_device, torch.bfloat16)


@pytest.mark.gpu
@settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(case=hstu_cases())
def test_gpu_bf16_random_cases_match_reference(cuda_device, case):
    check_hstu_case(case, cuda_device, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_float32_matches_reference(cuda_device):
    check_hstu_case(EDGE_HSTU_CASES[2], cuda_device, torch.float32)


@pytest.mark.gpu
def test_gpu_long_sequences_match_reference(cuda_device):
    """Past the short-sequence config: the autotuned tiles, 1,000+ tokens, every bias path."""
    from tests.kernels.cases import HstuCase

    case = HstuCase((1500, 700, 1), 1500, (16, 0, 1), 2, 64, 64, 600, 40, False, True, 7)
    check_hstu_case(case, cuda_device, torch.bfloat16)
    inputs = hstu_inputs(case, cuda_device, torch.bfloat16)
    assert inputs["args"]["q"].is_cuda


def test_short_sequences_skip_autotuning():
    """Up to 256 tokens the smallest tile is taken without timing every config."""
    from kernels.triton import triton_hstu_attention as mod

    if mod.INTERPRETED:
        pytest.skip("the interpreter has a single config")
    configs = mod._fwd_configs()
    assert len(configs) > 1
    short = mod._prune_short(configs, {}, AUTOTUNE_N=128)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in short] == [(64, 32)]
    assert mod._prune_short(configs, {}, AUTOTUNE_N=512) == configs
    assert all(c.kwargs["BLOCK_N"] <= c.kwargs["BLOCK_M"] for c in mod._bwd_configs())


def test_timestamps_spanning_34_years_are_rejected():
    q = k = v = torch.randn(3, 1, 16)
    timestamps = torch.tensor([0, 1_700_000_000, 1_700_000_060])  # a candidate stamped 0
    with pytest.raises(KernelInputError, match="span 1700000060 s"):
        hstu_attention(q, k, v, torch.tensor([0, 3]), 3, alpha=0.5, timestamps=timestamps, time_bias=torch.zeros(1, 8))
    ok = torch.tensor([1_700_000_000, 1_700_000_001, 1_700_000_060])
    hstu_attention(q, k, v, torch.tensor([0, 3]), 3, alpha=0.5, timestamps=ok, time_bias=torch.zeros(1, 8))
    with pytest.raises(KernelInputError, match="span 1700000060 s"):  # query times count too
        hstu_attention(
            q,
            k,
            v,
            torch.tensor([0, 3]),
            3,
            alpha=0.5,
            timestamps=ok,
            time_bias=torch.zeros(1, 8),
            query_timestamps=torch.tensor([0, 1_700_000_001, 1_700_000_060]),
        )
