"""Process memory of a long-running trainer: live bytes vs what the allocator keeps, and giving pages back.

On Linux, CPU tensors and numpy arrays come from glibc malloc. After the first large block is
freed, glibc raises its mmap threshold (up to 32 MiB), so the per-batch temporaries of a training
step, whose sizes change with every jagged batch, are carved out of the brk heap. Freed, they
stay in that heap as free chunks; glibc gives memory back to the kernel only from the heap's top
(`M_TRIM_THRESHOLD`), and the free space below it fragments and grows. The process RSS then rises
by a few MB a day of a day-by-day stream while the bytes actually in use stay flat (measured on
`benchmarks/drift.py`: malloc in-use +0.03 MB/day, RSS +2.7 MB/day over 60 days).

`release_free_memory()` (`malloc_trim(0)`) returns every free page of every arena to the kernel
in a few milliseconds; calling it once per day (or every few thousand steps) keeps RSS flat.
Setting `MALLOC_TRIM_THRESHOLD_` or `MALLOC_MMAP_THRESHOLD_` in the environment also flattens
it, but pins the mmap threshold low, and the mmap/page-fault churn made a training day ~2x
slower on the 2-core box.

    >>> from trainer.memory import malloc_stats, release_free_memory, second_half_slope
    >>> second_half_slope([5.0, 9.0, 10.0, 11.0, 12.0, 13.0])   # warm-up ignored: 1.0 per step
    1.0
    >>> stats = malloc_stats()   # None where the C library is not glibc >= 2.33
    >>> stats is None or stats.in_use > 0
    True
    >>> isinstance(release_free_memory(), bool)
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import psutil


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
        )
    ]


@cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim"):
        return None  # not glibc (musl, macOS)
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
        libc.mallinfo2.argtypes = []
        libc.mallinfo2.restype = _MallInfo2
    return libc


@dataclass(frozen=True, kw_only=True)
class MallocStats:
    """glibc's own accounting, all arenas together (bytes)."""

    in_use: int  # allocated and not freed: heap chunks in use plus mmapped blocks
    free: int  # free chunks kept inside the heaps (resident until trimmed or reused)
    heap: int  # address space of the heaps (in use + free)
    mmapped: int  # blocks above the mmap threshold, each its own mapping


def malloc_stats() -> MallocStats | None:
    """glibc's `mallinfo2()` (None where unavailable); cost: one walk over the free lists."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    info = libc.mallinfo2()
    return MallocStats(
        in_use=int(info.uordblks + info.hblkhd), free=int(info.fordblks), heap=int(info.arena), mmapped=int(info.hblkhd)
    )


def release_free_memory() -> bool:
    """Give the free pages of every malloc arena back to the kernel (`malloc_trim(0)`).

    Returns whether glibc's `malloc_trim` was available (False elsewhere: a no-op). Live
    memory is untouched; the next allocations that reuse those pages fault them back in.
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def rss_bytes() -> int:
    """Resident set size of this process."""
    return int(psutil.Process().memory_info().rss)


def second_half_slope(values: Sequence[float]) -> float:
    """Least-squares slope per step of the second half of `values` (the first half is warm-up).

    0.0 for fewer than two points in the second half.
    """
    tail = np.asarray(values[len(values) // 2 :], dtype=np.float64)
    if tail.size < 2:
        return 0.0
    steps = np.arange(tail.size, dtype=np.float64) - (tail.size - 1) / 2
    return float(np.dot(steps, tail - tail.mean()) / np.dot(steps, steps))
