"""Giving a long-running trainer's free heap pages back to the kernel.

On Linux, CPU tensors and numpy arrays come from glibc malloc. After the first large block is
freed, glibc raises its mmap threshold (up to 32 MiB), so the per-batch temporaries of a training
step, whose sizes change with every jagged batch, are carved out of the brk heap. Freed, they
stay in that heap as free chunks; glibc gives memory back to the kernel only from the heap's top
(`M_TRIM_THRESHOLD`), and the free space below it fragments and grows. The process RSS then rises
by a few MB a day of a day-by-day stream while the bytes actually in use stay flat (measured by
`benchmarks/drift.py`: malloc in-use +0.03 MB/day, RSS +2.7 MB/day over 60 days without this).

`release_free_memory()` (`malloc_trim(0)`) returns every free page of every arena to the kernel
in a few milliseconds; the stream trainer calls it every few thousand steps, which keeps RSS
flat. Setting `MALLOC_TRIM_THRESHOLD_` or `MALLOC_MMAP_THRESHOLD_` in the environment also
flattens it, but pins the mmap threshold low, and the mmap/page-fault churn made a training day
~2x slower on the 2-core box.

    >>> from trainer.memory import release_free_memory
    >>> isinstance(release_free_memory(), bool)
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def libc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is not glibc (musl, macOS)."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(lib, "malloc_trim"):
        return None
    lib.malloc_trim.argtypes = [ctypes.c_size_t]
    lib.malloc_trim.restype = ctypes.c_int
    return lib


def release_free_memory() -> bool:
    """Give the free pages of every malloc arena back to the kernel (`malloc_trim(0)`).

    Returns whether glibc's `malloc_trim` was available (False elsewhere: a no-op). Live
    memory is untouched; the next allocations that reuse those pages fault them back in.
    """
    lib = libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True
