"""Whole chunks of an entry's arrays, read and written for :meth:`Entry.write`'s read-modify-write.

Every chunk write of the data path rewrites whole chunks (under the chunk's lock): each array's
chunk is read, the new rows merged in, and the chunk written back. Through zarr each of those
reads and writes is a round trip to zarr's event-loop thread and its codec pipeline, several
times the cost of the codec itself. For a plain array (:mod:`cachedfeatures.format.chunk_codecs`)
of a local store whose backend allows direct writes (:attr:`Backend.direct_writes
<cachedfeatures.store.backend.Backend.direct_writes>`), :class:`ChunkFiles` does the same in the
caller's thread: the file decoded with numcodecs, and the new chunk written to a temporary file
beside it and renamed into place, as zarr's ``LocalStore`` writes it (so a reader never sees a
torn file, and its ``stat`` signatures see a new file). Anything else goes through zarr
(:class:`ZarrChunks`), with the same two methods.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import zarr

from cachedfeatures.format.chunk_codecs import PlainCodecs
from cachedfeatures.store.backend import Backend

__all__ = ["ChunkFiles", "WholeChunks", "ZarrChunks", "whole_chunks"]


class WholeChunks(Protocol):
    """One array's row chunks read and written whole: the rows of a chunk within the array."""

    def read(self, chunk: int) -> np.ndarray:
        """The rows of ``chunk`` (fewer in a last partial chunk), as an array of the caller's."""
        ...

    def write(self, chunk: int, rows: np.ndarray) -> None:
        """Replace the rows of ``chunk`` with ``rows`` (all of them)."""
        ...


class ZarrChunks:
    """:class:`WholeChunks` through zarr (any store, any codecs)."""

    def __init__(self, array: zarr.Array[Any]) -> None:
        self.array = array
        self.chunk_rows = int(array.chunks[0])

    def _bounds(self, chunk: int) -> slice:
        start = chunk * self.chunk_rows
        return slice(start, min(start + self.chunk_rows, int(self.array.shape[0])))

    def read(self, chunk: int) -> np.ndarray:
        return np.array(self.array[self._bounds(chunk)])

    def write(self, chunk: int, rows: np.ndarray) -> None:
        self.array[self._bounds(chunk)] = rows


class ChunkFiles:
    """:class:`WholeChunks` as files of a local store, bypassing zarr (see the module)."""

    def __init__(self, array: zarr.Array[Any], root: Path, codecs: PlainCodecs) -> None:
        self.array = array
        self.root = root
        self.codecs = codecs
        self.chunk_rows = codecs.chunk_shape[0]
        self.num_rows = int(array.shape[0])

    @classmethod
    def maybe(cls, array: zarr.Array[Any], backend: Backend) -> ChunkFiles | None:
        """Direct chunk files of ``array``, where its store and codecs allow them."""
        if backend.root is None or not backend.direct_writes or array.store.read_only:
            return None
        codecs = PlainCodecs.of(array)
        return None if codecs is None else cls(array, backend.root, codecs)

    def path(self, chunk: int) -> Path:
        return self.root / self.codecs.key(chunk)

    def read(self, chunk: int) -> np.ndarray:
        path = self.path(chunk)
        try:
            stored = path.read_bytes()
        except FileNotFoundError:  # as zarr reads it: the fill value
            data = self.codecs.filled()
        else:
            data = self.codecs.decode(stored, str(path))
        native = data.dtype.newbyteorder("=")  # as zarr returns it, so checksums of rows agree
        return data[: self._rows_in(chunk)].astype(native, copy=False)

    def write(self, chunk: int, rows: np.ndarray) -> None:
        count = self._rows_in(chunk)
        if len(rows) != count:
            raise ValueError(f"chunk {chunk} of {self.array.path} has {count} rows; got {len(rows)}")
        if self.codecs.nbytes == 0:  # rows of no values: zarr stores no file for such a chunk
            return
        if count == self.chunk_rows:
            whole = rows
        else:  # a last partial chunk is stored whole, the rows past the array's end filled
            whole = self.codecs.filled()
            whole[:count] = rows
        body = self.codecs.encode(whole)
        path = self.path(chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")  # as zarr names them
        try:
            with open(temporary, "wb") as file:
                file.write(body)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def _rows_in(self, chunk: int) -> int:
        return max(0, min(self.chunk_rows, self.num_rows - chunk * self.chunk_rows))


def whole_chunks(array: zarr.Array[Any], backend: Backend) -> WholeChunks:
    """The fastest :class:`WholeChunks` of ``array``: its chunk files where allowed, else zarr."""
    files = ChunkFiles.maybe(array, backend)
    return files if files is not None else ZarrChunks(array)
