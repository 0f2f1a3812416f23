"""Non-stationary check: a bounded item table (25% of all items ever seen) against an unbounded one.

The synthetic drifting stream (`infra.datasets.synthetic`: items are born and retire,
popularity and interests move) is replayed in time order, prequentially: each day's events
are first scored (each event retrieved from the user's history before it, top-10 over the
table's live rows, nothing excluded since users may come back to an item), then trained on
(each active user's rolling sequence, the day's events marked new, as in the streaming
contract). Both variants run the same HSTU (interleaved item/action tokens, retrieval and
ranking losses) in their own process, so their peak RSS can be compared.

    python -m benchmarks.drift                          # small default stream (30k events, 20 days)
    python -m benchmarks.drift --events 400000 --items 20000 --users 8000 --days 60 --threads 2

Prints JSON lines (HR@10 of each variant, their ratio, peak RSS, table bytes, the memory
slopes below, the table's lookup rate) on stdout and writes a PNG of HR@10, RSS and malloc'd
bytes in use per day (default `.state/benchmarks/drift.png`). Target: the bounded table within
5% of the unbounded one's HR@10, with flat memory.

Memory. Each variant records, at the end of every day, the process RSS, the bytes glibc malloc
has handed out and not got back (`malloc_stats().in_use` below: tensors, arrays, the
table, optimizer state) and the number of live Python objects (after `gc.collect()`). "Flat
memory" is judged on the steady state: `drift_rss_slope_<variant>` and
`drift_malloc_in_use_slope_<variant>` are least-squares slopes over the second half of the days
(MB/day, MB = 10^6 bytes); the first half is warm-up (optimizer state, allocator caches, the
model's first shapes). The peak-RSS line is the process high-water mark (`ru_maxrss`, imports
and warm-up included), not a steady-state figure: it is reached inside a day's scoring or
training pass and rises with the work of a pass, which grows for as long as users' histories are
filling up to `max_seq_len` (the default stream: 1.5k training events on day 1, 18k on day 20).

Mitigation applied: glibc keeps the freed per-batch temporaries as free chunks inside its heap
and returns pages only from the heap's top, so without help RSS climbs ~2.7 MB/day while the
bytes in use stay flat (allocator retention, not a leak; see `trainer/memory.py`). Each variant
calls `malloc_trim(0)` (`trainer.memory.release_free_memory()`) once per day, after training and
before the day's RSS is read; it costs milliseconds. `--no-malloc-trim` turns it off to show the
raw allocator behaviour.

Training is the project's one training step (`trainer.step.train_step`), the one the offline
and stream trainers call.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing as mp
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from config.paths import state_dir
from features.sequence_batch import SequenceBatch, slice_events
from infra.datasets.synthetic import DAY_MS, SyntheticConfig, generate_events
from trainer.batching import make_batch
from trainer.embedding_table import DynamicEmbeddingTable, TableConfig
from trainer.losses import GenerativeLoss, LossConfig
from trainer.memory import libc, release_free_memory
from trainer.model import HSTUModel, ModelConfig, build_model
from trainer.splits import sequences_from_frame
from trainer.step import train_step


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@dataclass(frozen=True, kw_only=True)
class MallocStats:
    """glibc's own accounting, all arenas together (bytes)."""

    in_use: int  # allocated and not freed: heap chunks in use plus mmapped blocks
    free: int  # free chunks kept inside the heaps (resident until trimmed or reused)
    heap: int  # address space of the heaps (in use + free)
    mmapped: int  # blocks above the mmap threshold, each its own mapping


def malloc_stats() -> MallocStats | None:
    """glibc's `mallinfo2()` (None where unavailable, glibc < 2.33); cost: one walk over the free lists."""
    lib = libc()
    if lib is None or not hasattr(lib, "mallinfo2"):
        return None
    lib.mallinfo2.argtypes = []
    lib.mallinfo2.restype = _MallInfo2
    info = lib.mallinfo2()
    return MallocStats(
        in_use=int(info.uordblks + info.hblkhd), free=int(info.fordblks), heap=int(info.arena), mmapped=int(info.hblkhd)
    )


