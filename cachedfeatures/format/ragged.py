"""One row chunk of a ragged (variable-length) array: per-row offsets into a flat values block.

A ragged array stores, for every row chunk, its rows' values one after the other in one array
(``<name>.values/<chunk>``, shape ``(total, *inner)``) and, per row, where they are: row ``i``'s
values are ``values[start:stop]`` with ``start, stop = <name>.offsets[i]``, counted from the
start of its own chunk's values. A row without values (never written, or not valid when the
chunk was last written) has offsets ``(-1, -1)``, which is also the offsets array's fill value.

Values are kept per row chunk, not in one array for the whole entry, so that rows can be
written in any order, a chunk at a time, and pruned a chunk at a time, like every other array.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ABSENT", "RaggedChunk", "object_column", "pack_padded", "zero_padded_base"]

ABSENT = -1  # the offsets of a row without values (and the offsets array's fill value)
# Batch buffers (B, L_max, ...) made by ``pack_padded``, by data address, while they live: rows
# served as their leading views can be collated into the buffer itself, without a copy.
_ZERO_PADDED: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()
# Rows are packed into one padded buffer only while it is at most this many times their bytes.
MAX_PADDING_FACTOR = 4


def object_column(items: Sequence[Any]) -> np.ndarray:
    """A 1-d object array holding ``items`` as they are (``np.array`` would stack equal shapes)."""
    column = np.empty(len(items), dtype=object)
    for position, item in enumerate(items):
        column[position] = item
    return column


@dataclass(frozen=True)
class RaggedChunk:
    """A row chunk of a ragged array: ``offsets`` (rows, 2) int64 into ``values`` (total, *inner)."""

    offsets: np.ndarray
    values: np.ndarray

    @classmethod
    def from_rows(
        cls, rows: Sequence[np.ndarray | None], inner: tuple[int, ...], dtype: np.dtype[Any]
    ) -> RaggedChunk:
        """The chunk holding ``rows`` in order (``None``: a row without values)."""
        lengths = np.array([0 if row is None else len(row) for row in rows], dtype=np.int64)
        stops = np.cumsum(lengths)
        offsets = np.stack([stops - lengths, stops], axis=1) if len(rows) else np.zeros((0, 2), np.int64)
        absent = np.array([row is None for row in rows], dtype=bool)
        offsets[absent] = ABSENT
        present = [np.asarray(row, dtype=dtype).reshape(-1, *inner) for row in rows if row is not None]
        values = np.concatenate(present) if present else np.empty((0, *inner), dtype=dtype)
        return cls(np.ascontiguousarray(offsets, dtype=np.int64), np.ascontiguousarray(values))

    @staticmethod
    def total(offsets: np.ndarray) -> int:
        """How many values the rows with ``offsets`` reach (the length of their values array)."""
        return max(int(offsets[:, 1].max(initial=0)), 0) if len(offsets) else 0

    def check(self, valid: np.ndarray | None = None) -> None:
        """Raise ``ValueError`` unless the offsets fit the values, and every ``valid`` row has some."""
        starts, stops = self.offsets[:, 0], self.offsets[:, 1]
        present = starts != ABSENT
        if np.any(present & ((starts < 0) | (stops < starts) | (stops > len(self.values)))) or np.any(
            ~present & (stops != ABSENT)
        ):
            raise ValueError(
                f"ragged chunk offsets do not fit its {len(self.values)} values (offsets and values "
                "written by different writes, or damaged)"
            )
        if valid is not None and np.any(valid & ~present[: len(valid)]):
            raise ValueError("rows marked valid have no values in their ragged chunk (damaged offsets)")

    def row(self, local: int) -> np.ndarray:
        """Row ``local`` of the chunk as a copy (``None``-free: absent rows give zero values)."""
        start, stop = self.offsets[local]
        if start == ABSENT:
            return self.values[:0].copy()
        return self.values[start:stop].copy()

    def gather(self, local: np.ndarray, out: np.ndarray, positions: np.ndarray) -> None:
        """``out[positions[k]] = copy of row local[k]`` (``out`` a 1-d object array)."""
        values = self.values
        bounds = self.offsets[local].tolist()
        for position, (start, stop) in zip(positions.tolist(), bounds, strict=True):
            out[position] = values[max(start, 0) : max(stop, 0)].copy()

    def merged(self, keep: np.ndarray, local: np.ndarray, rows: Sequence[np.ndarray]) -> RaggedChunk:
        """This chunk with rows ``local`` replaced by ``rows``, the others kept where ``keep``."""
        count = len(keep)
        new: list[np.ndarray | None] = [None] * count
        for k in np.flatnonzero(keep[:count]).tolist():
            start, stop = self.offsets[k]
            if start != ABSENT:
                new[k] = self.values[start:stop]
        for k, row in zip(local.tolist(), rows, strict=True):
            new[k] = row
        return RaggedChunk.from_rows(new, tuple(self.values.shape[1:]), self.values.dtype)

    @classmethod
    def empty(cls, rows: int, inner: tuple[int, ...], dtype: np.dtype[Any]) -> RaggedChunk:
        return cls(np.full((rows, 2), ABSENT, dtype=np.int64), np.empty((0, *inner), dtype=dtype))

    @functools.cached_property
    def nbytes(self) -> int:
        return int(self.offsets.nbytes + self.values.nbytes)

    def lengths(self, local: np.ndarray) -> np.ndarray:
        """The lengths of rows ``local`` (0 for rows without values)."""
        bounds: np.ndarray = np.maximum(self.offsets[local], 0)
        lengths: np.ndarray = bounds[:, 1] - bounds[:, 0]
        return lengths


def pack_padded(
    column: np.ndarray,
    parts: Sequence[tuple[RaggedChunk, np.ndarray, np.ndarray]],
    inner: tuple[int, ...],
    dtype: np.dtype[Any],
) -> None:
    """Fill the 1-d object ``column`` with the rows ``parts`` name (chunk, local rows, positions),
    each a copy, as leading views ``buffer[k, :L_k]`` of one zero-padded ``(B, L_max, ...)`` buffer
    of this batch when its padding stays small (else one array per row). Positions already filled
    with an array are moved into the buffer too; those left empty get zero-length rows.

    A collate that pads these rows (``pipeline.collate.PadCollate``) finds the buffer and serves
    it as the padded batch without copying the rows again.
    """
    count = len(column)
    lengths = np.zeros(count, dtype=np.int64)
    for chunk, local, positions in parts:
        lengths[positions] = chunk.lengths(local)
    filled = [k for k in range(count) if isinstance(column[k], np.ndarray)]
    for k in filled:
        lengths[k] = len(column[k])
    longest = int(lengths.max(initial=0))
    if count * longest > MAX_PADDING_FACTOR * max(int(lengths.sum()), 1) or longest == 0:
        for chunk, local, positions in parts:
            chunk.gather(local, column, positions)
        for k in range(count):
            if not isinstance(column[k], np.ndarray):
                column[k] = np.empty((0, *inner), dtype=dtype)
        return
    buffer = np.zeros((count, longest, *inner), dtype=dtype)
    for k in filled:
        buffer[k, : lengths[k]] = column[k]
    for chunk, local, positions in parts:
        bounds = np.maximum(chunk.offsets[local], 0).tolist()
        values = chunk.values
        for position, (start, stop) in zip(positions.tolist(), bounds, strict=True):
            buffer[position, : stop - start] = values[start:stop]
    for k in range(count):
        column[k] = buffer[k, : lengths[k]]
    _ZERO_PADDED[buffer.ctypes.data] = buffer


def zero_padded_base(address: int) -> np.ndarray | None:
    """The live zero-padded batch buffer that starts at ``address``, if ``pack_padded`` made one."""
    found: np.ndarray | None = _ZERO_PADDED.get(address)
    return found
