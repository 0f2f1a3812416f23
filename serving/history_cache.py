"""A replica's LRU cache of encoded histories (`trainer.model.HistoryCache`), bounded in bytes.

Key: (model version, user id, last_partition, last_offset, digest of the merged events). The
version because another model encodes differently; the watermark names the stored sequence the
streaming job last wrote; the digest (blake2b of the item, action and time arrays after merging
`recent_events`) covers the request's own events and any writer that does not move the
watermark, so a hit is always the same history. An encoded history is independent of the
request time (the model re-runs the one token that depends on it), so one entry serves every
later request of the user until their sequence or the version changes.

    >>> import numpy as np
    >>> cache = HistoryLRU(max_bytes=1000)
    >>> key = cache_key(3, 42, -1, -1, np.array([1, 2]), np.array([0, 0]), np.array([10, 20]))
    >>> cache.get(key) is None
    True
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from trainer.model import HistoryCache

CacheKey = tuple[int, int, int, int, bytes]


def cache_key(
    version: int,
    user_id: int,
    last_partition: int,
    last_offset: int,
    item_ids: np.ndarray,
    actions: np.ndarray,
    timestamps_ms: np.ndarray,
) -> CacheKey:
    digest = hashlib.blake2b(digest_size=16)
    for array in (item_ids, actions, timestamps_ms):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        digest.update(b"|")
    return (version, user_id, last_partition, last_offset, digest.digest())


class HistoryLRU:
    """Least-recently-used `HistoryCache`s up to `max_bytes` (0 keeps nothing); thread-safe."""

    def __init__(self, *, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes ({max_bytes}) must be >= 0 (0 turns the cache off)")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[CacheKey, HistoryCache] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: CacheKey) -> HistoryCache | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: CacheKey, entry: HistoryCache) -> None:
        size = entry.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def retain_versions(self, versions: set[int]) -> int:
        """Drop every entry of a version not in `versions` (after a swap); returns how many."""
        with self._lock:
            stale = [key for key in self._entries if key[0] not in versions]
            for key in stale:
                self._bytes -= self._entries.pop(key).nbytes
            return len(stale)
