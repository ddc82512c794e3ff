"""A byte-budgeted in-memory tier of cached rows, in front of the persistent store.

Rows are kept as CPU tensors (one per module output), keyed by their content key. When a
new row does not fit in ``max_bytes``, the most recently used rows are dropped first (MRU):
for the cyclic access of training epochs the most recently used row is the one needed
furthest in the future, so MRU keeps a stable subset hitting while LRU would hit nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

__all__ = ["MemoryTier", "Row"]

Row = tuple[torch.Tensor, ...]


def _nbytes(row: Row) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in row)


class MemoryTier:
    """Rows by key, within ``max_bytes`` (``None``: unbounded), dropping MRU rows first.

    Thread-safe: DataParallel replicas share one tier and call it from several threads.
    Stored rows are private copies; :meth:`get` returns the stored tensors, which callers
    must copy (stack) before handing them out.
    """

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._rows: OrderedDict[bytes, Row] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, keys: Sequence[bytes]) -> list[Row | None]:
        """The row for each key, or ``None``; hits become the most recently used."""
        found: list[Row | None] = []
        with self._lock:
            for key in keys:
                row = self._rows.get(key)
                if row is not None:
                    self._rows.move_to_end(key)
                found.append(row)
        return found

    def put(self, keys: Sequence[bytes], rows: Sequence[Row]) -> None:
        """Store rows (already private CPU copies), dropping MRU rows to make room."""
        with self._lock:
            for key, row in zip(keys, rows, strict=True):
                size = _nbytes(row)
                if self.max_bytes is not None and size > self.max_bytes:
                    continue
                old = self._rows.pop(key, None)
                if old is not None:
                    self.nbytes -= _nbytes(old)
                while self.max_bytes is not None and self.nbytes + size > self.max_bytes:
                    _, dropped = self._rows.popitem(last=True)
                    self.nbytes -= _nbytes(dropped)
                self._rows[key] = row
                self.nbytes += size

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()
            self.nbytes = 0
