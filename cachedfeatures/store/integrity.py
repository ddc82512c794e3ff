"""The hit path's integrity check: rows whose feature bytes are gone are misses, not fill values.

:class:`CheckedReader` reads an entry's rows and serves as hits only those backed by stored
feature bytes; it keeps what it has seen (chunks whose files were there, damage already
reported) for the process that reads. :func:`missing_chunks` and :func:`repair_missing` are
the two steps it takes on a chunk it has not seen yet (``cachedfeatures verify`` uses them too).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np
from zarr.core.sync import sync

from cachedfeatures.format.chunk_keys import chunk_key
from cachedfeatures.reader.chunk_reader import RowsRead
from cachedfeatures.store.chunk_bytes import delete_chunk_bytes
from cachedfeatures.store.feature_store import Entry

__all__ = ["CheckedReader", "missing_chunks", "repair_missing"]

logger = logging.getLogger(__name__)


def missing_chunks(entry: Entry, chunks: Iterable[int]) -> list[int]:
    """The chunks among ``chunks`` whose key is absent in one of the module's output arrays.

    Only output arrays are checked: Zarr may skip writing a chunk that equals the fill
    value, which is common for fields (a chunk of labels that are all 0) and which a real
    feature chunk (float, fill an odd sentinel) never is.
    """
    chunks = [int(chunk) for chunk in chunks]
    if not chunks:
        return []
    store = entry.group.store
    # A ragged output's offsets are always written (its values may be empty).
    arrays = [
        (array.path, array.ndim)
        for array in (
            entry.ragged[name].offsets if name in entry.ragged else entry.arrays[name]
            for name in entry.feature_names
        )
    ]
    per_chunk = [[chunk_key(path, chunk, ndim) for path, ndim in arrays] for chunk in chunks]
    if entry.backend.root is not None and entry.backend.direct_exists:  # the hot read path: stat calls
        root = f"{entry.backend.root}/"
        return [
            chunk
            for chunk, keys in zip(chunks, per_chunk, strict=True)
            if not all(os.path.exists(root + key) for key in keys)
        ]

    async def check() -> list[bool]:
        found = await asyncio.gather(*(store.exists(key) for keys in per_chunk for key in keys))
        width = len(arrays)
        return [all(found[i * width : (i + 1) * width]) for i in range(len(chunks))]

    return [chunk for chunk, present in zip(chunks, sync(check()), strict=True) if not present]


def repair_missing(entry: Entry, chunk: int) -> bool:
    """Clear ``chunk``'s rows if a data array lacks its bytes while rows are still valid.

    Returns whether it did: a chunk a pruner emptied meanwhile needs nothing. Run under
    the chunk's lock so a writer's rewrite in progress is never mistaken for damage.
    """
    start = chunk * entry.chunk_rows
    stop = min(start + entry.chunk_rows, entry.num_rows)
    with entry.locks.chunk(entry.name, chunk):
        if not np.asarray(entry.valid[start:stop], dtype=bool).any():
            return False
        if not missing_chunks(entry, [chunk]):
            return False
        delete_chunk_bytes(entry, chunk)
        return True


def _fill_value(entry: Entry, name: str) -> object | None:
    """The fill value of output array ``name``, or ``None`` where it is NaN (older entries)."""
    fill = entry.arrays[name].fill_value
    return None if np.isnan(fill) else fill


class CheckedReader:
    """Reads rows of ``entry``, serving as hits only rows backed by stored feature bytes.

    Two cases become misses: a chunk marked valid whose output bytes are missing (damage:
    its rows are cleared so they are recomputed, logged once per chunk), and hits whose
    floating-point outputs all equal the fill value (a finite sentinel; NaN in entries made
    before it), which is what a read that raced a pruner and a rewrite of the same rows sees.

    A chunk's files are looked at once per reader (:attr:`backed`), not on every batch: that
    stat per chunk was half the cost of a hit. Bytes that vanish later while their rows stay
    valid read as the fill value, which the second check catches.
    """

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        # Chunks whose output bytes this reader has seen while their rows were valid.
        self.backed: set[int] = set()
        self._reported: set[int] = set()  # damaged chunks already warned about

    def read(self, rows: Sequence[int] | np.ndarray) -> RowsRead:
        """``entry.read(rows)``, less the hits that would serve fill values."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.check(rows, self.entry.read(rows))

    def check(self, rows: np.ndarray, read: RowsRead) -> RowsRead:
        """``read`` (of ``rows``) less the hits that would serve fill values."""
        if not read.hits:
            return read
        entry = self.entry
        chunks: list[int] = read.hit_chunks(rows, entry.chunk_rows).tolist()
        missing: list[int] = []
        if not self.backed.issuperset(chunks):
            unchecked = [chunk for chunk in chunks if chunk not in self.backed]
            missing = missing_chunks(entry, unchecked)
            self.backed.update(chunk for chunk in unchecked if chunk not in missing)
        for chunk in missing:
            if repair_missing(entry, chunk) and chunk not in self._reported:
                self._reported.add(chunk)
                logger.warning(
                    "cachedfeatures: rows of chunk %d of %s were marked valid but the chunk's bytes "
                    "are missing; recomputing them (run 'cachedfeatures verify --repair' to check the store)",
                    chunk,
                    entry.name,
                )
        bad = np.isin(rows[read.hit] // entry.chunk_rows, missing) if missing else None
        for name in entry.feature_names:
            column = read.arrays.get(name)
            if column is not None and column.dtype.kind in "fc" and column.size:
                flat = column.reshape(len(column), -1)
                fill = _fill_value(entry, name)
                # All fill needs a fill first: test few rows. Entries made before the fill
                # sentinel have NaN, the old fill value (fill is None).
                first = np.isnan(flat[:, 0]) if fill is None else flat[:, 0] == fill
                if first.any():
                    maybe = np.flatnonzero(first)
                    if bad is None:
                        bad = np.zeros(len(column), dtype=bool)
                    same = np.isnan(flat[maybe]) if fill is None else flat[maybe] == fill
                    bad[maybe[same.all(axis=1)]] = True
        if bad is None or not bad.any():
            return read
        hit = read.hit.copy()
        hit[np.flatnonzero(read.hit)[bad]] = False
        return RowsRead(hit, {name: column[~bad] for name, column in read.arrays.items()})
