"""One array's chunk files mapped side by side into one address range: a memmap of the entry.

A process that reads an entry which fits its chunk cache holds the whole entry, one array per
column (see :class:`~cachedfeatures.reader.chunk_reader.ChunkReader`). For raw (uncompressed)
chunks, copying every chunk into fresh memory is most of the cost of the first epoch of a new
process: the bytes are in the page cache already. A :class:`MappedColumn` instead reserves one
read-only range of address space for the whole array and maps each chunk file into its place in
it (``mmap`` with ``MAP_FIXED``), so the column is one NumPy array whose rows are the page
cache's: a batch is one gather, as from a memmap, and nothing is copied up front.

A chunk read often (one and a half times its rows: the second epoch) is copied into private memory in
its place (:meth:`MappedColumn.copy_in`): from then on no batch needs to check its file, and the
copy into fresh memory is paid once the first epoch is over instead of in it.

Places of chunks not mapped hold zero pages (never read for a valid row: the reader serves
only rows of chunks it has mapped and checked). A chunk's place is remapped when its file is
replaced and returned to zero pages when the chunk is dropped.

Only for chunks whose byte size is a whole number of pages (the mapping of each chunk must
start on a page), on Linux and macOS; :meth:`MappedColumn.create` returns ``None`` elsewhere.
A mapped file's bytes are the file's current bytes: the reader checks each mapped chunk file's
version (``stat``) around every gather, so a file changed or truncated in place is not served
(see :mod:`cachedfeatures.reader.chunk_reader`).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import weakref
from typing import Any

import numpy as np

__all__ = ["MappedColumn", "can_map"]

_PROT_READ = 0x1
_PROT_WRITE = 0x2
_MAP_SHARED = 0x01
_MAP_PRIVATE = 0x02
_MAP_FIXED = 0x10  # the same value on Linux and macOS
_MAP_ANONYMOUS = getattr(mmap, "MAP_ANONYMOUS", 0x20)


def _libc() -> Any:
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int64,
        ]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()
_FAILED = ctypes.c_void_p(-1).value


def can_map(chunk_nbytes: int) -> bool:
    """Whether chunks of ``chunk_nbytes`` bytes can be mapped side by side here."""
    return _LIBC is not None and chunk_nbytes > 0 and chunk_nbytes % mmap.PAGESIZE == 0


def _unmap(address: int, size: int) -> None:
    _LIBC.munmap(address, size)


class MappedColumn:
    """``num_chunks`` chunks of ``chunk_shape`` (``dtype``) side by side in one mapped range.

    :attr:`array` is the column as one array of ``num_rows`` rows; it keeps the range mapped
    while any view of it lives (the range is unmapped when the last one goes).
    """

    def __init__(
        self, num_chunks: int, num_rows: int, chunk_shape: tuple[int, ...], dtype: np.dtype[Any]
    ) -> None:
        self.chunk_nbytes = int(np.prod(chunk_shape, dtype=np.int64)) * dtype.itemsize
        if not can_map(self.chunk_nbytes):
            raise ValueError(
                f"Expected a chunk size that is a whole number of pages. Got {self.chunk_nbytes}."
            )
        self.size = num_chunks * self.chunk_nbytes
        address = _LIBC.mmap(None, self.size, _PROT_READ, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
        if address is None or address == _FAILED:
            raise OSError(ctypes.get_errno(), "cannot reserve address space for a mapped column")
        self.address: int = address
        buffer = (ctypes.c_char * self.size).from_address(address)
        buffer.owner = self  # type: ignore[attr-defined]  # views of the array keep the range mapped
        rows = np.frombuffer(memoryview(buffer), dtype=dtype).reshape(
            num_chunks * chunk_shape[0], *chunk_shape[1:]
        )
        rows.flags.writeable = False  # the pages are read-only
        self.array = rows[:num_rows]
        self.rows = rows  # every chunk's place, the last one whole
        weakref.finalize(self, _unmap, address, self.size)

    @classmethod
    def create(
        cls, num_chunks: int, num_rows: int, chunk_shape: tuple[int, ...], dtype: np.dtype[Any]
    ) -> MappedColumn | None:
        """A mapped column, or ``None`` where chunks of this size cannot be mapped here."""
        nbytes = int(np.prod(chunk_shape, dtype=np.int64)) * dtype.itemsize
        if num_chunks == 0 or not can_map(nbytes):
            return None
        try:
            return cls(num_chunks, num_rows, chunk_shape, dtype)
        except OSError:
            return None

    def map(self, chunk: int, fd: int) -> None:
        """Map the first bytes of open file ``fd`` (a chunk file) into ``chunk``'s place."""
        self._place(chunk, _MAP_SHARED | _MAP_FIXED, fd)

    def copy_in(self, chunk: int, fd: int) -> None:
        """Put private memory in ``chunk``'s place, holding the first bytes of file ``fd``.

        The place holds zeros if this raises (never served: the chunk is not accepted then).
        """
        self._place(chunk, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED, -1, _PROT_READ | _PROT_WRITE)
        at = self.address + chunk * self.chunk_nbytes
        view = memoryview((ctypes.c_char * self.chunk_nbytes).from_address(at)).cast("B")
        done = 0
        while done < self.chunk_nbytes:
            count = os.preadv(fd, [view[done:]], done)
            if not count:
                raise ValueError(f"a mapped chunk file ended after {done} bytes")
            done += count

    def clear(self, chunk: int) -> None:
        """Put zero pages back in ``chunk``'s place (dropping the map of its file)."""
        self._place(chunk, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED, -1)

    def _place(self, chunk: int, flags: int, fd: int, prot: int = _PROT_READ) -> None:
        at = self.address + chunk * self.chunk_nbytes
        found = _LIBC.mmap(at, self.chunk_nbytes, prot, flags, fd, 0)
        if found != at:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
