"""A byte-budgeted in-memory tier of cached rows, in front of the persistent store.

Rows are kept as CPU tensors (one per module output), keyed by their content key. When a
new row does not fit in ``max_bytes``, the most recently used rows are dropped first (MRU):
for the cyclic access of training epochs the most recently used row is the one needed
furthest in the future, so MRU keeps a stable subset hitting while LRU would hit nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cachedfeatures.reader.bounded_cache import BoundedCache

__all__ = ["MemoryTier", "Row"]

Row = tuple[torch.Tensor, ...]


def _nbytes(row: Row) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in row)


class MemoryTier:
    """Rows by key, within ``max_bytes`` (``None``: unbounded), dropping MRU rows first.

    A :class:`~cachedfeatures.reader.bounded_cache.BoundedCache` with policy ``"mru"``
    (``cache``, with its hit, miss and eviction counters), taking a batch of keys at a time.
    Thread-safe: DataParallel replicas share one tier and call it from several threads.
    Stored rows are private copies; :meth:`get` returns the stored tensors, which callers
    must copy (stack) before handing them out.
    """

    def __init__(self, max_bytes: int | None) -> None:
        self.cache: BoundedCache[bytes, Row] = BoundedCache(max_bytes, "mru", _nbytes)

    @property
    def max_bytes(self) -> int | None:
        return self.cache.max_bytes

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def __len__(self) -> int:
        return len(self.cache)

    def get(self, keys: Sequence[bytes]) -> list[Row | None]:
        """The row for each key, or ``None``; hits become the most recently used."""
        return [self.cache.get(key) for key in keys]

    def put(self, keys: Sequence[bytes], rows: Sequence[Row]) -> None:
        """Store rows (already private CPU copies), dropping MRU rows to make room; a row larger
        than the whole budget is not kept."""
        for key, row in zip(keys, rows, strict=True):
            self.cache.put(key, row)

    def clear(self) -> None:
        self.cache.clear()
