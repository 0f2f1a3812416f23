"""Benchmarks of the kernels/: HSTU attention and the sampled-softmax loss.

On CUDA, in bf16 (the default when a GPU is present):

- jagged HSTU attention, Triton vs the PyTorch reference vs
  `F.scaled_dot_product_attention` with the flash backend (softmax, causal) on the same batch
  padded to [B, H, N, D]; forward and forward+backward; N from 512 to 8,192 at a fixed token
  budget B * N; jagged lengths at 50% and 90% sparsity;
- the sampled-softmax loss, Triton vs reference: time and peak memory (forward+backward).

On the CPU: the PyTorch reference against SDPA's math backend, as ratios.

Sparsity s is the expected fraction of the padded [B, N] positions that hold no token: each
length is drawn uniformly from [1, 2 (1 - s) N] (mean (1 - s) N), seeded. The bias tables are
on by default (relative positions with one bucket per position up to N, the worst case for
the kernel's backward; 64 log-time buckets over timestamps with exponential gaps of mean one
hour), and the kernel's HSTU mask is causal with no candidates, like SDPA's.

Every figure is one JSON line on stdout; the table, progress and the plot path go to stderr.

    python -m benchmarks.kernels                              # all figures, a few minutes on an H100
    python -m benchmarks.kernels --seq-lens 512,2048 --skip-loss
    python -m benchmarks.kernels --device cpu                 # reference vs SDPA-math ratios
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from config.paths import state_dir
from kernels.hstu_attention import hstu_attention
from kernels.sampled_softmax import sampled_softmax_loss


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit(metric: str, value, unit: str, **context) -> None:
    print(json.dumps({"metric": metric, "value": value, "unit": unit, **context}), flush=True)


@dataclass(frozen=True)
class Setup:
    device: str
    dtype: torch.dtype
    heads: int
    dim: int
    token_budget: int
    pos_buckets: int | None  # None: no position table; 0: one bucket per position up to N
    time_buckets: int | None
    seed: int


def jagged_batch(setup: Setup, max_seq_len: int, sparsity: float) -> dict:
    """Inputs for one benchmark point: jagged q/k/v/biases and the padded copy SDPA sees."""
    gen = torch.Generator().manual_seed(setup.seed + max_seq_len)
    batch = max(1, setup.token_budget // max_seq_len)
    high = max(1, min(max_seq_len, round(2 * (1 - sparsity) * max_seq_len)))
    lengths = torch.randint(1, high + 1, (batch,), generator=gen)
    offsets = torch.zeros(batch + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    total = int(offsets[-1])
    dev, dt = setup.device, setup.dtype

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dev, dt).requires_grad_()

    gaps = torch.distributions.Exponential(1 / 3600.0).sample((total,)).long()
    timestamps = gaps.cumsum(0)  # sorted within each sequence (and across, which is harmless)
    pos_buckets = max_seq_len if setup.pos_buckets == 0 else setup.pos_buckets
    inputs = dict(
        q=leaf(total, setup.heads, setup.dim),
        k=leaf(total, setup.heads, setup.dim),
        v=leaf(total, setup.heads, setup.dim),
        seq_offsets=offsets.to(dev),
        max_seq_len=max_seq_len,
        timestamps=timestamps.to(dev) if setup.time_buckets else None,
        pos_bias=leaf(setup.heads, pos_buckets, scale=0.1) if pos_buckets else None,
        time_bias=leaf(setup.heads, setup.time_buckets, scale=0.1) if setup.time_buckets else None,
    )
    padded = torch.randn(3, batch, setup.heads, max_seq_len, setup.dim, generator=gen).to(dev, dt)
    return dict(
        inputs=inputs,
        grad=torch.randn(total, setup.heads, setup.dim, generator=gen).to(dev, dt),
        sdpa=[padded[i].clone().requires_grad_() for i in range(3)],
        sdpa_grad=torch.randn(batch, setup.heads, max_seq_len, setup.dim, generator=gen).to(dev, dt),
        batch=batch,
        lengths=lengths,
        pairs=int((lengths * (lengths + 1) // 2).sum()),
        realized_sparsity=1.0 - total / (batch * max_seq_len),
    )


def hstu_call(point: dict, impl: str, backward: bool):
    a = point["inputs"]
    leaves = [x for x in (a["q"], a["k"], a["v"], a["pos_bias"], a["time_bias"]) if x is not None]

    def run():
        out = hstu_attention(
            a["q"],
            a["k"],
            a["v"],
            a["seq_offsets"],
            a["max_seq_len"],
            alpha=1.0 / math.sqrt(a["q"].shape[-1]),
            timestamps=a["timestamps"],
            pos_bias=a["pos_bias"],
            time_bias=a["time_bias"],
            impl=impl,
            validate=False,
        )
        if backward:
            out.backward(point["grad"])
        return out

    return run, leaves


def sdpa_call(point: dict, backend, backward: bool):
    q, k, v = point["sdpa"]

    def run():
        with torch.nn.attention.sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if backward:
            out.backward(point["sdpa_grad"])
        return out

    return run, [q, k, v]


def time_ms(fn, leaves, device: str, *, slow: bool = False) -> float | None:
    """Median milliseconds; None when it runs out of memory.

    CUDA: triton.testing.do_bench (CUDA events, median), or for `slow` calls (the dense
    reference, up to seconds each) one warm-up and the median of three synchronized runs.
    """
    try:
        if device == "cuda" and not slow:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=150, grad_to_none=leaves, return_mode="median"))
        times = []
        for i in range(4):
            for x in leaves:
                x.grad = None
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call warms up
                times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]
    except torch.OutOfMemoryError:
        for x in leaves:
            x.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
        return None


def check_point(point: dict) -> dict:
    """Triton vs reference on one benchmark point: ||a - b|| / ||b|| of the output and grads."""
    errors = {}
    results = {}
    for impl in ("triton", "pytorch"):
        run, leaves = hstu_call(point, impl, backward=True)
        for x in leaves:
            x.grad = None
        out = run()
        results[impl] = [out.detach().float()] + [x.grad.detach().float() for x in leaves]
    a = point["inputs"]
    names = ["out"] + [
        name
        for name, x in (
            ("d_q", a["q"]),
            ("d_k", a["k"]),
            ("d_v", a["v"]),
            ("d_pos_bias", a["pos_bias"]),
            ("d_time_bias", a["time_bias"]),
        )
        if x is not None
    ]
    for name, got, want in zip(names, results["triton"], results["pytorch"]):
        errors[name] = float((got - want).norm() / want.norm().clamp_min(1e-30))
    return errors


def bias_label(setup: Setup) -> str:
    parts = []
    if setup.pos_buckets is not None:
        parts.append(f"pos[{'N' if setup.pos_buckets == 0 else setup.pos_buckets}]")
    if setup.time_buckets:
        parts.append(f"time[{setup.time_buckets}]")
    return "+".join(parts) or "none"


def bench_attention(
    setup: Setup,
    seq_lens: list[int],
    sparsities: list[float],
    context: dict,
    *,
    impls: list[str] | None = None,
    reference_bwd_max_n: int = 512,
    sdpa_times: dict | None = None,
) -> list[dict]:
    """Time every (N, sparsity) point; `sdpa_times` lends SDPA timings measured in an earlier sweep."""
    rows = []
    cuda = setup.device == "cuda"
    flash = torch.nn.attention.SDPBackend.FLASH_ATTENTION if cuda else torch.nn.attention.SDPBackend.MATH
    sdpa_name = "sdpa_flash" if cuda else "sdpa_math"
    impls = impls or (["triton", "pytorch", sdpa_name] if cuda else ["pytorch", sdpa_name])
    bias = bias_label(setup)
    for sparsity in sparsities:
        for n in seq_lens:
            point = jagged_batch(setup, n, sparsity)
            if cuda and n == min(seq_lens) and sparsity == sparsities[0] and "pytorch" in impls:
                for name, err in check_point(point).items():
                    emit(
                        "hstu_triton_vs_reference_rel_error",
                        err,
                        "ratio",
                        tensor=name,
                        max_seq_len=n,
                        sparsity=sparsity,
                        bias=bias,
                        **context,
                    )
            base = dict(
                max_seq_len=n,
                sparsity=sparsity,
                realized_sparsity=round(point["realized_sparsity"], 4),
                batch=point["batch"],
                heads=setup.heads,
                dim=setup.dim,
                bias=bias,
                **context,
            )
            jagged_flops = 4.0 * point["pairs"] * setup.heads * setup.dim  # QK^T and PV, causal pairs only
            padded_flops = 4.0 * point["batch"] * n * (n + 1) / 2 * setup.heads * setup.dim
            row = dict(n=n, sparsity=sparsity)
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                flop_factor = 3.5 if backward else 1.0  # backward = 2.5x forward, the flash-attention convention
                for impl in impls:
                    if impl.startswith("sdpa"):
                        fn, leaves = sdpa_call(point, flash, backward)
                        flops = padded_flops * flop_factor
                    else:
                        fn, leaves = hstu_call(point, impl, backward)
                        flops = jagged_flops * flop_factor
                    if cuda and impl == "pytorch" and backward and n > reference_bwd_max_n:
                        emit(
                            "hstu_attention_not_timed",
                            1,
                            "point",
                            impl=impl,
                            mode=mode,
                            reason="the dense reference's backward takes seconds per call; "
                            f"timed up to N={reference_bwd_max_n}",
                            **base,
                        )
                        row[(impl, mode)] = None
                        continue
                    try:
                        ms = time_ms(fn, leaves, setup.device, slow=impl == "pytorch")
                    except Exception as exc:  # report and go on: one failing implementation must not hide the others
                        emit(
                            "hstu_attention_not_timed", 1, "point", impl=impl, mode=mode, reason=repr(exc)[:500], **base
                        )
                        log(f"  N={n:5d} s={sparsity:.1f} {mode:7s} {impl:12s} FAILED {exc!r}"[:300])
                        row[(impl, mode)] = None
                        continue
                    row[(impl, mode)] = ms
                    if ms is None:
                        emit(
                            "hstu_attention_not_timed", 1, "point", impl=impl, mode=mode, reason="out of memory", **base
                        )
                    else:
                        emit("hstu_attention_time", ms, "ms", impl=impl, mode=mode, **base)
                        row[("tflops", impl, mode)] = flops / ms / 1e9
                        emit(
                            "hstu_attention_throughput",
                            flops / ms / 1e9,
                            "TFLOP/s",
                            impl=impl,
                            mode=mode,
                            flops_counted="padded causal" if impl.startswith("sdpa") else "jagged causal",
                            **base,
                        )
                    log(f"  N={n:5d} s={sparsity:.1f} {mode:7s} {impl:12s} {'OOM' if ms is None else f'{ms:9.3f} ms'}")
                if cuda:
                    torch.cuda.empty_cache()
                if sdpa_times is not None and (n, sparsity, mode) in sdpa_times:
                    row[(sdpa_name, mode)] = sdpa_times[(n, sparsity, mode)]
                base_impl = "triton" if cuda else "pytorch"
                for other in dict.fromkeys(impls + ([sdpa_name] if sdpa_times is not None else [])):
                    if other == base_impl:
                        continue
                    mine, theirs = row.get((base_impl, mode)), row.get((other, mode))
                    ratio = theirs / mine if mine and theirs else None
                    row[("ratio", other, mode)] = ratio
                    emit("hstu_attention_speedup", ratio, "x", impl=base_impl, versus=other, mode=mode, **base)
            rows.append(row)
            del point
    return rows


def print_table(rows: list[dict], cuda: bool) -> None:
    """Times, speedups of the base implementation and TFLOP/s (jagged work for HSTU, padded for SDPA)."""
    others = ["sdpa_flash", "pytorch"] if cuda else ["sdpa_math"]
    base = "triton" if cuda else "pytorch"

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    header = f"{'N':>6} {'sparsity':>8} {'mode':>8} {base + ' ms':>12} {'TFLOP/s':>8} " + " ".join(
        f"{o + ' ms':>14} {'TFLOP/s':>8} {'x vs ' + o:>14}" for o in others
    )
    log(header)
    for row in rows:
        for mode in ("fwd", "fwd+bwd"):
            cells = [
                f"{fmt(row.get((o, mode)), '.3f'):>14} {fmt(row.get(('tflops', o, mode)), '.1f'):>8} "
                f"{fmt(row.get(('ratio', o, mode)), '.2f'):>13}x"
                for o in others
            ]
            log(
                f"{row['n']:>6} {row['sparsity']:>8.1f} {mode:>8} {fmt(row.get((base, mode)), '.3f'):>12} "
                f"{fmt(row.get(('tflops', base, mode)), '.1f'):>8} " + " ".join(cells)
            )


def plot(rows: list[dict], path: Path, cuda: bool, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = "triton" if cuda else "pytorch"
    others = ["sdpa_flash", "pytorch"] if cuda else ["sdpa_math"]
    sparsities = sorted({r["sparsity"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for s in sparsities:
            pts = [r for r in rows if r["sparsity"] == s]
            for o, style in zip(others, ("-", "--")):
                xs = [r["n"] for r in pts if r.get(("ratio", o, mode))]
                ys = [r[("ratio", o, mode)] for r in pts if r.get(("ratio", o, mode))]
                if xs:
                    ax.plot(xs, ys, style, marker="o", label=f"vs {o}, {int(s * 100)}% sparse")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("max sequence length N (B * N fixed)")
        ax.set_ylabel(f"speedup of {base} (x)")
        ax.set_title(f"{mode}")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    log(f"plot written to {path}")


def bench_loss(device: str, dtype: torch.dtype, rows: int, negatives: int, dim: int, vocab: int, context: dict) -> None:
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(vocab, dim, generator=gen).to(device, dtype).requires_grad_()
    query = torch.randn(rows, dim, generator=gen).to(device, dtype).requires_grad_()
    pos_ids = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    layouts = {
        "shared": torch.randint(0, vocab, (negatives,), generator=gen).to(device).expand(rows, -1),
        "per_example": torch.randint(0, vocab, (rows, negatives), generator=gen).to(device),
    }
    grad = torch.ones(rows, device=device)
    impls = ["triton", "pytorch"] if device == "cuda" else ["pytorch"]
    for layout, neg_ids in layouts.items():
        base = dict(layout=layout, rows=rows, negatives=negatives, dim=dim, vocab=vocab, **context)
        peaks = {}
        for impl in impls:

            def run(neg_ids=neg_ids, impl=impl):  # bound now: timed inside this iteration
                loss = sampled_softmax_loss(query, pos_ids, neg_ids, table, temperature=0.05, impl=impl, validate=False)
                loss.backward(grad)
                return loss

            ms = time_ms(run, [query, table], device)
            if ms is None:
                emit("sampled_softmax_not_timed", 1, "point", impl=impl, mode="fwd+bwd", reason="out of memory", **base)
            else:
                emit("sampled_softmax_time", ms, "ms", impl=impl, mode="fwd+bwd", **base)
            if device == "cuda":
                query.grad = table.grad = None
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                run()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - before
                peaks[impl] = peak
                emit(
                    "sampled_softmax_peak_memory",
                    peak / 2**20,
                    "MiB",
                    impl=impl,
                    mode="fwd+bwd",
                    note="above the inputs; includes the dense [V, D] table gradient",
                    **base,
                )
                query.grad = table.grad = None
            log(
                f"  loss {layout:11s} {impl:8s} "
                + ("      OOM" if ms is None else f"{ms:9.3f} ms")
                + (f"  peak {peaks[impl] / 2**20:9.1f} MiB" if impl in peaks else "")
            )
        if len(peaks) == 2:
            emit(
                "sampled_softmax_peak_memory_ratio",
                peaks["triton"] / peaks["pytorch"],
                "ratio",
                versus="pytorch",
                **base,
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument(
        "--seq-lens", default=None, help="comma-separated N (default 512..8192 on CUDA, 128..512 on CPU)"
    )
    parser.add_argument("--sparsities", default="0.5,0.9")
    parser.add_argument("--token-budget", type=int, default=None, help="B * N (default 65536 on CUDA, 2048 on CPU)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--pos-buckets", type=int, default=0, help="0: one per position up to N; -1: no position table")
    parser.add_argument("--time-buckets", type=int, default=64, help="-1: no time table")
    parser.add_argument(
        "--reference-bwd-max-n",
        type=int,
        default=512,
        help="time the dense reference's forward+backward only up to this N (seconds per call)",
    )
    parser.add_argument(
        "--also-no-bias",
        action="store_true",
        help="then time the Triton kernel again without bias tables (vs the same SDPA timings)",
    )
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--skip-loss", action="store_true")
    parser.add_argument("--loss-rows", type=int, default=8192)
    parser.add_argument("--loss-negatives", type=int, default=128)
    parser.add_argument("--loss-dim", type=int, default=64)
    parser.add_argument("--loss-vocab", type=int, default=100_000)
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG path (default .state/benchmarks/kernels_hstu.png; the committed "
        "benchmarks/kernels_hstu.png is the H100 run in RESULTS.md)",
    )
    args = parser.parse_args(argv)
    if args.plot is None:
        args.plot = state_dir("benchmarks") / "kernels_hstu.png"

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    dtype = torch.bfloat16 if cuda else torch.float32
    seq_lens = [int(x) for x in (args.seq_lens or ("512,1024,2048,4096,8192" if cuda else "128,256,512")).split(",")]
    sparsities = [float(x) for x in args.sparsities.split(",")]
    budget = args.token_budget or (65536 if cuda else 2048)
    context = dict(
        device=torch.cuda.get_device_name() if cuda else "cpu",
        dtype=str(dtype).removeprefix("torch."),
        torch=torch.__version__,
    )
    if cuda:
        import triton

        context["triton"] = triton.__version__
    setup = Setup(
        device,
        dtype,
        args.heads,
        args.dim,
        budget,
        None if args.pos_buckets < 0 else args.pos_buckets,
        None if args.time_buckets < 0 else args.time_buckets,
        0,
    )
    log(
        f"benchmarks/kernels.py on {context['device']} ({context['dtype']}), B*N={budget}, H={args.heads}, D={args.dim}"
    )
    rows = []
    if not args.skip_attention:
        rows = bench_attention(setup, seq_lens, sparsities, context, reference_bwd_max_n=args.reference_bwd_max_n)
        print_table(rows, cuda)
        plot(
            rows,
            args.plot,
            cuda,
            f"HSTU attention on {context['device']}, {context['dtype']}, B*N={budget}, H={args.heads}, "
            f"D={args.dim}, bias tables {bias_label(setup)}",
        )
    if not args.skip_loss:
        loss_rows = args.loss_rows if cuda else min(args.loss_rows, 1024)
        bench_loss(device, dtype, loss_rows, args.loss_negatives, args.loss_dim, args.loss_vocab, context)
    if args.also_no_bias and cuda and rows:
        log("Triton without bias tables, against the SDPA timings above:")
        sdpa = {
            (r["n"], r["sparsity"], m): r[("sdpa_flash", m)]
            for r in rows
            for m in ("fwd", "fwd+bwd")
            if ("sdpa_flash", m) in r
        }
        plain = Setup(device, dtype, args.heads, args.dim, budget, None, None, 0)
        extra = bench_attention(plain, seq_lens, sparsities, context, impls=["triton"], sdpa_times=sdpa)
        print_table(extra, cuda)


if __name__ == "__main__":
    main()
