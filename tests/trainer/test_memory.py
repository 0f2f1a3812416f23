"""trainer/memory.py: glibc's accounting, giving freed heap pages back, the steady-state slope."""

from __future__ import annotations

import pytest
import torch

from trainer.memory import malloc_stats, release_free_memory, rss_bytes, second_half_slope

glibc = pytest.mark.skipif(malloc_stats() is None, reason="needs glibc >= 2.33 (mallinfo2, malloc_trim)")

MB = 1_000_000


def test_second_half_slope_ignores_warm_up() -> None:
    warm_then_flat = [100.0, 150.0, 180.0, 200.0, 200.0, 200.0, 200.0, 200.0]
    assert second_half_slope(warm_then_flat) == 0.0
    assert second_half_slope([0.0, 0.0, 0.0, 10.0, 12.5, 15.0]) == pytest.approx(2.5)
    assert second_half_slope([3.0]) == 0.0 and second_half_slope([]) == 0.0


@glibc
def test_malloc_stats_count_live_bytes() -> None:
    before = malloc_stats().in_use
    block = torch.ones(8 * MB // 4)  # 8 MB of float32, touched
    assert malloc_stats().in_use - before >= 8 * MB
    del block
    assert malloc_stats().in_use - before < 1 * MB


@glibc
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