def second_half_slope(values: Sequence[float]) -> float:
    """Least-squares slope per step of the second half of `values` (the first half is warm-up).

    0.0 for fewer than two points in the second half.
    """
    tail = np.asarray(values[len(values) // 2 :], dtype=np.float64)
    if tail.size < 2:
        return 0.0
    steps = np.arange(tail.size, dtype=np.float64) - (tail.size - 1) / 2
    return float(np.dot(steps, tail - tail.mean()) / np.dot(steps, steps))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True, kw_only=True)
class DriftRun:
    """One variant of the benchmark (everything a child process needs to rebuild the stream)."""

    name: str
    capacity: int
    eviction: str
    stream: SyntheticConfig
    max_seq_len: int
    dim: int
    lr: float
    batch_size: int
    eval_per_day: int
    seed: int
    threads: int
    malloc_trim: bool = True  # give the allocator's free pages back once per day (see the docstring)


@dataclass(frozen=True, kw_only=True)
class Stream:
    seqs: SequenceBatch  # all events, per user, time-ordered
    day: np.ndarray  # day index of every event (aligned with seqs' flat arrays)
    user_of: np.ndarray  # user position of every event
    num_days: int
    num_items: int


def load_stream(cfg: SyntheticConfig) -> Stream:
    events = generate_events(cfg)
    seqs = sequences_from_frame(events, action_vocab=cfg.actions)
    day = ((seqs.timestamps_ms - cfg.start_ms) // DAY_MS).astype(np.int64)
    user_of = np.repeat(np.arange(len(seqs)), seqs.lengths)
    return Stream(
        seqs=seqs, day=day, user_of=user_of, num_days=int(day.max()) + 1, num_items=int(np.unique(seqs.item_ids).size)
    )


def slices(stream: Stream, starts: np.ndarray, ends: np.ndarray, num_new: np.ndarray | None = None) -> SequenceBatch:
    """The users' event windows [starts[i], ends[i]) (flat indices into the stream's arrays)."""
    users = stream.user_of[starts]
    first = stream.seqs.offsets[users]
    return slice_events(stream.seqs, users, starts - first, ends - first, num_new)


@torch.no_grad()
def score_day(model: HSTUModel, stream: Stream, events: np.ndarray, max_seq_len: int) -> tuple[int, int]:
    """Hits@10 and count for `events` (flat indices), each retrieved from the history before it."""
    model.eval()
    first = stream.seqs.offsets[stream.user_of[events]]
    starts = np.maximum(first, events - max_seq_len)
    keep = events > first  # an event with no history cannot be scored
    events, starts = events[keep], starts[keep]
    hits = 0
    for lo in range(0, events.size, 256):
        ev, st = events[lo : lo + 256], starts[lo : lo + 256]
        batch = make_batch(slices(stream, st, ev), np.arange(ev.size), max_len=max_seq_len)
        rows = model.table.lookup(batch.item_ids)
        scores = model.retrieval_scores(
            rows,
            torch.from_numpy(batch.actions),
            torch.from_numpy(batch.timestamps_ms),
            torch.from_numpy(batch.offsets),
        )
        top = scores.topk(min(10, len(model.table)), dim=1).indices
        target = model.table.lookup(torch.from_numpy(stream.seqs.item_ids[ev]))
        hits += int((top == target[:, None]).any(dim=1).sum())
    model.train()
    return hits, int(events.size)


def table_bytes(model: HSTUModel, optimizer: torch.optim.Optimizer) -> int:
    table = model.table
    state = sum(v.numel() * v.element_size() for v in table.vocab_state().values())
    weight = table.weight.numel() * table.weight.element_size()
    moments = sum(
        v.numel() * v.element_size() for v in optimizer.state.get(table.weight, {}).values() if torch.is_tensor(v)
    )
    return int(state + weight + moments)


def run_variant(run: DriftRun) -> dict:
    """Replay the stream prequentially with one table; runs in its own process."""
    torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    proc = psutil.Process()
    stream = load_stream(run.stream)
    num_actions = len(run.stream.actions)
    table = DynamicEmbeddingTable(
        config=TableConfig(capacity=run.capacity, dim=run.dim, eviction=run.eviction, seed=run.seed)
    )
    model = build_model(
        ModelConfig(
            layout="interleaved",
            dim=run.dim,
            qk_dim=run.dim,
            v_dim=run.dim,
            max_seq_len=run.max_seq_len,
            num_actions=num_actions,
        ),
        table=table,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr, betas=(0.9, 0.98))
    table.attach_optimizer(optimizer)
    loss_fn = GenerativeLoss(config=LossConfig(num_negatives=64, num_in_batch_negatives=64), table=table, seed=run.seed)
    rng = np.random.default_rng(run.seed)
    seqs = stream.seqs
    per_day: list[dict] = []
    rss_start = proc.memory_info().rss
    started = time.perf_counter()
    # Everything alive now (imports, stream, model) moves to gc's permanent generation: the daily
    # gc.collect() below then scans only what the days create, and gc.get_objects() lists only that.
    gc.collect()
    gc.freeze()
    try:
        for day in range(stream.num_days):
            todays = np.flatnonzero(stream.day == day)
            if todays.size == 0:
                continue
            # 1) score: the day's events, before training on them
            sample = np.sort(rng.choice(todays, size=min(run.eval_per_day, todays.size), replace=False))
            hits, count = score_day(model, stream, sample, run.max_seq_len) if len(table) else (0, 0)
            # 2) train: each active user's sequence up to the end of the day, today's events new
            users, first_today, n_new = np.unique(stream.user_of[todays], return_index=True, return_counts=True)
            ends = todays[first_today] + n_new  # events of a user within a day are contiguous
            starts = np.maximum(seqs.offsets[users], ends - (run.max_seq_len + 1))
            daily = slices(stream, starts, ends)
            losses = []
            order = rng.permutation(users.size)
            for lo in range(0, users.size, run.batch_size):
                pick = order[lo : lo + run.batch_size]
                batch = make_batch(daily, pick, max_len=run.max_seq_len + 1, num_new=n_new[pick])
                losses.append(train_step(model, batch, optimizer=optimizer, loss_fn=loss_fn).loss.item())
            gc.collect()  # so that py_objects counts live objects, not cycles awaiting collection
            if run.malloc_trim:
                release_free_memory()
            rss = proc.memory_info().rss
            heap = malloc_stats()
            per_day.append(
                {
                    "day": day,
                    "hits": hits,
                    "count": count,
                    "hr@10": hits / max(count, 1),
                    "loss": float(np.mean(losses)),
                    "rss": rss,
                    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    "malloc_in_use": heap.in_use if heap else None,
                    "py_objects": len(gc.get_objects()),  # alive and created since the setup above
                    "live_rows": len(table),
                    "evicted": table.counters.evicted,
                    "train_events": int(daily.item_ids.size),  # grows while histories fill up to max_seq_len
                }
            )
            elapsed = time.perf_counter() - started
            eta = elapsed / (day + 1) * (stream.num_days - day - 1)
            log(
                f"[{run.name}] day {day + 1}/{stream.num_days} hr@10 {hits / max(count, 1):.4f} "
                f"loss {np.mean(losses):.3f} "
                f"live {len(table)} evicted {table.counters.evicted} rss {rss / 2**20:.0f} MiB "
                f"in use {(heap.in_use if heap else 0) / 2**20:.0f} MiB "
                f"({elapsed:.0f}s, eta {eta:.0f}s)"
            )
    finally:
        gc.unfreeze()
    scored = [d for d in per_day[1:]]  # day 0 is scored by an untrained model
    return {
        "name": run.name,
        "capacity": run.capacity,
        "hr@10": sum(d["hits"] for d in scored) / max(1, sum(d["count"] for d in scored)),
        "per_day": per_day,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_start": rss_start,
        "table_bytes": table_bytes(model, optimizer),
        "seconds": time.perf_counter() - started,
        "num_items": stream.num_items,
        "malloc_trim": run.malloc_trim,
    }


def _child(run: DriftRun, queue: mp.Queue) -> None:
    queue.put(run_variant(run))


def run_in_process(run: DriftRun) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(run, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"variant {run.name} exited with code {proc.exitcode}")
    return result


def lookup_rate(capacity: int = 1_000_000, batch: int = 50_000) -> float:
    """Raw-id lookups per second on one thread, batches of 50k ids, table of `capacity` admitted ids."""
    torch.set_num_threads(1)
    table = DynamicEmbeddingTable(config=TableConfig(capacity=capacity, dim=1))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2**62, size=capacity)
    for lo in range(0, capacity, 200_000):
        table.observe(ids[lo : lo + 200_000], now=0.0)
    queries = torch.from_numpy(
        np.where(rng.random(batch * 20) < 0.9, rng.choice(ids, batch * 20), rng.integers(0, 2**62, batch * 20))
    )
    start = time.perf_counter()
    for lo in range(0, queries.numel(), batch):
        table.lookup(queries[lo : lo + batch])
    return queries.numel() / (time.perf_counter() - start)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_hr, ax_mem, ax_use) = plt.subplots(1, 3, figsize=(15, 4))
    for res in results:
        days = [d["day"] + 1 for d in res["per_day"]]
        ax_hr.plot(days, [d["hr@10"] for d in res["per_day"]], label=f"{res['name']} (cap {res['capacity']})")
        (line,) = ax_mem.plot(days, [d["rss"] / 1e6 for d in res["per_day"]], label=f"{res['name']} end of day")
        ax_mem.plot(
            days,
            [d["peak_rss"] / 1e6 for d in res["per_day"]],
            linestyle="--",
            color=line.get_color(),
            label=f"{res['name']} peak so far",
        )
        in_use = [d["malloc_in_use"] for d in res["per_day"]]
        if all(v is not None for v in in_use):
            ax_use.plot(days, [v / 1e6 for v in in_use], label=res["name"])
    trim = "malloc_trim once a day" if results and results[0].get("malloc_trim") else "no malloc_trim"
    ax_hr.set(xlabel="day", ylabel="HR@10 (prequential)", title="retrieval quality over time")
    ax_mem.set(xlabel="day", ylabel="RSS (MB)", title=f"process RSS ({trim})")
    ax_use.set(xlabel="day", ylabel="malloc in use (MB)", title="bytes allocated and not freed")
    for ax in (ax_hr, ax_mem, ax_use):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bounded vs unbounded item table on a drifting stream")
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--items", type=int, default=3_000)
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--days", type=int, default=20)
    parser.add_argument("--lifetime-days", type=float, default=6.0, help="mean item lifetime")
    parser.add_argument("--fraction", type=float, default=0.25, help="bounded capacity / distinct items ever seen")
    parser.add_argument("--eviction", choices=("lru", "lfu", "ttl"), default="lru")
    parser.add_argument("--max-seq-len", type=int, default=50)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-per-day", type=int, default=300)
    # One thread by default: on a shared 2-core machine, 2 OpenMP threads per process mostly wait
    # for each other (measured 3-10x slower than 1 thread under a load of 5).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-malloc-trim",
        dest="malloc_trim",
        action="store_false",
        help="do not return the allocator's free pages once per day (RSS then grows with fragmentation)",
    )
    parser.add_argument("--png", type=Path, default=None, help="default .state/benchmarks/drift.png")
    args = parser.parse_args(argv)

    stream_cfg = SyntheticConfig(
        num_users=args.users,
        num_items=args.items,
        num_events=args.events,
        num_days=args.days,
        item_lifetime_days=args.lifetime_days,
        seed=args.seed,
    )
    distinct = load_stream(stream_cfg).num_items
    bounded = max(1, int(round(args.fraction * distinct)))
    log(f"[drift] {args.events} events, {distinct} distinct items over {args.days} days; bounded capacity {bounded}")
    common = dict(
        stream=stream_cfg,
        max_seq_len=args.max_seq_len,
        dim=args.dim,
        lr=args.lr,
        batch_size=args.batch_size,
        eval_per_day=args.eval_per_day,
        seed=args.seed,
        threads=args.threads,
        eviction=args.eviction,
        malloc_trim=args.malloc_trim,
    )
    results = [
        run_in_process(DriftRun(name="unbounded", capacity=distinct, **common)),
        run_in_process(DriftRun(name="bounded", capacity=bounded, **common)),
    ]
    context = {
        "events": args.events,
        "distinct_items": distinct,
        "days": args.days,
        "eviction": args.eviction,
        "threads": args.threads,
        "device": "cpu",
        "malloc_trim": args.malloc_trim,
    }
    for res in results:
        rss = [d["rss"] for d in res["per_day"]]
        in_use = [d["malloc_in_use"] for d in res["per_day"]]
        peaks = [d["peak_rss"] for d in res["per_day"]]
        events = [d["train_events"] for d in res["per_day"]]
        half = len(rss) // 2
        print(
            json.dumps(
                {
                    "metric": f"drift_hr@10_{res['name']}",
                    "value": res["hr@10"],
                    "unit": "hit rate",
                    "capacity": res["capacity"],
                    "seconds": round(res["seconds"], 1),
                    **context,
                }
            )
        )
        print(
            json.dumps(
                {
                    "metric": f"drift_peak_rss_{res['name']}",
                    "value": res["peak_rss"],
                    "unit": "bytes",
                    # the high-water mark rises with the day's work (training events, see train_events):
                    "peak_rss_growth_second_half_mb": round((peaks[-1] - peaks[half]) / 1e6, 1) if peaks else None,
                    "train_events_mid_last_day": [events[half], events[-1]] if events else None,
                    "table_bytes": res["table_bytes"],
                    "capacity": res["capacity"],
                    **context,
                }
            )
        )
        # Steady state: slopes over the second half of the days (the first half is warm-up).
        print(
            json.dumps(
                {
                    "metric": f"drift_rss_slope_{res['name']}",
                    "value": round(second_half_slope(rss) / 1e6, 3),
                    "unit": "MB/day",
                    "over_days": f"{half + 1}-{len(rss)}",
                    "rss_first_day_mb": round(rss[0] / 1e6, 1) if rss else None,
                    "rss_mid_mb": round(rss[half] / 1e6, 1) if rss else None,
                    "rss_last_day_mb": round(rss[-1] / 1e6, 1) if rss else None,
                    **context,
                }
            )
        )
        if in_use and all(v is not None for v in in_use):
            print(
                json.dumps(
                    {
                        "metric": f"drift_malloc_in_use_slope_{res['name']}",
                        "value": round(second_half_slope(in_use) / 1e6, 3),
                        "unit": "MB/day",
                        "over_days": f"{half + 1}-{len(in_use)}",
                        "in_use_mid_mb": round(in_use[half] / 1e6, 1),
                        "in_use_last_day_mb": round(in_use[-1] / 1e6, 1),
                        **context,
                    }
                )
            )
    unbounded, bounded_res = results
    print(
        json.dumps(
            {
                "metric": "drift_hr@10_bounded_over_unbounded",
                "value": bounded_res["hr@10"] / max(unbounded["hr@10"], 1e-12),
                "unit": "ratio",
                "target": ">= 0.95",
                "fraction": args.fraction,
                **context,
            }
        )
    )
    print(
        json.dumps(
            {
                "metric": "table_lookup_rate",
                "value": round(lookup_rate()),
                "unit": "ids/s",
                "batch": 50_000,
                "capacity": 1_000_000,
                "threads": 1,
                "device": "cpu",
            }
        )
    )
    png = args.png or state_dir("benchmarks") / "drift.png"
    plot(results, png)
    log(f"[drift] wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
