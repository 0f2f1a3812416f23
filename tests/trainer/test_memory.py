"""trainer/memory.py: giving freed heap pages back to the kernel."""

from __future__ import annotations

import psutil
import pytest
import torch

from trainer.memory import libc, release_free_memory

MB = 1_000_000


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


@pytest.mark.skipif(libc() is None, reason="needs glibc (malloc_trim)")
def test_release_free_memory_returns_fragmented_heap_pages() -> None:
    """The drift benchmark's RSS growth: freed heap chunks stay resident until malloc_trim."""
    # 64 KiB blocks come from the heap (below glibc's mmap threshold). Freeing every other one
    # leaves holes between live blocks, which free() cannot give back (glibc returns memory
    # only from the heap's top), like a training step's temporaries between long-lived objects.
    count, size = 2_000, 1 << 16
    release_free_memory()  # free pages left by earlier tests must not absorb the new blocks unseen
    start = rss_bytes()
    blocks = [torch.ones(size // 4) for _ in range(count)]
    allocated = rss_bytes() - start
    assert allocated > 0.8 * count * size
    del blocks[::2]
    retained = rss_bytes() - start
    assert retained > 0.8 * allocated, "freed heap chunks were returned by free() itself"
    assert release_free_memory()
    returned = retained - (rss_bytes() - start)
    assert returned > 0.3 * allocated, f"malloc_trim gave back {returned / MB:.1f} of {allocated / MB:.1f} MB"
    assert len(blocks) == count // 2
