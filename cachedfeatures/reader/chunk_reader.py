"""Chunk-aware reads of an entry, with a bounded per-process cache of decoded chunks.

Zarr reads whole chunks, and one zarr call per row (or per random batch) costs far more than
the bytes it returns. A :class:`ChunkReader` groups the requested rows by chunk, reads each
needed chunk once per batch, and gathers the rows from it (always copying: callers never see
the reader's buffers). Decoded chunks stay in memory within a byte budget, in one of two ways:

- when the whole entry fits the budget, in one array per column, filled chunk by chunk as
  chunks are first read (``_Dense``): a batch is then one gather per column, like a memmap.
  Large raw local chunks are mapped into their places rather than copied
  (:mod:`cachedfeatures.reader.mapped`; each batch checks every mapped file it reads with one
  ``fstat``, so a file changed or truncated in place since is never read), and copied into
  private memory once read often; checksums are verified once per chunk file version on the
  machine (:mod:`cachedfeatures.reader.verified`). Compressed chunks a batch needs are decoded
  side by side in a few threads (a new process's first shuffled batch needs every chunk),
  each accepted only as a single read would be (see :meth:`ChunkReader._load_all`);
- where it does not fit and rows past the cache would cost more than a gather to read again
  (some array is compressed, or read through zarr), the same way in a scratch file on local disk
  (:mod:`cachedfeatures.reader.scratch`: page cache, not this process's memory), each chunk
  decoded into it once;
- otherwise in a :class:`ChunkCache` (a :class:`~cachedfeatures.reader.bounded_cache.BoundedCache`
  with policy ``"lru"``: a batch's neighbours are read again soon) of decoded chunks (raw
  local chunks are held there as open files, read row by row with ``pread``: they cost page
  cache, not this process's memory; never memory-mapped, so a chunk file changed or truncated
  in place is a miss, never wrong bytes or a ``SIGBUS``. Small raw chunks, such as a chunk
  of labels, are read into memory instead: a ``pread`` per row costs more than their bytes).

Two routes read a chunk:

- ``"auto"`` (the default) reads chunk files of a local store directly (where the entry's
  :class:`~cachedfeatures.store.backend.Backend` allows ``direct_reads``) when an array's codecs
  are plain (``bytes``, optionally followed by one of Blosc, Zstd or Gzip): raw chunks are
  read as they are, compressed chunks are decoded with numcodecs. Arrays it
  cannot read this way (strings, sharding, other codecs, other stores) take the zarr route.
- ``"zarr"`` reads every chunk through plain zarr (``array[start:stop]``).

Correctness follows the entry's protocol: a row is served only if ``valid`` is set and the
bytes served were read while it was. Each cached chunk carries a *signature* of its ``valid``
chunk taken before and after its bytes were read (for a local store whose backend allows
``direct_reads``, see :mod:`cachedfeatures.store.backend`: the chunk file's inode,
size and times; zarr's ``LocalStore`` replaces a chunk file by renaming a new one into place,
so every write changes it; elsewhere: the encoded bytes of the ``valid`` chunk). Every batch
checks the signatures of its chunks again, and a chunk whose signature changed (a write, a
prune) is read again. A cached chunk is therefore only ever served for rows whose ``valid``
bit is set now. On a local store that check is usually one ``stat`` of the ``valid``
directory per batch, not one per chunk (see :mod:`cachedfeatures.reader.signatures`).
On a local store the bytes served are also the ones written when it was set; on other stores
a chunk pruned and refilled between two reads, leaving ``valid`` as it was, may be served from
the cache as first read: the same entry (same fingerprints) refills the same features, so this
only shows with a nondeterministic module.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import google_crc32c
import numpy as np
import zarr
import zarr.codecs
from torch.utils.data import get_worker_info

from cachedfeatures.format import chunk_identity
from cachedfeatures.format.chunk_codecs import PlainCodecs
from cachedfeatures.format.chunk_identity import IdentityMismatchError
from cachedfeatures.format.chunk_keys import chunk_key
from cachedfeatures.format.ragged import RaggedChunk, pack_padded
from cachedfeatures.parse import parse_choice, parse_int
from cachedfeatures.reader.bounded_cache import BoundedCache
from cachedfeatures.reader.mapped import MappedColumn
from cachedfeatures.reader.scratch import Scratch, spill_directory
from cachedfeatures.reader.signatures import ValidSignatures
from cachedfeatures.reader.verified import VERIFIED_SUFFIX, FileVersion, VerifiedLog, file_version
from cachedfeatures.units import physical_memory_bytes

if TYPE_CHECKING:
    from cachedfeatures.store.feature_store import Entry
    from cachedfeatures.store.ragged import RaggedArray

__all__ = [
    "CacheInfo",
    "ChunkCache",
    "ChunkReader",
    "ReadRoute",
    "RowsRead",
    "default_chunk_cache_bytes",
    "parse_read_route",
]

logger = logging.getLogger(__name__)

ReadRoute = Literal["auto", "zarr"]
READ_ROUTES: tuple[ReadRoute, ...] = ("auto", "zarr")
# Share of physical memory a process's decoded-chunk cache may use by default; DataLoader
# workers split it between them.
DEFAULT_CACHE_FRACTION = 0.125


@dataclass(frozen=True)
class CacheInfo:
    """Counters of a reader's chunk cache: chunks served from it and chunks (re)read."""

    hits: int
    misses: int
    chunks: int
    nbytes: int
    max_bytes: int
    maps: int
    evictions: int = 0  # chunks pushed out to make room
    spilled: int = 0  # bytes of decoded chunks held in a scratch file (page cache), not in memory


def default_chunk_cache_bytes() -> int:
    """An eighth of physical memory, split between DataLoader workers when called in one."""
    info = get_worker_info()
    workers = info.num_workers if info is not None else 1
    return int(physical_memory_bytes() * DEFAULT_CACHE_FRACTION) // max(1, workers)


def parse_read_route(route: object) -> ReadRoute:
    return parse_choice("read_route", route, READ_ROUTES)


def parse_cache_bytes(value: object) -> int | None:
    if value is None:
        return None
    what = "an int >= 0 (0 disables the cache) or None"
    return parse_int("chunk_cache_bytes", value, minimum=0, what=what)


