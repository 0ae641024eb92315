"""The in-process LRU of decoded chunks, bounded by bytes (a thread-safe ``cachetools.LRUCache``).

Keys are ``(prefix, generation, chunk)``, so a republished entry is never served from stale
chunks. Chunks are kept as :func:`medkd.softlabels.chunks.decode_chunk` returns them (float16
for the default encoding, so twice as many samples fit as in float32) and made read-only.

Examples:
    >>> lru = ChunkLRU(1 << 20)
    >>> lru.put(("p", "g1", 0), np.zeros((4, 3), np.float16))
    >>> lru.get(("p", "g1", 0)).shape, lru.nbytes
    ((4, 3), 24)
"""

from __future__ import annotations

import threading

import numpy as np
from cachetools import LRUCache

ChunkKey = tuple[str, str, int]


class ChunkLRU:
    """Decoded chunks by (prefix, generation, chunk), bounded by their total ``nbytes``.

    Args:
        capacity_bytes: the budget; a chunk larger than it is not kept.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self._items: LRUCache[ChunkKey, np.ndarray] = LRUCache(maxsize=capacity_bytes, getsizeof=lambda a: a.nbytes)
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return int(self._items.currsize)

    def get(self, key: ChunkKey) -> np.ndarray | None:
        """The chunk (now the most recently used), or None."""
        with self._lock:
            return self._items.get(key)

    def put(self, key: ChunkKey, value: np.ndarray) -> None:
        """Keep ``value`` (read-only from now on), evicting the least recently used chunks."""
        if value.nbytes > self.capacity:
            return
        value.setflags(write=False)
        with self._lock:
            self._items[key] = value

    def drop_prefix(self, prefix: str) -> None:
        """Forget every chunk of one entry (all generations)."""
        with self._lock:
            for key in [k for k in self._items if k[0] == prefix]:
                del self._items[key]

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._items.clear()
