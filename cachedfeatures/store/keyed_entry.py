"""A content-addressed entry: rows found by their content key, not by a dataset index.

The in-model cache (:func:`cachedfeatures.cached_module`) has no dataset index to address
rows by, only content keys. It stores them in an ordinary entry of the feature store (so the
CLI, pruning and notebooks see it like any other), grown append-only::

    <Module>-<id>/
      key           (capacity, 16) uint8: the content key of each row
      features      (capacity, *out_shape), or features_<key> per module output
      valid         (capacity,) bool: a row is served only where it is set
      next_row      (1,) int64: rows handed out so far (rows are never reused)

A writer reserves rows by bumping ``next_row`` under the entry lock (doubling the capacity
when needed), then writes key and outputs before ``valid``, each chunk under its chunk lock
(``Entry.write``). Any process can open the entry and build the key -> row index from
``key`` and ``valid``; it catches up with other writers by reading the rows added since.
A budget (``cached_module(max_bytes=)``, enforced by :mod:`cachedfeatures.pruning` for the whole
store) drops whole chunks by the store's one protocol (``valid`` cleared before its bytes and
checksums go, see :mod:`cachedfeatures.store.chunk_bytes`); readers check ``valid`` again
after reading, so a race or a crash in between costs a recompute, never a wrong row.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import zarr
import zarr.core.sync

from cachedfeatures.format.names import ATTRS_KEY, CHUNK_CRC, KEY, NEXT_ROW, VALID
from cachedfeatures.format.row_keys import KEY_BYTES
from cachedfeatures.format.specs import ArraySpec
from cachedfeatures.reader.bounded_cache import BoundedCache
from cachedfeatures.store.access import COUNT, LAST
from cachedfeatures.store.feature_store import (
    MAX_DEFAULT_CHUNK_BYTES,
    Compressor,
    Entry,
    FeatureStore,
)

__all__ = ["KeyedEntry", "keyed_chunk_rows"]

logger = logging.getLogger(__name__)

KEY_SPEC = ArraySpec(KEY, "ndarray", np.dtype(np.uint8).str, (KEY_BYTES,))
# The size keyed_chunk_rows aims a keyed entry's chunk at: smaller than a dataset entry's
# (cachedfeatures.store.feature_store.DATASET_TARGET_CHUNK_BYTES), see keyed_chunk_rows.
KEYED_TARGET_CHUNK_BYTES = 256 * 1024
CHUNK_CACHE_BYTES = 64 * 1024 * 1024
READAHEAD = 4  # chunks fetched beyond the last one a read needs (see KeyedEntry._readahead)


_Decoded = tuple[list[np.ndarray], np.ndarray]  # a chunk's columns, and which of its rows were valid


def _decoded_nbytes(decoded: _Decoded) -> int:
    return sum(column.nbytes for column in decoded[0])


def _holds_valid(rows: np.ndarray) -> Callable[[_Decoded], bool]:
    """Whether a decoded chunk saw every row of ``rows`` valid (else it is read again)."""
    return lambda decoded: bool(decoded[1][rows].all())


def keyed_chunk_rows(row_nbytes: int) -> int:
    """Rows per chunk: a power of two giving chunks of about 256 KiB, between 16 and 4096.

    Smaller than a dataset entry's 2 MiB: a batch finds its rows by content, scattered over
    the entry in the order they were first computed, and each row read decodes its chunk.
    """
    rows = max(1, KEYED_TARGET_CHUNK_BYTES // max(1, row_nbytes))
    rows = 1 << (rows.bit_length() - 1)
    rows = min(max(rows, 16), 4096)
    while rows > 1 and rows * row_nbytes > MAX_DEFAULT_CHUNK_BYTES:  # huge rows: fewer per chunk
        rows //= 2
    return rows


class KeyedEntry:
    """Content-addressed rows in one entry of a :class:`FeatureStore`.

    Args:
        store: the open feature store.
        entry: the entry (created by :meth:`open`).
        chunk_cache_bytes: budget for decoded chunks kept in memory (most recently used
            dropped first). Default 64 MiB.
    """

    def __init__(
        self,
        store: FeatureStore,
        entry: Entry,
        chunk_cache_bytes: int = CHUNK_CACHE_BYTES,
    ) -> None:
        self.store = store
        self.entry = entry
        self.name = entry.name
        self.output_specs = [spec for spec in entry.specs if spec.name != KEY]
        self._row_nbytes = sum(spec.row_nbytes for spec in self.output_specs)
        self._index: dict[bytes, int] = {}
        self._scanned = 0  # rows [0, _scanned) have been read into the index (or pending)
        self._pending: set[int] = set()  # scanned rows that were not valid yet
        self._access: dict[int, int] = {}  # chunk -> tick of its last use in this process
        self._ticks = itertools.count(1)
        self.chunk_cache_bytes = chunk_cache_bytes
        # Decoded chunks (chunk -> columns, valid rows), most recently used first out: rows are
        # found by content, often in the same order pass after pass, so MRU keeps a stable subset.
        self._chunks: BoundedCache[int, _Decoded] = BoundedCache(chunk_cache_bytes, "mru", _decoded_nbytes)
        self._broken: set[int] = set()  # chunks that failed to decode (logged once each)

    @classmethod
    def open(
        cls,
        store: FeatureStore,
        name: str,
        meta: Mapping[str, Any],
        output_specs: Sequence[ArraySpec],
        *,
        chunk_rows: int,
        compressor: Compressor,
    ) -> KeyedEntry:
        """Open the entry ``name``, creating it (with room for a few chunks) if needed."""
        entry = store.entry(name)
        if entry is None:
            entry = store.create_entry(
                name,
                meta,
                [KEY_SPEC, *output_specs],
                num_rows=4 * chunk_rows,
                chunk_rows=chunk_rows,
                compressor=compressor,
            )
        return cls(store, entry)

    # -- looking rows up -----------------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> np.ndarray:
        """The row of each key, or -1; catches up with other writers when a key is missing."""
        rows = np.fromiter((self._index.get(key, -1) for key in keys), dtype=np.int64, count=len(keys))
        if (rows < 0).any() and self._refresh():
            rows = np.fromiter((self._index.get(key, -1) for key in keys), dtype=np.int64, count=len(keys))
        return rows

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Read rows (no -1): a hit mask, and each output's rows for the hits, in order.

        Whole chunks are read (a batch found by content is scattered over the entry, and
        zarr's cost is per chunk) and kept decoded within ``chunk_cache_bytes``, each with
        the mask of its rows that were valid when it was read. ``valid`` is read after the
        bytes, in the same trip to zarr's I/O loop. A row is indexed only once valid, an
        indexed row never holds other bytes (rows are not reused), and its ``valid`` bit can
        only be cleared, by a pruner, before its bytes go: so a row valid after its bytes were
        read was valid throughout, and those bytes stay its key's output for good (a decoded
        chunk needs no second look). A row found invalid is a miss and leaves the index.
        """
        if len(rows) == 0:
            return np.zeros(0, dtype=bool), {}
        if rows.max() >= self.entry.num_rows:
            self._reload()
        unique, inverse = np.unique(rows, return_inverse=True)
        size = self.entry.chunk_rows
        chunks, where = np.unique(unique // size, return_inverse=True)
        offsets = unique - chunks[where] * size
        held: dict[int, _Decoded] = {}  # this read's chunks (the cache may push some out meanwhile)
        stale = []
        for position, chunk in enumerate(chunks.tolist()):
            needed = offsets[where == position]
            cached = self._chunks.get(chunk, current=_holds_valid(needed))
            if cached is None:
                stale.append(chunk)
            else:
                held[chunk] = cached
        if stale:
            stale += self._readahead(max(stale), size)
            arrays = [self.entry.arrays[spec.name] for spec in self.output_specs]
            spans = [(chunk * size, min((chunk + 1) * size, self.entry.num_rows)) for chunk in stale]
            try:
                fetched, valid = zarr.core.sync.sync(_read_then_check(arrays, self.entry.valid, spans))
            except Exception:  # a chunk that does not decode: find it, the others still serve
                fetched, valid = self._read_chunks_one_by_one(arrays, spans)
            for index, chunk in enumerate(stale):
                held[chunk] = (fetched[index], valid[index])
                self._chunks.put(chunk, held[chunk])
        ok = np.zeros(len(unique), dtype=bool)
        data = {
            spec.name: np.empty((len(unique), *spec.shape), dtype=spec.numpy_dtype)
            for spec in self.output_specs
        }
        for position, chunk in enumerate(chunks.tolist()):
            mine = np.flatnonzero(where == position)
            columns, mask = held[chunk]
            good = mine[mask[offsets[mine]]]
            ok[good] = True
            for spec, column in zip(self.output_specs, columns, strict=True):
                data[spec.name][good] = column[offsets[good]]
        data = {name: column[ok] for name, column in data.items()}
        self._touch(unique[ok])
        gone = set(unique[~ok].tolist())
        if gone:
            self._index = {key: row for key, row in self._index.items() if row not in gone}
        hit = ok[inverse]
        packed = np.cumsum(ok) - 1
        take = packed[inverse[hit]]
        return hit, {name: column[take] for name, column in data.items()}

    def _read_chunks_one_by_one(
        self, arrays: Sequence[zarr.Array[Any]], spans: Sequence[tuple[int, int]]
    ) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
        """Read each span alone; one that fails (torn, truncated, garbage) is all misses.

        Its rows are recomputed into new rows; an index maps a key to its newest row, so
        other processes find the new copies, not the broken chunk. Logged once per chunk.
        """
        fetched: list[list[np.ndarray]] = []
        valid: list[np.ndarray] = []
        for span in spans:
            try:
                columns, masks = zarr.core.sync.sync(_read_then_check(arrays, self.entry.valid, [span]))
                fetched.append(columns[0])
                valid.append(masks[0])
            except Exception as error:
                chunk = span[0] // self.entry.chunk_rows
                if chunk not in self._broken:
                    self._broken.add(chunk)
                    logger.warning(
                        "cachedfeatures: chunk %d of %s cannot be read (%s: %s); its rows are recomputed.",
                        chunk,
                        self.name,
                        type(error).__name__,
                        error,
                    )
                length = span[1] - span[0]
                fetched.append(
                    [np.zeros((length, *spec.shape), spec.numpy_dtype) for spec in self.output_specs]
                )
                valid.append(np.zeros(length, dtype=bool))
        return fetched, valid

    def _readahead(self, last: int, size: int) -> list[int]:
        """Up to READAHEAD chunks after ``last`` worth fetching in the same trip to zarr.

        Rows are stored in the order they were first computed, so a later pass in the same
        order wants the following chunks next. Only chunks with indexed rows, not decoded
        yet, and only while the chunk cache has room for them.
        """
        room = (self.chunk_cache_bytes - self._chunks.nbytes) // max(1, size * self._row_nbytes)
        chunks = range(last + 1, min(last + 1 + READAHEAD, -(-self._scanned // size)))
        return [chunk for chunk in chunks if chunk not in self._chunks][: max(0, room - 1)]

    # -- writing rows --------------------------------------------------------------------------

    def append(self, keys: Sequence[bytes], columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Store new rows (one per key) and return the rows they got."""
        count = len(keys)
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        start = self._reserve(count)
        rows = np.arange(start, start + count, dtype=np.int64)
        key_matrix = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(count, KEY_BYTES)
        self.entry.write(rows, {KEY: key_matrix, **columns})
        for key, row in zip(keys, rows.tolist(), strict=True):
            self._index[key] = row
        self._touch(rows)
        return rows

    def _reserve(self, count: int) -> int:
        """Hand out ``count`` fresh rows, growing the arrays when they are full."""
        with self.store.locks.entry(self.name):
            group = self._fresh_group()
            if NEXT_ROW not in group:
                group.create_array(
                    NEXT_ROW,
                    shape=(1,),
                    chunks=(1,),
                    dtype="int64",
                    fill_value=0,
                    dimension_names=(NEXT_ROW,),
                )
            counter = cast("zarr.Array[Any]", group[NEXT_ROW])
            start = int(np.asarray(counter[0]))
            meta = cast(dict[str, Any], group.attrs[ATTRS_KEY])
            capacity = int(meta["num_rows"])
            if start + count > capacity:
                size = self.entry.chunk_rows
                self._grow(group, max(2 * capacity, -(-(start + count) // size) * size))
            counter[0] = start + count
        if start + count > self.entry.num_rows:
            self._reload()
        return start

    def _grow(self, group: zarr.Group, capacity: int) -> None:
        """Resize every row array to ``capacity`` rows (under the entry lock)."""
        for spec in self.entry.specs:
            group[spec.name].resize((capacity, *spec.shape))  # type: ignore[union-attr]
        group[VALID].resize((capacity,))  # type: ignore[union-attr]
        if self.entry.records is not None:
            records = group[CHUNK_CRC]
            records.resize((-(-capacity // self.entry.chunk_rows), *records.shape[1:]))  # type: ignore[union-attr]
        meta = dict(group.attrs[ATTRS_KEY])  # type: ignore[arg-type]
        meta["num_rows"] = capacity
        group.attrs[ATTRS_KEY] = meta

    # -- the budget: pruning drops whole chunks, most recently used first ------------------------

    def nbytes_stored(self) -> int:
        return self.entry.nbytes_stored()

    def stats(self) -> np.ndarray:
        """Access statistics of this process, ``(chunks, 2)`` like an ``AccessLog``'s: column
        ``LAST`` orders the chunks by their last use here (a tick, not a time; 0: never), which
        is all a pruning plan needs to drop the most recently used first."""
        capacity = max(self.entry.num_chunks, -(-self._next_row() // self.entry.chunk_rows))
        stats = np.zeros((capacity, 2), dtype=np.float64)
        for chunk, tick in self._access.items():
            if chunk < capacity:
                stats[chunk, LAST] = tick
                stats[chunk, COUNT] = 1
        return stats

    def forget(self, chunk: int) -> None:
        """Forget a chunk dropped from the store (by a pruner of this process): its rows leave
        the index, its decoded copy the chunk cache."""
        rows = self.entry.chunk_rows
        start, stop = chunk * rows, (chunk + 1) * rows
        self._access.pop(chunk, None)
        self._chunks.discard(chunk)
        gone = range(start, stop)
        self._index = {key: row for key, row in self._index.items() if row not in gone}

    # -- keeping up with other processes ---------------------------------------------------------

    def _touch(self, rows: np.ndarray) -> None:
        tick = next(self._ticks)
        for chunk in np.unique(rows // self.entry.chunk_rows).tolist():
            self._access[chunk] = tick

    def _fresh_group(self) -> zarr.Group:
        return zarr.open_group(self.store.root.store, path=self.entry.group.path, mode="a")

    def _reload(self) -> None:
        entry = self.store.entry(self.name)
        if entry is not None:
            self.entry = entry

    def _next_row(self) -> int:
        try:
            counter = self.entry.group[NEXT_ROW]
        except KeyError:
            return 0
        return int(np.asarray(cast("zarr.Array[Any]", counter)[0]))

    def _refresh(self) -> bool:
        """Index rows other writers added (or validated) since the last look; True if any."""
        total = self._next_row()
        if total > self.entry.num_rows:
            self._reload()
        added = False
        if self._pending:
            # Rows reserved but not valid at the last look: a write in flight then. Look once
            # more; a row still invalid (pruned, or its writer died) is left for good, and
            # its key, if asked again, is recomputed into a new row.
            pending = np.array(sorted(self._pending), dtype=np.int64)
            self._pending.clear()
            now = np.asarray(self.entry.valid.oindex[pending], dtype=bool)
            if now.any():
                self._add(pending[now])
                added = True
        if total > self._scanned:
            rows = np.arange(self._scanned, total, dtype=np.int64)
            # valid first, keys after (one trip): a key is written before its valid bit.
            valid, keys = zarr.core.sync.sync(
                _valid_then_keys(self.entry.valid, self.entry.arrays[KEY], self._scanned, total)
            )
            self._pending.update(rows[~valid].tolist())
            for row, key in zip(rows[valid].tolist(), keys[valid], strict=True):
                self._index[key.tobytes()] = row
                added = True
            self._scanned = total
        return added

    def _add(self, rows: np.ndarray) -> None:
        keys = np.asarray(self.entry.arrays[KEY].oindex[rows])
        for row, key in zip(rows.tolist(), keys, strict=True):
            self._index[key.tobytes()] = row


async def _read_then_check(
    arrays: Sequence[zarr.Array[Any]], valid: zarr.Array[Any], spans: Sequence[tuple[int, int]]
) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """Row ``spans`` of every array (concurrently), then the same spans of ``valid``.

    The ``valid`` reads start only after every byte read finished: that order is what makes
    a row found valid safe to serve.
    """
    reads = [array._async_array.getitem(slice(*span)) for span in spans for array in arrays]
    flat = [np.asarray(column) for column in await asyncio.gather(*reads)]
    per_chunk = [flat[i : i + len(arrays)] for i in range(0, len(flat), len(arrays))]
    masks = await asyncio.gather(*(valid._async_array.getitem(slice(*span)) for span in spans))
    return per_chunk, [np.asarray(mask, dtype=bool) for mask in masks]


async def _valid_then_keys(
    valid: zarr.Array[Any], keys: zarr.Array[Any], start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, stop) of ``valid``, then of ``keys``: a key read after its valid bit is set
    is the durable one."""
    mask = np.asarray(await valid._async_array.getitem(slice(start, stop)), dtype=bool)
    return mask, np.asarray(await keys._async_array.getitem(slice(start, stop)))