@dataclass(frozen=True)
class RowsRead:
    """What a read found: ``hit[i]`` for each requested row, and the arrays of the hits.

    ``arrays[name]`` holds one row per hit, in the order of the requested indices.
    ``chunks`` holds the distinct chunks of the requested rows, ascending, when the reader
    already knew them (it groups rows by chunk), so later steps need not find them again.
    """

    hit: np.ndarray
    arrays: Mapping[str, np.ndarray]
    chunks: np.ndarray | None = None

    @functools.cached_property
    def hits(self) -> int:
        """How many requested rows were hits (counted once: every batch asks)."""
        return int(np.count_nonzero(self.hit))

    @property
    def all_hit(self) -> bool:
        return self.hits == len(self.hit)

    def hit_chunks(self, rows: np.ndarray, chunk_rows: int) -> np.ndarray:
        """The distinct chunks the hits among ``rows`` (the rows read) came from, ascending."""
        if self.chunks is not None and self.all_hit:
            return self.chunks
        return np.unique(rows[self.hit] // chunk_rows)


# ---------------------------------------------------------------------------------------
# The cache


@dataclass(frozen=True)
class _Chunk:
    """One chunk as read: its ``valid`` signature and mask, and each array's rows."""

    signature: Hashable
    valid: np.ndarray
    arrays: Mapping[str, np.ndarray | _RawRows | RaggedChunk]
    nbytes: int  # what it costs in this process's memory (open raw files cost nothing here)
    maps: int  # how many arrays are raw chunk files held open (each holds a file descriptor)


class ChunkCache(BoundedCache[int, _Chunk]):
    """The reader's cache of decoded chunks: a :class:`BoundedCache`, least recently used
    first out, that never holds more than ``max_bytes``.

    Raw chunk files held open live in the OS page cache, not in this process's memory, so they
    cost only their ``valid`` mask here; their number is bounded by ``max_maps`` instead,
    since each map holds a file descriptor. ``batch`` (the cache's ``tick``) counts reads, so
    that chunks a recent batch used are never pushed out to make a private copy (see
    :meth:`room_for`).
    """

    max_bytes: int

    def __init__(self, max_bytes: int, max_maps: int) -> None:
        super().__init__(max_bytes, "lru", _chunk_nbytes)
        self.max_maps = max_maps
        self.maps = 0

    @property
    def batch(self) -> int:
        return self.tick

    @batch.setter
    def batch(self, value: int) -> None:
        self.tick = value

    def room_for(self, nbytes: int) -> bool:
        """Make room for ``nbytes`` more by dropping only chunks that neither this batch nor the
        one before used; whether there is room now. (A private copy of a chunk read row by row
        is worth it for reads with locality, never at the cost of thrashing a shuffled read.)
        Where dropping those would not make room, nothing is dropped."""
        if self.max_bytes is None:
            return True
        with self._lock:
            free = self.max_bytes - self.nbytes
            for item in self._items.values():  # least recently used first
                if free >= nbytes:
                    break
                if item.used >= self.tick - 1:
                    return False
                free += item.nbytes
            if free < nbytes:
                return False
        return self.make_room(nbytes, spare_since=self.tick - 1)

    def put(self, key: int, value: _Chunk, nbytes: int | None = None, version: Hashable = None) -> bool:
        """As :meth:`BoundedCache.put`; a chunk put is one this batch reads (so
        :meth:`room_for` spares it as it spares chunks it found)."""
        kept = super().put(key, value, nbytes, version)
        if kept:
            with self._lock:
                item = self._items.get(key)
                if item is not None:
                    item.used = self.tick
        return kept

    def _never_fits(self, nbytes: int, value: _Chunk) -> bool:
        return super()._never_fits(nbytes, value) or value.maps > self.max_maps

    def _over(self, nbytes: int, value: _Chunk) -> bool:
        return super()._over(nbytes, value) or self.maps + value.maps > self.max_maps

    def _added(self, value: _Chunk) -> None:
        self.maps += value.maps

    def _removed(self, value: _Chunk) -> None:
        self.maps -= value.maps


def _chunk_nbytes(chunk: _Chunk) -> int:
    return chunk.nbytes


# ---------------------------------------------------------------------------------------
# Reading one array's chunk


# Raises unless the rows given (all of one chunk of one array, decoded) were written for it.
RowCheck = Callable[[np.ndarray], None]

# Raw chunks of at least this many bytes are used from their files: mapped where the entry is
# held whole, held open in the chunk cache otherwise. Smaller ones are copied into memory: they
# cost little to copy, and each file in use costs a stat per batch (and, held open, a pread per row).
MIN_MAPPED_CHUNK_BYTES = 1 << 16
# Mapped chunks copied into private memory per batch, once read often (see _copy_in_read_often).
COPY_IN_PER_BATCH = 4


@dataclass(frozen=True)
class _Identity:
    """What one array's rows of one chunk must match: the crc32c bound to the chunk's identity
    (:mod:`cachedfeatures.format.chunk_identity`); ``accepted`` is ``None`` in entries without
    such checksums (then every crc is accepted)."""

    entry: str
    array: str
    chunk: int
    accepted: np.ndarray | None

    def crc(self, rows: np.ndarray) -> int:
        return chunk_identity.content_crc(self.entry, self.array, self.chunk, rows)

    def accept(self, crc: int) -> None:
        """Raise :class:`IdentityMismatchError` unless ``crc`` is one the entry accepts."""
        if self.accepted is not None and crc not in (int(self.accepted[0]), int(self.accepted[1])):
            raise IdentityMismatchError(
                f"chunk {self.chunk} of {self.entry}/{self.array} holds rows that were not written "
                "for it (a chunk file from another chunk or entry, or changed after writing)"
            )


class _ChunkFile:
    """Reads one array's chunks straight from a local store's chunk files.

    Built only for arrays whose chunks are ``bytes`` (any endianness), optionally followed by
    one Blosc, Zstd or Gzip codec, optionally followed by a ``crc32c`` checksum, which is
    verified on every read; :meth:`maybe` returns ``None`` for anything else.
    """

    def __init__(
        self, array: zarr.Array[Any], root: str, dtype: np.dtype[Any], decoder: Any, checksum: bool = False
    ) -> None:
        self.array = array
        self.root = root
        self.dtype = dtype
        self.decoder = decoder
        self.checksum = checksum
        # Raw checksummed chunks: the file versions (inode, size, mtime) whose crc32c this process
        # has verified; later loads of the same version are held open without a re-read.
        self._verified: dict[int, tuple[int, int, int]] = {}
        self.chunk_shape: tuple[int, ...] = tuple(array.chunks)
        self.nbytes = int(np.prod(self.chunk_shape, dtype=np.int64)) * dtype.itemsize
        self._paths: dict[int, str] = {}
        self._keys: dict[int, str] = {}
        # The chunk file versions verified on this machine (set by the reader; None: none kept).
        self.log: VerifiedLog | None = None
        self._scratch = threading.local()  # a buffer per thread for compressed chunk bytes

    @classmethod
    def maybe(cls, array: zarr.Array[Any], root: str | os.PathLike[str] | None) -> _ChunkFile | None:
        """A direct reader of ``array``'s chunk files under the store directory ``root``, where
        one can read them: a plain array (:mod:`cachedfeatures.format.chunk_codecs`) and a
        ``root`` (``None`` where the store's backend rules it out)."""
        codecs = None if root is None else PlainCodecs.of(array)
        if root is None or codecs is None:
            return None
        return cls(array, os.fspath(root), codecs.dtype, codecs.compressor, codecs.checksum)

    def path(self, chunk: int) -> str:
        path = self._paths.get(chunk)
        if path is None:
            path = self._paths[chunk] = os.path.join(self.root, self.key(chunk))
        return path

    def key(self, chunk: int) -> str:
        """The store key of ``chunk``'s file."""
        key = self._keys.get(chunk)
        if key is None:
            key = self._keys[chunk] = chunk_key(self.array.path, chunk, len(self.chunk_shape))
        return key

    def mappable(self, dtype: np.dtype[Any], chunk_rows: int) -> bool:
        """Whether this array's chunks can be mapped as rows of ``dtype``, ``chunk_rows`` each."""
        return (
            self.decoder is None
            and self.dtype == dtype
            and self.chunk_shape[0] == chunk_rows
            and self.nbytes >= MIN_MAPPED_CHUNK_BYTES
        )

    def map_into(self, chunk: int, column: MappedColumn, identity: _Identity, name: str) -> _MappedFile:
        """Map raw chunk ``chunk``'s file into its place in ``column``, verified; the file, held
        open at the version verified (to check it before each gather).

        Verified once per version of the file on this machine (see
        :mod:`cachedfeatures.reader.verified`): the crc32c of the mapped bytes against the
        file's, and the crc of its rows bound to the chunk's identity, both read from the page
        cache. A missing file raises (a mapped place holds no fill values).
        """
        path = self.path(chunk)
        expected = self.nbytes + (4 if self.checksum else 0)
        fd = os.open(path, os.O_RDONLY)
        try:
            version = file_version(os.fstat(fd))
            if version[2] != expected:
                raise ValueError(f"raw chunk {path} holds {version[2]} bytes; expected {expected}")
            column.map(chunk, fd)
            start = chunk * self.chunk_shape[0]
            rows = column.rows[start : start + self.chunk_shape[0]]
            key = self.key(chunk)
            crc = None if self.log is None else self.log.vouched(key, version)
            if crc is None:
                if self.checksum:
                    stored = os.pread(fd, 4, self.nbytes)
                    payload = rows.reshape(-1).view(np.uint8)
                    if len(stored) != 4 or google_crc32c.value(payload) != int.from_bytes(stored, "little"):
                        raise ValueError(
                            f"chunk {path} fails its crc32c checksum: its bytes changed after writing"
                        )
                crc = identity.crc(rows[: self.rows_in(chunk)])
                identity.accept(crc)
                if file_version(os.fstat(fd)) != version:
                    raise ValueError(f"raw chunk {path} changed in place while it was verified")
                if self.log is not None:
                    self.log.record(key, version, crc)
            else:
                identity.accept(crc)
        except BaseException:
            os.close(fd)
            column.clear(chunk)
            raise
        return _MappedFile(fd, path, version, name)

    def decode_into(self, chunk: int, target: np.ndarray, identity: _Identity) -> bool:
        """Decode compressed chunk ``chunk`` straight into ``target`` (the whole chunk, C order),
        verified; ``False`` (nothing done) where ``target`` cannot take it.

        The file's bytes go into a buffer this thread reuses, the decoder writes into
        ``target``: no fresh memory per chunk. Both checks are skipped for a file version this
        machine verified already (the recorded identity crc is still checked against the
        entry's accepted ones).
        """
        decoder = self.decoder
        if (
            decoder is None
            or target.nbytes != self.nbytes
            or target.dtype != self.dtype
            or not target.flags.c_contiguous
        ):
            return False
        path = self.path(chunk)
        try:
            file = open(path, "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError:  # as zarr reads it: fill values (an array of empty rows has no
            target[...] = self.array.fill_value  # file; a lost one is the CheckedReader's to find)
            return True
        with file:
            version = file_version(os.fstat(file.fileno()))
            size = version[2]
            buffer = getattr(self._scratch, "buffer", None)
            if buffer is None or len(buffer) < size:
                buffer = self._scratch.buffer = bytearray(max(size, 1 << 16))
            view = memoryview(buffer)[:size]
            done = 0
            while done < size:
                count = file.readinto(view[done:])
                if not count:
                    raise ValueError(f"chunk {path} ended after {done} bytes")
                done += count
            # A change in place before or while we read has changed the file's times by now.
            if file_version(os.fstat(file.fileno())) != version:
                raise ValueError(f"chunk {path} changed in place while it was read")
        key = self.key(chunk)
        crc = None if self.log is None else self.log.vouched(key, version)
        payload = view
        if self.checksum:
            if size < 4:
                raise ValueError(f"chunk {path} holds {size} bytes: too short for its checksum")
            payload = view[:-4]
            if crc is None:
                body = np.frombuffer(payload, dtype=np.uint8)
                body.flags.writeable = False  # google_crc32c takes read-only buffers only
                if google_crc32c.value(body) != int.from_bytes(view[-4:], "little"):
                    raise ValueError(
                        f"chunk {path} fails its crc32c checksum: its bytes changed after writing"
                    )
        decoder.decode(payload, out=target.reshape(-1).view(np.uint8))
        if crc is None:
            crc = identity.crc(target[: self.rows_in(chunk)])
            identity.accept(crc)
            if self.log is not None:
                self.log.record(key, version, crc)
        else:
            identity.accept(crc)
        return True

    def read(self, chunk: int, check: RowCheck | None = None) -> np.ndarray:
        """The whole chunk, decoded into memory of this process (never a map of the file).

        A missing chunk file holds only the fill value (zarr deletes such chunks). ``check``
        is called on the chunk's rows (of a file that exists) before they are returned.
        """
        path = self.path(chunk)
        try:
            with open(path, "rb") as file:
                stored = file.read()
        except FileNotFoundError:
            return self._filled()
        payload: Any = _verified(stored, path) if self.checksum else stored
        if self.decoder is not None:
            payload = self.decoder.decode(payload)
        data = np.frombuffer(payload, dtype=self.dtype)
        if data.size * self.dtype.itemsize != self.nbytes:
            raise ValueError(f"chunk {path} decodes to {data.nbytes} bytes; expected {self.nbytes}")
        data = data.reshape(self.chunk_shape)
        if check is not None:
            check(data[: self.rows_in(chunk)])
        return data

    def rows_in(self, chunk: int) -> int:
        """Rows of the array in ``chunk`` (the last chunk may be partial)."""
        rows = self.chunk_shape[0]
        return min(rows, int(self.array.shape[0]) - chunk * rows)

    def open_rows(self, chunk: int, check: RowCheck | None = None) -> _RawRows | np.ndarray:
        """The chunk for the chunk cache: a raw chunk file held open (rows read on demand, see
        :class:`_RawRows`), else the decoded chunk. A raw chunk smaller than
        ``MIN_MAPPED_CHUNK_BYTES`` (labels, ids) is read into memory instead: a ``pread`` per
        row would cost more than the bytes it keeps out of the cache.

        A raw chunk's checksum is verified once per version of its file (inode, size, mtime).
        """
        if self.decoder is not None or self.nbytes < MIN_MAPPED_CHUNK_BYTES:
            return self.read(chunk, check)
        path = self.path(chunk)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return self._filled()
        try:
            expected = self.nbytes + (4 if self.checksum else 0)
            stat = os.fstat(fd)
            if stat.st_size != expected:
                raise ValueError(f"raw chunk {path} holds {stat.st_size} bytes; expected {expected}")
            version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if (self.checksum or check is not None) and self._verified.get(chunk) != version:
                stored = os.pread(fd, expected, 0)
                if self.checksum:
                    _verified(stored, path)
                if check is not None:
                    count = self.rows_in(chunk) * (self.nbytes // self.dtype.itemsize // self.chunk_shape[0])
                    check(np.frombuffer(stored, self.dtype, count).reshape(-1, *self.chunk_shape[1:]))
                self._verified[chunk] = version
            return _RawRows(fd, path, version, self.dtype, self.chunk_shape)
        except BaseException:
            os.close(fd)
            raise

    def read_into(
        self, chunk: int, target: np.ndarray, check: RowCheck | None = None, identity: _Identity | None = None
    ) -> None:
        """Copy the chunk's first ``len(target)`` rows into ``target`` (C-contiguous).

        A raw chunk is read straight into ``target``: one copy out of the page cache, with no
        map to fault in page by page. A checksummed one is verified on the bytes as they
        landed in ``target``, so the bytes checked are the bytes served. Given ``identity``
        (the same check as ``check``), a whole raw chunk is verified once per version of its
        file on this machine (see :mod:`cachedfeatures.reader.verified`).
        """
        whole = target.nbytes == self.nbytes
        if (
            self.decoder is not None
            or (self.checksum and not whole)  # the checksum covers the whole chunk
            or target.dtype != self.dtype
            or not target.flags.c_contiguous
        ):
            target[...] = self.read(chunk, check)[: len(target)]
            return
        path = self.path(chunk)
        try:
            file = open(path, "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError:
            target[...] = self.array.fill_value
            return
        if check is not None and len(target) != self.rows_in(chunk):
            file.close()
            target[...] = self.read(chunk, check)[: len(target)]
            return
        expected = self.nbytes + (4 if self.checksum else 0)
        log = self.log if identity is not None and whole else None
        crc: int | None = None
        with file:
            version = file_version(os.fstat(file.fileno()))
            size = version[2]
            if size != expected:
                raise ValueError(f"raw chunk {path} holds {size} bytes; expected {expected}")
            payload = target.reshape(-1).view(np.uint8)
            view = memoryview(payload.data)
            done = 0
            while done < len(view):  # one read from the page cache, no intermediate copy
                count = file.readinto(view[done:])
                if not count:
                    raise ValueError(f"raw chunk {path} ended after {done} bytes")
                done += count
            crc = None if log is None else log.vouched(self.key(chunk), version)
            if self.checksum and crc is None:
                stored = file.read(4)
                payload = payload.view()
                payload.flags.writeable = False  # google_crc32c takes read-only buffers only
                if len(stored) != 4 or google_crc32c.value(payload) != int.from_bytes(stored, "little"):
                    raise ValueError(
                        f"chunk {path} fails its crc32c checksum: its bytes changed after writing"
                    )
            # A change in place before or while we read has changed the file's times by now.
            if log is not None and file_version(os.fstat(file.fileno())) != version:
                raise ValueError(f"raw chunk {path} changed in place while it was read")
        if log is not None and identity is not None:
            if crc is None:
                crc = identity.crc(target[: self.rows_in(chunk)])
                identity.accept(crc)
                log.record(self.key(chunk), version, crc)
            else:
                identity.accept(crc)
        elif check is not None:
            check(target)

    def _filled(self) -> np.ndarray:
        return np.full(self.chunk_shape, self.array.fill_value, dtype=self.dtype)

    def read_values(self, path: str, total: int, ragged: RaggedArray) -> np.ndarray:
        """The values array of one row chunk of a ragged array (whose offsets this file reads,
        written with the same codecs), from its one chunk file at ``path``: ``total`` values.

        A missing file with ``total > 0`` raises (never read as fill values).
        """
        spec = ragged.spec
        dtype = spec.numpy_dtype
        if dtype.itemsize > 1:
            dtype = dtype.newbyteorder("<")
        if total == 0:
            return np.empty((0, *spec.shape), dtype=dtype)
        with open(path, "rb") as file:
            stored = file.read()
        payload: Any = _verified(stored, path) if self.checksum else stored
        if self.decoder is not None:
            payload = self.decoder.decode(payload)
        data = np.frombuffer(payload, dtype=dtype)
        expected = total * int(np.prod(spec.shape, dtype=np.int64))
        if data.size != expected:
            raise ValueError(f"ragged values {path} hold {data.size} values; its offsets need {expected}")
        return data.reshape(total, *spec.shape)


def _verified(stored: bytes, path: str) -> np.ndarray:
    """The payload of a chunk that ends in its crc32c (little-endian), if the checksum holds."""
    if len(stored) < 4:
        raise ValueError(f"chunk {path} holds {len(stored)} bytes: too short for its checksum")
    payload = np.frombuffer(stored, dtype=np.uint8)[:-4]  # a read-only view, no copy
    if google_crc32c.value(payload) != int.from_bytes(stored[-4:], "little"):
        raise ValueError(f"chunk {path} fails its crc32c checksum: its bytes changed after writing")
    return payload


class _MappedFile:
    """A chunk file mapped into a :class:`MappedColumn`, held open to check its version."""

    def __init__(self, fd: int, path: str, version: FileVersion, array: str) -> None:
        self.fd = fd
        self.path = path
        self.array = array  # the entry's array (its MappedColumn) it is mapped into
        self.version = version
        _, _, self.size, self.mtime, self.ctime = version
        self._close = weakref.finalize(self, os.close, fd)

    def changed(self) -> bool:
        """Whether the file changed in place (size or times) since it was verified."""
        st = os.fstat(self.fd)
        return st.st_mtime_ns != self.mtime or st.st_ctime_ns != self.ctime or st.st_size != self.size

    def close(self) -> None:
        self._close()


class _RawRows:
    """A raw chunk file held open by the chunk cache; rows are read from it with ``pread``.

    Never a memory map: a file changed in place under a map serves its new bytes, and one
    truncated under a map kills the process with ``SIGBUS``. Every gather checks the file's
    version (inode, size, mtime) before and after reading against the version verified when it
    was opened: a file changed in place (zarr only ever renames new chunk files into place)
    raises, and its rows become misses.
    """

    def __init__(
        self, fd: int, path: str, version: tuple[int, int, int], dtype: np.dtype[Any], shape: tuple[int, ...]
    ) -> None:
        self.fd = fd
        self.path = path
        self.version = version
        self.dtype = dtype
        self.shape = shape
        self.row_nbytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._close = weakref.finalize(self, os.close, fd)

    def _check(self) -> None:
        stat = os.fstat(self.fd)
        if (stat.st_ino, stat.st_size, stat.st_mtime_ns) != self.version:
            raise ValueError(f"raw chunk {self.path} changed in place after it was verified")

    def copy(self) -> np.ndarray:
        """The whole chunk in private memory: the bytes of the verified version, or raises."""
        size = self.shape[0] * self.row_nbytes
        data = os.pread(self.fd, size, 0)
        if len(data) != size:
            raise ValueError(f"raw chunk {self.path} ended after {len(data)} bytes")
        self._check()
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape)

    def gather(self, rows: np.ndarray, out: np.ndarray, positions: np.ndarray) -> None:
        """``out[positions] = chunk[rows]``, read from the file.

        One ``fstat`` after the reads: a change in place before or while they ran has already
        changed the file's mtime (or size) by then.
        """
        size = self.row_nbytes
        if len(rows) * 8 >= self.shape[0]:  # many rows: one read of the whole chunk
            data = os.pread(self.fd, self.shape[0] * size, 0)
            if len(data) != self.shape[0] * size:
                raise ValueError(f"raw chunk {self.path} ended after {len(data)} bytes")
            self._check()
            out[positions] = np.frombuffer(data, dtype=self.dtype).reshape(self.shape)[rows]
            return
        buffer = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        view = memoryview(buffer.reshape(-1).view(np.uint8).data)
        fd, preadv = self.fd, os.preadv
        for k, offset in enumerate((rows * size).tolist()):
            if preadv(fd, (view[k * size : (k + 1) * size],), offset) != size:
                raise ValueError(f"raw chunk {self.path} ended before byte {offset + size}")
        self._check()
        out[positions] = buffer


# ---------------------------------------------------------------------------------------
# The reader


_UNREAD = object()  # a chunk the dense copy does not hold
# What reading one chunk into the dense copy gave: its valid rows and the files mapped, or the error.
_Filled = tuple[np.ndarray, list[_MappedFile]] | Exception


class _Dense:
    """The whole entry decoded into one array per column, filled chunk by chunk as read.

    Used when the entry fits the cache budget: a batch then costs one gather per array,
    however many chunks it touches. ``signatures[c]`` is the ``valid`` signature chunk ``c``
    was copied under; rows of chunks not (or no longer) held are marked not valid.

    Columns of large raw chunks read straight from their files are a :class:`MappedColumn`:
    each chunk file is mapped into its place instead of copied (no fresh memory, the page
    cache's bytes), and ``maps[c]`` holds the files and versions chunk ``c`` was mapped at,
    which every batch that reads it checks (:meth:`ChunkReader._drop_changed`).
    """

    def __init__(
        self,
        entry: Entry,
        files: Mapping[str, _ChunkFile | None] | None = None,
        max_files: int = 0,
        scratch: Scratch | None = None,
    ) -> None:
        self.mapped: dict[str, MappedColumn] = {}
        self.scratch = scratch  # where the columns are, if not in this process's memory
        for spec in entry.specs if scratch is None else ():
            source = (files or {}).get(spec.name)
            # Each mapped chunk file is held open: at most max_files of them.
            room = (len(self.mapped) + 1) * entry.num_chunks <= max_files
            if room and source is not None and source.mappable(spec.numpy_dtype, entry.chunk_rows):
                column = MappedColumn.create(
                    entry.num_chunks, entry.num_rows, source.chunk_shape, spec.numpy_dtype
                )
                if column is not None:
                    self.mapped[spec.name] = column
        self.arrays = {
            s.name: self.mapped[s.name].array
            if s.name in self.mapped
            else np.empty((entry.num_rows, *s.shape), dtype=s.numpy_dtype)
            if scratch is None
            else scratch.array((entry.num_rows, *s.shape), s.numpy_dtype)
            for s in entry.specs
        }
        self.maps: list[list[_MappedFile] | None] = [None] * entry.num_chunks
        self.served = np.zeros(entry.num_chunks, dtype=np.int64)  # rows served from each map
        self.valid = np.zeros(entry.num_rows, dtype=bool)
        self.signatures: list[Hashable] = [_UNREAD] * entry.num_chunks
        self.row_nbytes = sum(spec.row_nbytes for spec in entry.specs) + 1
        self.chunk_rows = entry.chunk_rows
        self.held = 0  # rows of chunks held
        # The signature generation (see ValidSignatures.look) in which each chunk's copy was
        # last confirmed current: such chunks need no look at their signature in that generation.
        self.confirmed = np.full(entry.num_chunks, -1, dtype=np.int64)
        self.lock = threading.Lock()

    @staticmethod
    def fits(entry: Entry, budget: int) -> bool:
        return (
            _Dense.can_hold(entry) and (sum(s.row_nbytes for s in entry.specs) + 1) * entry.num_rows <= budget
        )

    @staticmethod
    def can_hold(entry: Entry) -> bool:
        """Whether every column has a known row size (ragged and string arrays have none:
        such entries use the chunk cache)."""
        return all(spec.dtype != "str" and not spec.ragged for spec in entry.specs)

    @staticmethod
    def scratch_nbytes(entry: Entry) -> int:
        """The size of a scratch file holding every column of ``entry``."""
        return Scratch.nbytes([((entry.num_rows, *s.shape), s.numpy_dtype) for s in entry.specs])

    def release(self, chunk: int, start: int, stop: int, signature: Hashable = _UNREAD) -> None:
        """Stop serving chunk ``chunk`` (before its bytes are overwritten)."""
        before = self.signatures[chunk]
        self.held -= (stop - start) * (before is not _UNREAD and before is not None)
        self.valid[start:stop] = False
        self.signatures[chunk] = signature
        self.confirmed[chunk] = -1
        files = self.maps[chunk]
        self.served[chunk] = 0
        if files is not None:
            self.maps[chunk] = None
            self.unmap(chunk)
            for file in files:
                file.close()

    def unmap(self, chunk: int) -> None:
        """Drop the maps of ``chunk``'s files (zero pages in their places)."""
        for column in self.mapped.values():
            with contextlib.suppress(OSError):  # never served while it is not accepted
                column.clear(chunk)

    def accept(self, chunk: int, start: int, stop: int, valid: np.ndarray, signature: Hashable) -> None:
        """Serve chunk ``chunk``, whose bytes are in place, for its ``valid`` rows."""
        self.valid[start:stop] = valid
        self.signatures[chunk] = signature
        self.held += stop - start


class ChunkReader:
    """Reads rows of an entry chunk by chunk, through a bounded cache of decoded chunks.

    When the whole entry fits the budget, decoded chunks are kept in one array per column
    (filled as chunks are first read), so a batch is one gather per array, like a memmap.

    Args:
        entry: the entry to read.
        cache_bytes: the most bytes of decoded chunks this process keeps; ``0`` keeps none.
            Default ``None``: an eighth of physical memory, split between DataLoader workers.
        route: ``"auto"`` reads plain local chunk files directly (raw ones row by row) and
            everything else through zarr; ``"zarr"`` reads everything through zarr.
        max_maps: the most raw chunk files kept open (each holds a descriptor).
        spill_dir: where an entry that passes the budget, but whose rows cost more than a gather
            to read again, is held decoded (a scratch file, see
            :mod:`cachedfeatures.reader.scratch`): ``"auto"`` (``$CACHEDFEATURES_SPILL_DIR`` or
            the temporary directory), a directory, or ``None`` (never: the chunk cache).
    """

    def __init__(
        self,
        entry: Entry,
        *,
        cache_bytes: int | None = None,
        route: ReadRoute = "auto",
        max_maps: int | None = None,
        spill_dir: str | os.PathLike[str] | None = "auto",
    ) -> None:
        self.entry = entry
        self.cache_bytes = parse_cache_bytes(cache_bytes)
        self.route = parse_read_route(route)
        self.max_maps = max_maps if max_maps is not None else _default_max_maps()
        self.spill_dir = spill_dir
        self._setup()

    def _setup(self) -> None:
        self._owner = os.getpid()
        self._cache: ChunkCache | None = None
        self._dense: _Dense | bool | None = False  # False: not decided yet
        self._files: dict[str, _ChunkFile | None] | None = None
        self._ragged_sources: dict[str, _ChunkFile | None] | None = None
        self._valid_file: _ChunkFile | None = None
        self._records_file: _ChunkFile | None = None
        self._reported: set[tuple[str, int]] = set()
        self._valid_signatures: ValidSignatures | None = None
        self._log: VerifiedLog | None = None
        self._array_index: dict[str, int] | None = None  # an array's slot in the entry's checksums

    def __getstate__(self) -> dict[str, Any]:
        # Caches, maps and descriptors stay in the process that made them.
        return {
            "entry": self.entry,
            "cache_bytes": self.cache_bytes,
            "route": self.route,
            "max_maps": self.max_maps,
            "spill_dir": self.spill_dir,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    # -- public --------------------------------------------------------------------------------

    @property
    def cache(self) -> ChunkCache:
        """This process's cache (created on first use, so workers size their own budget)."""
        if self._owner != os.getpid():  # a forked worker starts afresh, with its own budget
            self._setup()
        if self._cache is None:
            budget = self.cache_bytes if self.cache_bytes is not None else default_chunk_cache_bytes()
            self._cache = ChunkCache(budget, self.max_maps)
        return self._cache

    def cache_info(self) -> CacheInfo:
        cache = self.cache
        dense = self._dense
        if isinstance(dense, _Dense):
            chunks = sum(s is not _UNREAD and s is not None for s in dense.signatures)
            if dense.scratch is None:
                nbytes, spilled = dense.held * dense.row_nbytes, 0
            else:  # all but the valid mask (a byte a row, in memory)
                nbytes, spilled = dense.held, dense.held * (dense.row_nbytes - 1)
            return CacheInfo(cache.hits, cache.misses, chunks, nbytes, cache.max_bytes, 0, spilled=spilled)
        return CacheInfo(
            cache.hits, cache.misses, len(cache), cache.nbytes, cache.max_bytes, cache.maps, cache.evictions
        )

    def clear(self) -> None:
        """Forget every cached chunk (the next read of each chunk goes to the store)."""
        self.cache.clear()
        self._dense = False

    def read(self, indices: Sequence[int] | np.ndarray) -> RowsRead:
        """Read the rows at ``indices``; each needed chunk is read at most once."""
        read = self._read(indices)
        if self._log is not None:
            self._log.flush()  # the chunk file versions this batch verified, for later processes
        return read

    def _read(self, indices: Sequence[int] | np.ndarray) -> RowsRead:
        entry = self.entry
        rows_per_chunk = entry.chunk_rows
        indices = np.asarray(indices, dtype=np.int64)
        n = len(indices)
        if n == 0:
            return RowsRead(np.zeros(0, dtype=bool), {})
        if self._owner != os.getpid():  # forked: the parent's copies are not ours to extend
            self._setup()
        if self._dense is False:
            self._dense = self._dense_copy()
        self.cache.batch += 1
        generation = self._signatures.look()
        if isinstance(self._dense, _Dense):
            return self._read_dense(self._dense, indices, generation)
        chunk_of = indices // rows_per_chunk
        order = np.argsort(chunk_of, kind="stable")
        sorted_chunks = chunk_of[order]
        local = indices[order] - sorted_chunks * rows_per_chunk
        starts = np.flatnonzero(np.diff(sorted_chunks, prepend=-1))
        bounds = [*starts.tolist(), n]
        distinct = sorted_chunks[starts]
        ids: list[int] = distinct.tolist()
        hit = np.zeros(n, dtype=bool)
        gathered = {spec.name: spec.empty_column(n) for spec in entry.specs}
        # Ragged rows are copied once all their lengths are known, into one padded buffer for the
        # batch (see pack_padded), holding on to at most a quarter of the cache's budget of
        # chunks meanwhile; past that, row by row at once.
        deferred: dict[str, list[tuple[RaggedChunk, np.ndarray, np.ndarray]]] = {
            name: [] for name in entry.ragged
        }
        held, limit = 0, self.cache.max_bytes // 4
        # One chunk at a time, so a batch holds at most one chunk beyond the cache's budget.
        for k, (chunk_id, signature) in enumerate(zip(ids, self._signatures.now(ids), strict=True)):
            chunk = self._chunk(chunk_id, signature)
            if chunk is None or not chunk.arrays:
                continue
            lo, hi = bounds[k], bounds[k + 1]
            rows, positions = local[lo:hi], order[lo:hi]
            try:
                for name, column in chunk.arrays.items():
                    if isinstance(column, RaggedChunk) and held + column.nbytes <= limit:
                        held += column.nbytes
                        deferred[name].append((column, rows, positions))
                        continue
                    # straight to the requested positions, in our own buffer (never a cached one)
                    if isinstance(column, (_RawRows, RaggedChunk)):
                        column.gather(rows, gathered[name], positions)
                    else:
                        gathered[name][positions] = column[rows]
            except Exception as error:  # a chunk file changed in place: a miss, never a crash
                self.cache.discard(chunk_id)
                self._report(chunk_id, error)
                continue
            hit[positions] = chunk.valid[rows]
        for spec in entry.specs:
            if spec.ragged:
                pack_padded(gathered[spec.name], deferred[spec.name], spec.shape, spec.numpy_dtype)
        hits = int(np.count_nonzero(hit))
        if not hits:
            return RowsRead(hit, {}, distinct)
        if hits < n:
            gathered = {name: column[hit] for name, column in gathered.items()}
        return RowsRead(hit, gathered, distinct)

    def _dense_copy(self) -> _Dense | None:
        """The whole entry as one array per column: in memory where it fits the budget, else in
        a scratch file on local disk (see :mod:`cachedfeatures.reader.scratch`) where rows past
        the cache would cost more than a gather to read again (some array is compressed, or not
        read from a local file); ``None``: the chunk cache."""
        entry = self.entry
        budget = self.cache.max_bytes
        if _Dense.fits(entry, budget):
            return _Dense(entry, self._sources(), self.max_maps)
        if budget == 0 or self.spill_dir is None or not _Dense.can_hold(entry):
            return None
        if all(source is not None and source.decoder is None for source in self._sources().values()):
            return None  # raw local chunk files: read row by row from the page cache as they are
        directory = spill_directory() if self.spill_dir == "auto" else os.fspath(self.spill_dir)
        info = get_worker_info()  # each worker makes its own: they share the room
        share = info.num_workers if info is not None else 1
        scratch = Scratch.create(_Dense.scratch_nbytes(entry), directory, share)
        return None if scratch is None else _Dense(entry, scratch=scratch)

    def _read_dense(self, dense: _Dense, indices: np.ndarray, generation: int) -> RowsRead:
        entry, cache = self.entry, self.cache
        distinct = _distinct(indices // entry.chunk_rows, entry.num_chunks)
        with dense.lock:
            stale = distinct[dense.confirmed[distinct] != generation]
            cache.hits += len(distinct) - len(stale)
            ids: list[int] = stale.tolist()
            loads: list[tuple[int, Hashable]] = []
            for chunk_id, signature in zip(ids, self._signatures.now(ids), strict=True):
                if signature == dense.signatures[chunk_id]:
                    cache.hits += 1
                    dense.confirmed[chunk_id] = generation
                    continue
                cache.misses += 1
                start = chunk_id * entry.chunk_rows
                stop = min(start + entry.chunk_rows, entry.num_rows)
                # An absent valid chunk (None) has no valid rows: remembered, nothing to read.
                dense.release(chunk_id, start, stop, None if signature is None else _UNREAD)
                if signature is None:
                    dense.confirmed[chunk_id] = generation
                else:
                    loads.append((chunk_id, signature))
            for chunk_id, signature in self._load_all(dense, loads):
                if dense.signatures[chunk_id] == signature:  # held as it is now
                    dense.confirmed[chunk_id] = generation
            mapped = [c for c in distinct.tolist() if dense.maps[c] is not None] if dense.mapped else []
            if mapped:  # changed in place since mapped: never touched (a truncated map is SIGBUS)
                self._drop_changed(dense, mapped)
            hit = dense.valid[indices]
            hits = int(np.count_nonzero(hit))
            if not hits:
                return RowsRead(hit, {}, distinct)
            rows = indices if hits == len(indices) else indices[hit]
            arrays = {name: column.take(rows, axis=0) for name, column in dense.arrays.items()}
            if mapped:
                self._copy_in_read_often(dense, rows)
            return RowsRead(hit, arrays, distinct)

    def _copy_in_read_often(self, dense: _Dense, rows: np.ndarray) -> None:
        """Copy mapped chunks that served one and a half times their rows (in the second epoch of a
        shuffled read) into private memory, a few per batch
        (each then costs no ``fstat`` per batch; their files are no longer held open)."""
        chunk_rows = self.entry.chunk_rows
        dense.served += np.bincount(rows // chunk_rows, minlength=len(dense.served))
        ready = np.flatnonzero(dense.served >= chunk_rows + chunk_rows // 2)
        for chunk in ready[:COPY_IN_PER_BATCH].tolist():
            dense.served[chunk] = np.iinfo(np.int64).min  # never again while held
            files = dense.maps[chunk]
            if files is None:
                continue
            try:
                for file in files:
                    dense.mapped[file.array].copy_in(chunk, file.fd)
                    if file.changed():  # changed in place while copied: the copy may be torn
                        raise ValueError(f"raw chunk {file.path} changed in place after it was mapped")
            except Exception as error:
                start = chunk * chunk_rows
                dense.release(chunk, start, min(start + chunk_rows, self.entry.num_rows))
                self._report(chunk, error)
                continue
            dense.maps[chunk] = None
            for file in files:
                file.close()

    def _drop_changed(self, dense: _Dense, chunks: list[int]) -> list[int]:
        """The chunks among ``chunks`` whose mapped files changed in place since they were
        verified (a new size or new times: see :mod:`cachedfeatures.reader.verified`), released
        and reported: one ``fstat`` per mapped file. (zarr replaces a chunk file by renaming a
        new one into place, which changes the ``valid`` signature; the file mapped stays as it was.)
        """
        changed = []
        maps, fstat = dense.maps, os.fstat
        for chunk in chunks:
            for file in maps[chunk] or ():
                st = fstat(file.fd)  # file.changed(), inline: this runs for every chunk of every batch
                if st.st_mtime_ns != file.mtime or st.st_ctime_ns != file.ctime or st.st_size != file.size:
                    changed.append(chunk)
                    self._report(
                        chunk, ValueError(f"raw chunk {file.path} changed in place after it was mapped")
                    )
                    break
        entry = self.entry
        for chunk in changed:
            start = chunk * entry.chunk_rows
            dense.release(chunk, start, min(start + entry.chunk_rows, entry.num_rows))
        return changed

    def _load_all(self, dense: _Dense, loads: list[tuple[int, Hashable]]) -> list[tuple[int, Hashable]]:
        """Read each ``(chunk, signature)`` of ``loads`` (released beforehand) into ``dense``; returns
        ``loads``.

        Where every array is read straight from its files and the reader may use more than one
        core, the chunks are read and decoded side by side in threads (numcodecs, ``crc32c``
        and file reads release the GIL: a new process's first batch of a shuffled read decodes
        every chunk of the entry). Each thread only fills its chunk's own rows; whether a chunk
        is served is decided here, one chunk after another, as for a single read: only if its
        ``valid`` signature is still the one taken before its bytes were read.
        """
        entry = self.entry
        bounds = [
            (chunk, chunk * entry.chunk_rows, min((chunk + 1) * entry.chunk_rows, entry.num_rows))
            for chunk, _ in loads
        ]
        threads = self._load_threads(len(loads))
        if threads is None:
            outcomes = [self._fill(dense, *bound) for bound in bounds]
        else:  # one share of the chunks per thread (every count-th chunk): few hand-overs
            count = threads.count
            shares = [bounds[k::count] for k in range(count)]

            def fill(share: list[tuple[int, int, int]]) -> list[_Filled]:
                return [self._fill(dense, *bound) for bound in share]

            done = list(threads.pool.map(fill, shares))
            outcomes = [done[i % count][i // count] for i in range(len(bounds))]
        for (chunk, start, stop), (_, signature), outcome in zip(bounds, loads, outcomes, strict=True):
            if isinstance(outcome, Exception):  # a torn or garbled chunk is a miss, never a crash
                self._report_unless_raced(chunk, signature, outcome)
                continue
            valid, maps = outcome
            if self._signatures.fresh(chunk) == signature:  # else: changed meanwhile, read next time
                dense.accept(chunk, start, stop, valid, signature)
                dense.maps[chunk] = maps or None
            else:
                self._unmap(dense, chunk, maps)
        return loads

    def _load_threads(self, chunks: int) -> _Threads | None:
        """The threads to read ``chunks`` compressed chunks with; ``None``: read them in this one.

        Only where every array (and ``valid``, and the checksum records) is read straight from
        its files (zarr's own reads stay on this thread) and some array is compressed: raw
        chunks are mapped or copied, too little work per chunk to share out. (numcodecs' Blosc
        may use threads of its own in a process's main thread; measured here, they decoded no
        faster than one thread, while threads of ours took a third off a first batch's wall time.)
        """
        if chunks < 2:
            return None
        files = self._sources()
        if self._valid_file is None or any(source is None for source in files.values()):
            return None
        if self.entry.records is not None and self._records_file is None:
            return None
        if all(source is None or source.decoder is None for source in files.values()):
            return None
        return _threads()

    def _fill(self, dense: _Dense, chunk: int, start: int, stop: int) -> _Filled:
        """Read chunk ``chunk`` of every array straight into its rows of ``dense``: its ``valid``
        rows and the files mapped, or the error that stopped it (its places then hold no map).

        Touches only the chunk's own rows and places (it may run in a thread of its own).
        """
        files = self._sources()
        maps: list[_MappedFile] = []
        try:
            valid = self._read_valid(chunk, start, stop)
            if valid.any():
                accepted = self._accepted(chunk)
                for name, array in self.entry.arrays.items():
                    source = files[name]
                    column = dense.mapped.get(name)
                    if source is not None and column is not None:
                        identity = self._identity(name, chunk, accepted)
                        maps.append(source.map_into(chunk, column, identity, name))
                        continue
                    target = dense.arrays[name][start:stop]
                    check = self._row_check(name, chunk, accepted)
                    if source is not None:
                        identity = self._identity(name, chunk, accepted)
                        if not source.decode_into(chunk, target, identity):
                            source.read_into(chunk, target, check, identity)
                    else:
                        target[...] = np.asarray(array[start:stop])
                        if check is not None:
                            check(target)
        except Exception as error:
            self._unmap(dense, chunk, maps)
            return error
        return valid, maps

    @staticmethod
    def _unmap(dense: _Dense, chunk: int, maps: list[_MappedFile]) -> None:
        if maps:
            dense.unmap(chunk)
            for file in maps:
                file.close()

    def _identity(self, name: str, chunk: int, accepted: np.ndarray | None) -> _Identity:
        if self._array_index is None:  # not at unpickling: the entry may not be restored yet
            self._array_index = {spec.name: i for i, spec in enumerate(self.entry.specs)}
        index = self._array_index[name]
        return _Identity(self.entry.name, name, chunk, None if accepted is None else accepted[index])

    def _chunk(self, chunk_id: int, signature: Hashable) -> _Chunk | None:
        """The chunk as it is now: from the cache if its signature still holds, else read."""
        if signature is None:  # no valid chunk: nothing in it was ever written
            return None
        cache = self._cache if self._cache is not None else self.cache  # read() made it for this process
        chunk = cache.get(chunk_id, signature)
        if chunk is not None:
            if chunk.maps:  # used again: a private copy, where that pushes out nothing in use
                chunk = self._promoted(chunk_id, chunk)
            return chunk
        chunk = self._load(chunk_id, signature)
        if chunk is None:
            cache.discard(chunk_id)
        else:
            cache.put(chunk_id, chunk, version=signature)
        return chunk

    def _promoted(self, chunk_id: int, chunk: _Chunk) -> _Chunk:
        """``chunk`` with its raw files read into private copies, if the cache has room."""
        held = [data for data in chunk.arrays.values() if isinstance(data, _RawRows)]
        nbytes = sum(data.shape[0] * data.row_nbytes for data in held)
        cache = self.cache
        if not cache.room_for(nbytes):
            return chunk
        try:
            arrays = {
                name: data.copy() if isinstance(data, _RawRows) else data
                for name, data in chunk.arrays.items()
            }
        except Exception:  # changed in place: the next gather from the open file reports it
            return chunk
        promoted = _Chunk(chunk.signature, chunk.valid, arrays, chunk.nbytes + nbytes, 0)
        cache.put(chunk_id, promoted, version=promoted.signature)
        return promoted

    # -- internals -----------------------------------------------------------------------------

    def _sources(self) -> dict[str, _ChunkFile | None]:
        if self._files is None:
            # The entry's backend says whether its chunk files may be read directly (a local store,
            # seen through wrappers that leave reads alone: cachedfeatures.store.backend).
            backend = self.entry.backend
            root = backend.root if self.route == "auto" and backend.direct_reads else None
            self._files = {name: _ChunkFile.maybe(array, root) for name, array in self.entry.arrays.items()}
            if root is not None:
                # Verified chunk file versions are kept beside the store's lock files, where it has them.
                directory = getattr(self.entry.locks, "directory", None)
                path = (
                    None if directory is None else os.path.join(directory, self.entry.name + VERIFIED_SUFFIX)
                )
                self._log = VerifiedLog(path)
                for source in self._files.values():
                    if source is not None:
                        source.log = self._log
            self._valid_file = _ChunkFile.maybe(self.entry.valid, root)
            records = self.entry.records
            self._records_file = _ChunkFile.maybe(records, root) if records is not None else None
        return self._files

    def _accepted(self, chunk: int) -> np.ndarray | None:
        """The identity-bound checksums of ``chunk`` (``None``: the entry has none)."""
        if self._records_file is not None:
            return np.asarray(self._records_file.read(chunk)[0])
        return self.entry.accepted_checksums(chunk)

    def _row_check(self, name: str, chunk: int, accepted: np.ndarray | None) -> RowCheck | None:
        if accepted is None:
            return None
        entry = self.entry
        return lambda rows: entry.check_rows(name, chunk, rows, accepted)

    @property
    def _signatures(self) -> ValidSignatures:
        if self._valid_signatures is None:
            backend = self.entry.backend
            self._valid_signatures = ValidSignatures(
                self.entry.valid, self.entry.chunk_rows, backend.root if backend.direct_reads else None
            )
        return self._valid_signatures

    def _load(self, chunk: int, signature: Hashable) -> _Chunk | None:
        """Chunk ``chunk`` of every array; ``None`` if unreadable or ``valid`` changed meanwhile."""
        entry = self.entry
        start = chunk * entry.chunk_rows
        stop = min(start + entry.chunk_rows, entry.num_rows)
        files = self._sources()
        try:
            valid = self._read_valid(chunk, start, stop)
            arrays: dict[str, np.ndarray | _RawRows | RaggedChunk] = {}
            nbytes, maps = valid.nbytes, 0
            if valid.any():
                accepted = self._accepted(chunk)
                for name in entry.ragged:
                    ragged = self._ragged_chunk(name, chunk, start, stop, valid, accepted)
                    nbytes += ragged.nbytes
                    arrays[name] = ragged
                for name, array in entry.arrays.items():
                    source = files[name]
                    check = self._row_check(name, chunk, accepted)
                    if source is not None:
                        data = source.open_rows(chunk, check)
                    else:
                        data = np.asarray(array[start:stop])
                        if check is not None:
                            check(data)
                    if isinstance(data, _RawRows):
                        maps += 1
                    else:
                        nbytes += data.nbytes
                    arrays[name] = data
        except Exception as error:  # a torn or garbled chunk is a miss, never a crash
            self._report_unless_raced(chunk, signature, error)
            return None
        if self._signatures.fresh(chunk) != signature:
            return None  # written or pruned while we read: read again next time
        return _Chunk(signature, valid, arrays, nbytes, maps)

    def _ragged_chunk(
        self, name: str, chunk: int, start: int, stop: int, valid: np.ndarray, accepted: np.ndarray | None
    ) -> RaggedChunk:
        """Chunk ``chunk`` of ragged array ``name``, checked: offsets fit the values, every valid
        row has values, and (with identity checksums) both were written for this chunk."""
        ragged = self.entry.ragged[name]
        source = self._ragged_files().get(name)
        if source is None:
            found = ragged.read_chunk(chunk, start, stop)
        else:
            offsets = np.array(source.read(chunk)[: stop - start])
            path = os.path.join(source.root, ragged.values_chunk_key(chunk))
            found = RaggedChunk(offsets, source.read_values(path, RaggedChunk.total(offsets), ragged))
        found.check(valid)
        check = self._row_check(name, chunk, accepted)
        if check is not None:
            self.entry.check_rows(name, chunk, found.offsets, accepted, found.values)
        return found

    def _ragged_files(self) -> dict[str, _ChunkFile | None]:
        """Direct readers of each ragged array's offsets (and, with the same codecs, values)."""
        if self._ragged_sources is None:
            backend = self.entry.backend
            root = backend.root if self.route == "auto" and backend.direct_reads else None
            self._ragged_sources = {
                name: _ChunkFile.maybe(ragged.offsets, root) for name, ragged in self.entry.ragged.items()
            }
        return self._ragged_sources

    def _read_valid(self, chunk: int, start: int, stop: int) -> np.ndarray:
        source = self._valid_file
        if source is None:
            return np.asarray(self.entry.valid[start:stop], dtype=bool)
        return np.array(source.read(chunk)[: stop - start], dtype=bool)  # a copy, never a map

    def _report_unless_raced(self, chunk: int, signature: Hashable, error: Exception) -> None:
        """Report ``error`` as damage unless a write or prune of the chunk explains it: ``valid``
        changed meanwhile, or (checksums read while a writer replaced the bytes) the chunk's rows
        check out under its lock."""
        if self._signatures.fresh(chunk) != signature:
            return
        if isinstance(error, IdentityMismatchError) and self.entry.rows_bound_now(chunk):
            return
        self._report(chunk, error)

    def _report(self, chunk: int, error: Exception) -> None:
        key = (self.entry.name, chunk)
        if key not in self._reported:
            self._reported.add(key)
            logger.warning(
                "cachedfeatures: chunk %d of entry %s cannot be read (%s: %s); its rows are "
                "treated as missing and recomputed.",
                chunk,
                self.entry.name,
                type(error).__name__,
                error,
            )


def _distinct(chunks: np.ndarray, num_chunks: int) -> np.ndarray:
    """The distinct values of ``chunks`` (chunk ids below ``num_chunks``), ascending.

    A mark per chunk when the entry has few chunks for the batch (a few times faster than
    ``np.unique`` for a batch of hundreds of rows), else ``np.unique``.
    """
    if num_chunks > 16 * len(chunks):
        return np.unique(chunks)
    marks = np.zeros(num_chunks, dtype=bool)
    marks[chunks] = True
    return np.flatnonzero(marks)


@dataclass(frozen=True)
class _Threads:
    """A process's threads for reading chunks side by side (see :meth:`ChunkReader._load_all`)."""

    pid: int  # the process they belong to
    pool: ThreadPoolExecutor
    count: int


_THREADS: _Threads | None = None
# Threads that read chunks side by side, at most (a process's first batch decodes many chunks).
MAX_LOAD_THREADS = 4


def _threads() -> _Threads | None:
    """This process's threads for reading chunks side by side; ``None`` on a single core.

    Made afresh in a forked process (a DataLoader worker): the parent's threads are not there.
    """
    global _THREADS
    pid = os.getpid()
    if _THREADS is None or _THREADS.pid != pid:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not on Linux
            cores = os.cpu_count() or 1
        if cores < 2:
            return None
        count = min(cores, MAX_LOAD_THREADS)
        _THREADS = _Threads(pid, ThreadPoolExecutor(count, thread_name_prefix="cachedfeatures-read"), count)
    return _THREADS


def _default_max_maps() -> int:
    try:
        import resource  # POSIX only
    except ImportError:
        return 256
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 512
    return max(0, min(512, soft // 4))
