"""The Zarr store: a root group of entries, one entry per (module, dataset, options).

Layout (plain Zarr v3, readable with ``zarr`` and ``xarray`` alone)::

    features.zarr/              root group; attrs["cachedfeatures"] names the format
                                (every name here is spelled in cachedfeatures.format.names)
      <Module>-<entry id>/      one group per entry; attrs describe the fingerprints
        features                (N, *out_shape), or features_<key> per module output
        <field>                 passthrough fields (labels, ids, ...), (N, *shape)
        <name>.offsets          a ragged array (rows of any length, e.g. (L_i, 384)) instead:
        <name>.values/<chunk>   (N, 2) row offsets into one values array per row chunk (see
                                cachedfeatures.store.ragged and docs/concepts/variable-length.md)
        valid                   (N,) bool: a row is served only where it is set
        chunk_crc               (chunks, arrays, 2) uint32: checksums bound to each chunk
                                (see cachedfeatures.format.chunk_identity; absent in older entries)

All arrays share one chunking along the sample dimension. A row becomes valid only after
its bytes are written: features first, then ``valid``, each chunk under its lock. A crash
in between costs a recompute, never a wrong answer.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zarr
import zarr.codecs
from zarr.abc.codec import BytesBytesCodec
from zarr.abc.store import Store
from zarr.storage import LocalStore, MemoryStore

from cachedfeatures.errors import (
    ChunkSizeError,
    DamagedStoreError,
    EntryConflictError,
    EntryNotFoundError,
    NotAFeatureStoreError,
    StorePathError,
)
from cachedfeatures.format import chunk_identity
from cachedfeatures.format.names import (
    ATTRS_KEY,
    CHUNK_CRC,
    CHUNK_CRC_DIMS,
    CREATING_KEY,
    FEATURES,
    FORMAT_VERSION_KEY,
    SAMPLE_DIM,
    STORE_FORMAT_VERSION,
    TORCH_DTYPE_ATTR,
    VALID,
    dimension_names,
    is_entry_meta,
    offsets_name,
)
from cachedfeatures.format.ragged import RaggedChunk
from cachedfeatures.format.specs import ArraySpec
from cachedfeatures.reader.chunk_reader import ChunkReader, RowsRead
from cachedfeatures.store import explore, remote
from cachedfeatures.store.backend import Backend
from cachedfeatures.store.chunk_bytes import delete_chunk_bytes, stored_bytes
from cachedfeatures.store.chunk_files import WholeChunks, whole_chunks
from cachedfeatures.store.locks import Locks
from cachedfeatures.store.ragged import RaggedArray, create_ragged

if TYPE_CHECKING:
    import xarray

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_CHUNK_BYTES",
    "Entry",
    "FeatureStore",
    "StoreLike",
    "check_chunk_bytes",
    "default_chunk_rows",
    "default_compressor",
    "float_fill_value",
]

StoreLike = str | os.PathLike[str] | Store | None
Compressor = BytesBytesCodec | Literal["default"] | None

# The size default_chunk_rows aims a dataset entry's chunk at (all arrays' rows together).
DATASET_TARGET_CHUNK_BYTES = 2 * 1024 * 1024
# Blosc (through numcodecs) refuses buffers over 2**31 - 1 bytes, and so does the crc32c of a
# chunk; a chunk of all arrays' rows must stay below it.
MAX_CHUNK_BYTES = 2**31 - 1
# Default chunks keep at least 16 rows only while that stays below this; huge rows get fewer.
MAX_DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024
# A creation note (CREATING_KEY) older than this is taken for one left by a creator that died
# before the entry's metadata: a creator with other options then replaces its arrays (which
# hold no rows: rows are stored only once the metadata is written).
CREATION_STALE_SECONDS = 300.0
# Fill values of new floating-point arrays: what a missing chunk reads as. Not NaN, so an
# all-NaN row of features (a module's honest output) is not taken for missing bytes; an odd
# subnormal that no module plausibly outputs across a whole row (see cachedfeatures.store.integrity).
_FILL_BITS = {2: (np.uint16, 0x03A5), 4: (np.uint32, 0x0041C0DE), 8: (np.uint64, 0x000C0FFEE0C0FFEE)}


def float_fill_value(dtype: np.dtype[Any]) -> Any:
    """The fill value of a new array of floating (or complex) ``dtype``: a finite sentinel."""
    if dtype.kind == "c":
        part = float(float_fill_value(np.dtype(f"<f{dtype.itemsize // 2}")))
        return complex(part, part)
    unsigned, bits = _FILL_BITS[dtype.itemsize]
    return np.array(bits, dtype=unsigned).view(dtype.newbyteorder("="))[()]


def check_chunk_bytes(chunk_rows: int, row_nbytes: int) -> None:
    """A :class:`ChunkSizeError` saying what to set if a chunk would exceed ``MAX_CHUNK_BYTES``."""
    if chunk_rows * row_nbytes <= MAX_CHUNK_BYTES:
        return
    if row_nbytes > MAX_CHUNK_BYTES:
        raise ChunkSizeError(
            f"one row is {row_nbytes} bytes, over the {MAX_CHUNK_BYTES} bytes a chunk can hold "
            "(Blosc and the chunk checksum refuse larger buffers). Store a smaller output: a "
            "smaller dtype (dtype=torch.float16) or fewer values per row."
        )
    raise ChunkSizeError(
        f"Expected chunk_rows * row bytes to be at most {MAX_CHUNK_BYTES} (Blosc and the chunk "
        f"checksum refuse larger buffers). Got {chunk_rows} rows of {row_nbytes} bytes = "
        f"{chunk_rows * row_nbytes} bytes. Pass chunk_rows={MAX_CHUNK_BYTES // row_nbytes} or fewer."
    )


def default_compressor() -> BytesBytesCodec:
    """Blosc with lz4 at level 5, bit shuffle, 128 KiB blocks: cheap to decode, which every
    chunk a new process reads pays. Measured on chunks of 1,024 float32 rows of 384 (one
    thread): on all-MiniLM-L6-v2 sentence and token embeddings and on dense, tanh-like rows,
    smaller than Blosc zstd level 1 with byte shuffle (the default before: 0.87 to 0.89 of
    the raw size against 0.91 to 0.92), 3.5x faster to decode (3.2 to 3.8 GB/s against about
    1 GB/s: a new process's first epoch of a Blosc entry went from 0.37x-0.44x to 0.43x-0.79x
    the memmap) and 2x to 4x faster to encode. Where rows are sparse (ReLU outputs, half zeros)
    zstd with byte shuffle stores them in two thirds the space (0.58 against 0.88): pass
    ``compressor=zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")`` there."""
    return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", blocksize=128 * 1024)


def default_chunk_rows(row_nbytes: int, num_rows: int) -> int:
    """Rows per chunk: a power of two giving chunks of about 2 MiB, between 16 and 65536.

    Rows so large that 16 of them pass 256 MiB get fewer per chunk, down to one, so a chunk
    stays well within what the codecs take (``MAX_CHUNK_BYTES``).
    """
    rows = max(1, DATASET_TARGET_CHUNK_BYTES // max(1, row_nbytes))
    rows = 1 << (rows.bit_length() - 1)
    rows = min(max(rows, 16), 65536)
    while rows > 16 and rows // 2 >= num_rows:  # no chunk much larger than the dataset
        rows //= 2
    while rows > 1 and rows * row_nbytes > MAX_DEFAULT_CHUNK_BYTES:
        rows //= 2
    return rows


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class Entry:
    """One cached (module, dataset, options) combination: its arrays and its metadata."""

    def __init__(self, group: zarr.Group, locks: Locks, backend: Backend | None = None) -> None:
        self.group = group
        self.locks = locks
        # What the store can do (local files, direct reads...): the store's, or asked of the group's.
        self.backend = backend if backend is not None else Backend.of(group.store)
        self.name = group.basename
        self.meta: dict[str, Any] = dict(group.attrs[ATTRS_KEY])  # type: ignore[arg-type]
        self.num_rows: int = self.meta["num_rows"]
        self.chunk_rows: int = self.meta["chunk_rows"]
        self.specs = [ArraySpec.from_json(spec) for spec in self.meta["arrays"]]
        # Per-chunk checksums bound to each chunk's identity (cachedfeatures.format.chunk_identity);
        # entries written before them have none and rely on each chunk file's own crc32c.
        self.bound_checksums = self.meta.get("chunk_checksums") == chunk_identity.FLAVOUR
        self._records: zarr.Array[Any] | None = None
        self._arrays: dict[str, zarr.Array[Any]] | None = None
        self._ragged: dict[str, RaggedArray] | None = None
        self._valid: zarr.Array[Any] | None = None
        self._reader: ChunkReader | None = None

    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.chunk_rows)

    @property
    def arrays(self) -> dict[str, zarr.Array[Any]]:
        """The fixed-shape arrays (features and fields), by name; ragged ones are in :attr:`ragged`."""
        if self._arrays is None:
            # write_empty_chunks is a runtime setting, not stored in the array's metadata: without
            # it, a chunk equal to the fill value (all-False or all-zero features) is not written,
            # and its valid rows would read as damaged.
            self._arrays = {
                spec.name: self._array(spec.name).with_config({"write_empty_chunks": True})
                for spec in self.specs
                if not spec.ragged
            }
        return self._arrays

    @property
    def ragged(self) -> dict[str, RaggedArray]:
        """The ragged (variable-length) arrays, by name (see :mod:`cachedfeatures.store.ragged`)."""
        if self._ragged is None:
            self._ragged = {
                spec.name: RaggedArray(
                    self.group,
                    spec,
                    self._array(offsets_name(spec.name)).with_config({"write_empty_chunks": True}),
                )
                for spec in self.specs
                if spec.ragged
            }
        return self._ragged

    @property
    def valid(self) -> zarr.Array[Any]:
        if self._valid is None:
            self._valid = self._array(VALID)
        return self._valid

    def _array(self, name: str) -> zarr.Array[Any]:
        """The entry's array ``name``; a missing or unreadable one is a :class:`DamagedStoreError`."""
        try:
            array = self.group[name]
        except KeyError:
            problem = "is missing"
        except (ValueError, UnicodeDecodeError) as error:  # garbage zarr.json (JSONDecodeError...)
            problem = f"has unreadable metadata ({type(error).__name__}: {error})"
        else:
            if isinstance(array, zarr.Array):
                return array
            problem = "is not an array"
        location = self.backend.location if self.backend.is_local else "STORE"
        raise DamagedStoreError(
            f"array {name!r} of entry {self.name} {problem}. Run 'cachedfeatures verify --repair "
            f"{location}': it rebuilds the array (its rows become misses, recomputed on the next pass)."
        )

    def check_metadata(self) -> None:
        """Open every array of the entry now: a :class:`DamagedStoreError` if one is damaged."""
        _ = self.arrays, self.ragged, self.valid

    @property
    def records(self) -> zarr.Array[Any] | None:
        """The ``(num_chunks, num_arrays, 2)`` identity-bound checksums, or ``None`` (older entries)."""
        if self.bound_checksums and self._records is None:
            self._records = self.group[CHUNK_CRC]  # type: ignore[assignment]
        return self._records

    def accepted_checksums(self, chunk: int) -> np.ndarray | None:
        """The two checksums each array's rows of ``chunk`` may have, ``(num_arrays, 2)``."""
        records = self.records
        return None if records is None else np.asarray(records[chunk])

    def check_rows(
        self, name: str, chunk: int, rows: np.ndarray, accepted: np.ndarray | None, *values: np.ndarray
    ) -> None:
        """Raise ``IdentityMismatchError`` unless ``rows`` (all of ``chunk`` in array ``name``,
        decoded; a ragged array's offsets, with its ``values``) were written for that chunk;
        nothing to check for entries without records."""
        if accepted is not None:
            chunk_identity.check(self.name, name, chunk, rows, accepted[self._array_index[name]], *values)

    def rows_bound_now(self, chunk: int) -> bool:
        """Whether every array's rows of ``chunk`` match its checksums, checked under the chunk's
        lock (no writer mid-way): tells a read that raced a writer from a chunk file that is not
        this chunk's. ``False`` if the lock cannot be taken (read-only store): damage, then."""
        start = chunk * self.chunk_rows
        stop = min(start + self.chunk_rows, self.num_rows)
        try:
            lock = self.locks.chunk(self.name, chunk)
            lock.__enter__()
        except OSError:
            return False
        try:
            accepted = self.accepted_checksums(chunk)
            for name, array in self.arrays.items():
                self.check_rows(name, chunk, np.asarray(array[start:stop]), accepted)
            for name, ragged in self.ragged.items():
                found = ragged.read_chunk(chunk, start, stop)
                self.check_rows(name, chunk, found.offsets, accepted, found.values)
            return True
        except Exception:
            return False
        finally:
            lock.__exit__(None, None, None)

    @functools.cached_property
    def _array_index(self) -> dict[str, int]:
        return {spec.name: i for i, spec in enumerate(self.specs)}

    def valid_mask(self) -> np.ndarray:
        """The whole ``valid`` mask, as read now."""
        return np.asarray(self.valid[:], dtype=bool)

    def unused_rows(self) -> np.ndarray:
        """Rows that never hold data: in an entry of ``views=K``, each view's rows past the
        samples (every view starts on a chunk boundary). None in other entries."""
        views = self.meta.get("views")
        if not views:
            return np.empty(0, dtype=np.int64)
        count, samples, stride = int(views["count"]), int(views["samples"]), int(views["stride"])
        return (np.arange(count)[:, None] * stride + np.arange(samples, stride)[None, :]).ravel()

    def read(self, indices: Sequence[int] | np.ndarray) -> RowsRead:
        """Read the rows at ``indices``; a row is a hit only if it is valid before and after.

        Reads go through :attr:`reader`, which reads each needed chunk once and keeps decoded
        chunks in a bounded cache; a chunk whose ``valid`` changed since it was cached (a
        write, or a pruner clearing rows before deleting bytes) is read again, so a race
        gives a miss instead of wrong data.
        """
        return self.reader.read(indices)

    def write(self, indices: Sequence[int] | np.ndarray, columns: Mapping[str, np.ndarray]) -> None:
        """Store rows and mark them valid, chunk by chunk, each chunk under its lock."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return
        unique, first = np.unique(indices, return_index=True)
        chunks = unique // self.chunk_rows
        for chunk in np.unique(chunks):
            in_chunk = chunks == chunk
            rows, source = unique[in_chunk], first[in_chunk]
            with self.locks.chunk(self.name, int(chunk)):
                try:
                    self._write_chunk_rows(rows, source, columns)
                except OSError:
                    raise  # the store refused the write (disk full, permissions): not damage
                except Exception as error:
                    # A partial write merges into the stored chunk, which cannot be decoded
                    # (torn, garbage): drop the chunk (valid first) and write it afresh. Its
                    # other rows were unreadable anyway; they become misses.
                    logger.info(
                        "cachedfeatures: rewriting chunk %d of %s from scratch: %s: %s",
                        chunk,
                        self.name,
                        type(error).__name__,
                        error,
                    )
                    delete_chunk_bytes(self, int(chunk))
                    self._write_chunk_rows(rows, source, columns)

    @functools.cached_property
    def _whole_chunks(self) -> dict[str, WholeChunks]:
        """Each fixed array's chunks (and ``valid``'s, and the checksum records') read and
        written whole, as files where the store allows (see :mod:`cachedfeatures.store.chunk_files`)."""
        arrays: dict[str, zarr.Array[Any]] = {**self.arrays, VALID: self.valid}
        if self.records is not None:
            arrays[CHUNK_CRC] = self.records
        return {name: whole_chunks(array, self.backend) for name, array in arrays.items()}

    def _write_chunk_rows(
        self, rows: np.ndarray, source: np.ndarray, columns: Mapping[str, np.ndarray]
    ) -> None:
        """The bytes of every array first, then ``valid`` (the caller holds the chunk lock).

        Each array's chunk is rewritten whole, its rows merged in (rows that were not valid are
        not read: what they held does not matter). With identity-bound checksums the stored rows
        are checked first (rows that were not written for the chunk are dropped, not merged and
        re-blessed), then the checksums of the rows before and after are stored, then the bytes.
        """
        chunk = int(rows[0]) // self.chunk_rows
        start = chunk * self.chunk_rows
        stop = min(start + self.chunk_rows, self.num_rows)
        chunks = self._whole_chunks
        was_valid = chunks[VALID].read(chunk).astype(bool, copy=False)
        any_valid = bool(was_valid.any())
        records = self.records
        accepted = None if records is None else chunks[CHUNK_CRC].read(chunk)[0]
        slots = None if records is None else np.zeros((len(self.specs), 2), dtype=np.uint32)
        ragged = self._merge_ragged(chunk, start, stop, rows, source, columns, was_valid, accepted, slots)
        merged: dict[str, np.ndarray] = {}
        for name, array in self.arrays.items():
            if any_valid:
                old = chunks[name].read(chunk)
                if accepted is not None and slots is not None:  # rows that may be served: this chunk's own?
                    j = self._array_index[name]
                    before = chunk_identity.content_crc(self.name, name, chunk, old)
                    if before not in (int(accepted[j, 0]), int(accepted[j, 1])):
                        raise chunk_identity.IdentityMismatchError(
                            f"chunk {chunk} of {self.name}/{name} holds rows that were not written for it"
                        )
                    slots[j, 0] = before
            else:  # nothing valid: what the chunk held does not matter
                old = np.full((stop - start, *array.shape[1:]), array.fill_value, dtype=array.dtype)
            old[rows - start] = columns[name][source]
            merged[name] = old
            if slots is not None:
                slots[self._array_index[name], 1] = chunk_identity.content_crc(self.name, name, chunk, old)
        if slots is not None:  # both, before the bytes: a crash leaves each chunk matching one
            chunks[CHUNK_CRC].write(chunk, slots[None])
        self._store_ragged(chunk, start, stop, ragged, was_valid)
        for name, old in merged.items():
            chunks[name].write(chunk, old)
        now = was_valid.copy()
        now[rows - start] = True
        # The rows written, and the rows valid before (which laying out ragged bytes afresh cleared).
        chunks[VALID].write(chunk, now)

    def _merge_ragged(
        self,
        chunk: int,
        start: int,
        stop: int,
        rows: np.ndarray,
        source: np.ndarray,
        columns: Mapping[str, np.ndarray],
        was_valid: np.ndarray,
        accepted: np.ndarray | None,
        slots: np.ndarray | None,
    ) -> dict[str, RaggedChunk]:
        """Each ragged array's chunk with ``rows`` written into it (its valid rows kept, checked
        against ``accepted`` first); fills ``slots`` with the checksums before and after."""
        merged = {}
        for name, ragged in self.ragged.items():
            if was_valid.any():
                old = ragged.read_chunk(chunk, start, stop)
                if accepted is not None and slots is not None:
                    j = self._array_index[name]
                    before = chunk_identity.content_crc(self.name, name, chunk, old.offsets, old.values)
                    if before not in (int(accepted[j, 0]), int(accepted[j, 1])):
                        raise chunk_identity.IdentityMismatchError(
                            f"chunk {chunk} of {self.name}/{name} holds rows that were not written for it"
                        )
                    slots[j, 0] = before
            else:
                old = RaggedChunk.empty(stop - start, ragged.spec.shape, ragged.dtype)
            new = old.merged(was_valid, rows - start, list(columns[name][source]))
            if slots is not None:
                j = self._array_index[name]
                slots[j, 1] = chunk_identity.content_crc(self.name, name, chunk, new.offsets, new.values)
            merged[name] = new
        return merged

    def _store_ragged(
        self, chunk: int, start: int, stop: int, merged: Mapping[str, RaggedChunk], was_valid: np.ndarray
    ) -> None:
        """Write each ragged array's chunk. Its values are laid out afresh, so rows valid before
        stop being served first (``valid`` cleared): a reader that raced this write sees misses,
        never one write's offsets with another's values. The caller sets ``valid`` again (the rows
        valid before and the rows written) after all the chunk's bytes."""
        if not merged:
            return
        if was_valid.any():
            self.valid[start:stop] = False
        for name, data in merged.items():
            self.ragged[name].write_chunk(chunk, data)

    # -- statistics (shared by the CLI, pruning and notebook display) --------------------------

    @property
    def module_description(self) -> str:
        return str(self.meta["module"]["description"])

    @property
    def dataset_description(self) -> str:
        return str(self.meta["dataset"]["description"])

    @property
    def created(self) -> str:
        return str(self.meta["created"])

    def coverage(self) -> np.ndarray:
        """Valid rows per chunk, shape ``(num_chunks,)``."""
        mask = self.valid_mask()
        padded = np.zeros(self.num_chunks * self.chunk_rows, dtype=bool)
        padded[: len(mask)] = mask
        counts: np.ndarray = padded.reshape(self.num_chunks, self.chunk_rows).sum(axis=1)
        return counts

    def nbytes_logical(self) -> int:
        """Uncompressed bytes of all rows of every array (features and fields)."""
        return sum(spec.row_nbytes for spec in self.specs) * self.num_rows

    def nbytes_stored(self) -> int:
        """Bytes this entry occupies in the store (chunks and metadata, all arrays).

        Files another process deletes while they are listed (a pruner) count as gone, and
        the ``*.partial`` temporaries of killed writes are not counted.
        """
        return stored_bytes(self.group.store, self.group.path, self.backend)

    # -- exploring (notebooks); the logic lives in cachedfeatures.store.explore ----------------------

    @functools.cached_property
    def feature_names(self) -> list[str]:
        """The arrays that hold module outputs (``["features"]`` for a module returning a tensor)."""
        outputs = self.meta.get("outputs")
        if outputs is None:
            return [spec.name for spec in self.specs if spec.name.startswith(FEATURES)]
        return [array["name"] for array in outputs["arrays"]]

    @property
    def field_names(self) -> list[str]:
        """The passthrough fields stored beside the features (labels, ids, ...)."""
        features = set(self.feature_names)
        return [spec.name for spec in self.specs if spec.name not in features]

    def valid_rows(self) -> np.ndarray:
        """Indices of the rows cached now (valid), ascending."""
        return np.flatnonzero(self.valid_mask())

    def features(
        self,
        name: str | None = None,
        rows: Sequence[int] | np.ndarray | None = None,
        *,
        as_: Literal["numpy", "torch"] = "numpy",
    ) -> Any:
        """Stored module outputs: the valid rows (``rows=None``) or the given rows, in order.

        Reads only the chunks that hold the rows. For a lazy view of everything, use
        ``to_xarray()`` or the Zarr array ``arrays[name]``.

        Args:
            name: one output of a module that returns several (see ``feature_names``);
                default the first.
            rows: dataset indices to read, in this order; default every valid row.
            as_: ``"numpy"`` (bfloat16 comes back as float32) or ``"torch"``.

        Raises:
            RowsNotCachedError: a requested row is not cached; rows that are not valid are
                never returned as data.
        """
        as_ = explore.parse_as(as_)
        if name is None:
            name = self.feature_names[0]
        spec = explore.spec_of(self, name)
        _, columns = explore.read_arrays(self, [name], rows)
        return explore.convert(spec, columns[name], as_)

    @property
    def fields(self) -> dict[str, np.ndarray]:
        """Each passthrough field over the valid rows, read together with ``valid_rows()``.

        To line fields up with features while another process fills the store, pass the same
        ``rows`` to ``features(rows=...)`` and ``read_fields(rows)``, or use ``to_xarray()``.
        """
        return self.read_fields()

    def read_fields(self, rows: Sequence[int] | np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Each passthrough field at ``rows`` (default: the valid rows), as NumPy arrays."""
        _, columns = explore.read_arrays(self, self.field_names, rows)
        return {
            spec.name: explore.convert(spec, columns[spec.name], "numpy")
            for spec in self.specs
            if spec.name in columns
        }

    def to_xarray(self, valid_only: bool = True) -> xarray.Dataset:
        """The entry as a lazily read ``xarray.Dataset``: features as variables, fields as coords.

        See :func:`cachedfeatures.store.explore.to_xarray`; needs ``xarray`` installed.
        """
        return explore.to_xarray(self, valid_only)

    def nbytes_per_chunk(self) -> np.ndarray:
        """Bytes on disk of each chunk (all arrays), shape ``(num_chunks,)``."""
        return explore.chunk_nbytes(self)

    def access_stats(self) -> np.ndarray | None:
        """Per-chunk ``[last access unix time, count]`` recorded by pruning, or ``None``."""
        return explore.access_stats(self)

    @property
    def last_used(self) -> _dt.datetime | None:
        """When a chunk was last read (recorded by pruning), or ``None`` if never recorded."""
        return explore.last_used(self)

    def compression_ratio(self) -> float:
        """What the codecs achieve: the bytes the stored chunks decode to over their bytes on disk
        (``nan``: no chunk yet); the figure ``cachedfeatures info`` prints too."""
        return explore.compression_ratio(self)

    def info(self) -> explore.EntryInfo:
        """An :class:`cachedfeatures.store.explore.EntryInfo` snapshot: sizes, rows, dtypes, dates."""
        return explore.entry_info(self)

    def __repr__(self) -> str:
        try:
            return explore.entry_repr(explore.entry_info(self))
        except Exception as error:  # a repr must not raise (debuggers, logs): say what failed
            return f"<Entry {self.name} (unreadable: {type(error).__name__}: {error})>"

    def _repr_html_(self) -> str:
        return explore.entry_html(explore.entry_info(self), self.valid_mask())

    # -- reading -------------------------------------------------------------------------------

    @property
    def reader(self) -> ChunkReader:
        """The chunk-aware reader behind :meth:`read` (default budget and route until set)."""
        if self._reader is None:
            self._reader = ChunkReader(self)
        return self._reader

    @reader.setter
    def reader(self, reader: ChunkReader) -> None:
        self._reader = reader


class FeatureStore:
    """A cachedfeatures Zarr store: a root group whose child groups are entries."""

    def __init__(self, root: zarr.Group, locks: Locks, backend: Backend) -> None:
        self.root = root
        self.locks = locks
        self.backend = backend

    @property
    def location(self) -> str:
        """Readable text naming the store: its directory, its URL, or ``<memory>``."""
        return self.backend.location

    @classmethod
    def open(
        cls,
        store: StoreLike,
        *,
        mode: Literal["r", "a"] = "r",
        storage_options: Mapping[str, Any] | None = None,
    ) -> FeatureStore:
        """Open (``mode="r"``) or open-or-create (``mode="a"``) a store.

        Args:
            store: a local path, an fsspec URL (``"s3://bucket/features.zarr"``), a ``zarr``
                Store, or ``None`` for a new in-memory store.
            mode: ``"r"`` opens local and URL stores read-only: nothing is ever written.
                ``"a"`` opens the store for writing, creating it if there is none.
            storage_options: passed to fsspec for a URL store (credentials, a profile).

        Raises:
            StorePathError: the path is a file or a directory that is not a Zarr store, or
                (``mode="r"``) there is no store there.
            NotAFeatureStoreError: the Zarr store was not written by cachedfeatures.
        """
        zarr_store, backend = _resolve(store, mode, storage_options)
        locks = backend.new_locks()
        if mode == "r":
            return cls(_open_root(zarr_store, mode, backend.location), locks, backend)
        # Creating the root group and its attrs is a check-then-write: two processes opening a
        # new path at once (the first run of a torchrun job) would both create it. A file lock
        # serialises them on one machine; elsewhere a lost race is an existing group to open.
        with locks.lock("root"):
            if backend.root is not None and isinstance(store, (str, os.PathLike)):
                check_store_directory(backend.root)
            return cls(_open_root(zarr_store, mode, backend.location), locks, backend)

    @property
    def entries(self) -> list[Entry]:
        """The store's complete entries, sorted by name (``store[i]`` indexes this list)."""
        found = []
        for _name, group in sorted(self.root.groups(), key=lambda item: item[0]):
            if is_entry_meta(group.attrs):
                found.append(Entry(group, self.locks, self.backend))
        return found

    def entry(self, name: str) -> Entry | None:
        """The entry called ``name``, or ``None`` if it does not exist (or is incomplete)."""
        try:
            group = self.root[name]
        except KeyError:
            return None
        except (ValueError, UnicodeDecodeError) as error:  # garbage zarr.json (JSONDecodeError...)
            raise DamagedStoreError(
                f"entry {name} of store {self.location} has unreadable metadata ({type(error).__name__}: "
                f"{error}). Run 'cachedfeatures verify --repair {self.location}': it drops the entry, "
                "whose rows are then recomputed."
            ) from error
        if not isinstance(group, zarr.Group) or not is_entry_meta(group.attrs):
            return None
        return Entry(group, self.locks, self.backend)

    def create_entry(
        self,
        name: str,
        meta: Mapping[str, Any],
        specs: Sequence[ArraySpec],
        *,
        num_rows: int,
        chunk_rows: int,
        compressor: Compressor,
        checksum: bool = True,
    ) -> Entry:
        """Create an entry's arrays, or return it if another process created it first.

        With ``checksum`` every chunk ends in a crc32c of its bytes, verified on every read.
        The group's attrs, which mark it complete, are written last, under the entry lock.

        Creation is idempotent, so processes that create one entry at the same moment need no
        lock between them (an object store has none): an array another process already created
        with the same metadata is kept as it is, rows and all, never reset; only one that
        differs (left by a creation that died before its attrs, with other options) is
        replaced. Every creator writes the same attrs, so the last writer's copy is as good.

        Until its attrs land, a creator keeps a note of its storage options in the group
        (``CREATING_KEY``). A creator that finds another's note (younger than
        ``CREATION_STALE_SECONDS``) or complete entry with another ``compressor``,
        ``chunk_rows`` or ``checksum`` raises :class:`EntryConflictError` and replaces nothing.
        """
        check_chunk_bytes(chunk_rows, sum(spec.row_nbytes for spec in specs))
        codec = default_compressor() if compressor == "default" else compressor
        wanted: dict[str, Any] = {
            "chunk_rows": chunk_rows,
            "compressor": repr(codec),
            "checksum": bool(checksum),
        }
        with self.locks.entry(name):
            existing = self.entry(name)
            if existing is not None:
                return existing
            try:
                group = self.root.require_group(name)
            except zarr.errors.ContainsGroupError:  # created by another process since we looked
                group = self.root.require_group(name)
            finished = self._check_other_creator(name, wanted)
            if finished is not None:  # completed by another process since we looked
                return finished
            group.attrs[CREATING_KEY] = {**wanted, "started": time.time()}

            def before_replacing() -> None:
                self._check_other_creator(name, wanted)

            for spec in specs:
                if spec.ragged:
                    create_ragged(
                        group,
                        spec,
                        num_rows,
                        chunk_rows,
                        _with_checksum(codec, checksum),
                        keep_existing=True,
                        before_replacing=before_replacing,
                    )
                else:
                    _create_array(
                        group,
                        spec,
                        num_rows,
                        chunk_rows,
                        codec,
                        checksum,
                        keep_existing=True,
                        before_replacing=before_replacing,
                    )
            if checksum:
                _create_node(
                    group,
                    CHUNK_CRC,
                    keep_existing=True,
                    before_replacing=before_replacing,
                    shape=(-(-num_rows // chunk_rows), len(specs), 2),
                    chunks=(1, len(specs), 2),
                    dtype="uint32",
                    fill_value=0,
                    compressors=(zarr.codecs.Crc32cCodec(),),
                    dimension_names=CHUNK_CRC_DIMS,
                    config={"write_empty_chunks": True},
                )
            _create_valid(
                group, num_rows, chunk_rows, checksum, keep_existing=True, before_replacing=before_replacing
            )
            attrs = {key: value for key, value in group.attrs.asdict().items() if key != CREATING_KEY}
            attrs[ATTRS_KEY] = {
                **meta,
                FORMAT_VERSION_KEY: STORE_FORMAT_VERSION,
                "entry": name,
                "num_rows": num_rows,
                "chunk_rows": chunk_rows,
                "arrays": [spec.to_json() for spec in specs],
                "compressor": repr(codec),
                **({"chunk_checksums": chunk_identity.FLAVOUR} if checksum else {}),
                "created": _now(),
            }
            group.attrs.put(attrs)  # the creation note goes with the same write
            return Entry(group, self.locks, self.backend)

    def _check_other_creator(self, name: str, wanted: Mapping[str, Any]) -> Entry | None:
        """Refuse to go on creating entry ``name`` with the storage options ``wanted`` where
        another creator is at it, or has finished, with other ones.

        Reads the group afresh: an entry completed since we looked is returned (its options
        are ours) or raises :class:`EntryConflictError`; so does the creation note of a creator
        at work with other options (a note older than ``CREATION_STALE_SECONDS`` is taken for
        one left by a creator that died, whose arrays are replaced). Nothing is ever replaced
        in an entry another creator completed, so the rows it stored are kept.
        """
        try:
            group = self.root[name]
        except KeyError:
            return None
        attrs: dict[str, Any] = dict(group.attrs.asdict())
        if is_entry_meta(attrs):
            meta: dict[str, Any] = attrs[ATTRS_KEY]
            theirs = {
                "chunk_rows": meta.get("chunk_rows"),
                "compressor": meta.get("compressor"),
                "checksum": "chunk_checksums" in meta,
            }
            _refuse_other_options(self.location, name, theirs, wanted, "has been created")
            return Entry(group, self.locks, self.backend) if isinstance(group, zarr.Group) else None
        note = attrs.get(CREATING_KEY)
        if isinstance(note, Mapping) and time.time() - float(note.get("started", 0)) < CREATION_STALE_SECONDS:
            _refuse_other_options(self.location, name, note, wanted, "is being created")
        return None

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    # -- exploring (notebooks) -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: str | int) -> Entry:
        """An entry by name, or by position in ``entries`` (``store[0]``)."""
        if isinstance(key, int) and not isinstance(key, bool):
            entries = self.entries
            if not -len(entries) <= key < len(entries):
                raise IndexError(
                    f"store {self.location} has {explore.plural(len(entries), 'entry')}; got index {key}."
                )
            return entries[key]
        entry = self.entry(str(key))
        if entry is None:
            names = [e.name for e in self.entries]
            raise EntryNotFoundError(f"store {self.location} has no entry {key!r}; its entries are {names}.")
        return entry

    def nbytes_stored(self) -> int:
        """Bytes the entries occupy in the store."""
        return sum(entry.nbytes_stored() for entry in self.entries)

    def __repr__(self) -> str:
        try:
            return explore.store_repr(self, [entry.info() for entry in self.entries])
        except Exception as error:  # a repr must not raise (debuggers, logs): say what failed
            return f"<FeatureStore {self.location} (unreadable: {type(error).__name__}: {error})>"

    def _repr_html_(self) -> str:
        return explore.store_html(self, [(entry.info(), entry.valid_mask()) for entry in self.entries])


def _refuse_other_options(
    location: str, name: str, theirs: Mapping[str, Any], wanted: Mapping[str, Any], doing: str
) -> None:
    """An :class:`EntryConflictError` naming each storage option in which ``theirs`` (another
    creator's) and ``wanted`` (this one's) differ; nothing where they agree."""
    differ = [key for key in ("compressor", "chunk_rows", "checksum") if theirs.get(key) != wanted[key]]
    if not differ:
        return
    said = "; ".join(f"{key}={theirs.get(key)} there, {key}={wanted[key]} here" for key in differ)
    raise EntryConflictError(
        f"entry {name} of store {location} {doing} by another process (or dataset) with other "
        f"storage options ({said}), which are not part of the entry's name. Its arrays and rows are "
        "kept. Pass the same compressor, chunk_rows and checksum wherever this entry is created, "
        "or use another store."
    )


def _what_to_do(mode: Literal["r", "a"]) -> str:
    """What to pass instead of a path that is not a store: an existing store to read, a new path
    (or a store) to create one."""
    if mode == "r":
        return "pass the path of an existing store (the directory given as store=... when the cache was made)"
    return "pass a new path (for example 'features.zarr') for the cache, or an existing store"


def _open_root(zarr_store: Store, mode: Literal["r", "a"], location: str) -> zarr.Group:
    """The store's root group, created with the format attrs when the store is new."""
    try:
        try:
            root = zarr.open_group(zarr_store, mode=mode)
        except zarr.errors.ContainsGroupError:  # created by another process since we looked
            root = zarr.open_group(zarr_store, mode=mode)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedStoreError(
            f"the root metadata (zarr.json) of store {location} is unreadable ({type(error).__name__}: "
            f"{error}). Run 'cachedfeatures verify --repair {location}': it rebuilds it, keeping the entries."
        ) from error
    except (zarr.errors.ContainsArrayError, zarr.errors.NodeTypeValidationError) as error:
        raise NotAFeatureStoreError(
            f"{location} is a Zarr array, not a cachedfeatures store (a Zarr group of entries); "
            f"{_what_to_do(mode)}."
        ) from error
    except FileNotFoundError as error:
        raise StorePathError(f"no cachedfeatures store at {location}; check the path.") from error
    meta: Any = root.attrs.get(ATTRS_KEY)
    if meta is None and _holds_our_entries(root):
        # Entries of ours under a root whose attrs are gone: zarr rewrites a missing parent's
        # zarr.json when it creates a child, and on an object store two processes creating the
        # store and its first entry at once can interleave so that the bare copy lands last.
        if mode == "a":
            root.attrs[ATTRS_KEY] = {FORMAT_VERSION_KEY: STORE_FORMAT_VERSION, "created": _now()}
        return root
    if meta is None:
        if mode == "r" or any(True for _ in root):
            raise NotAFeatureStoreError(
                f"{location} is a Zarr group that cachedfeatures did not write (its zarr.json has no "
                f"'{ATTRS_KEY}' attribute); {_what_to_do(mode)}."
            )
        root.attrs[ATTRS_KEY] = {FORMAT_VERSION_KEY: STORE_FORMAT_VERSION, "created": _now()}
    elif int(meta.get(FORMAT_VERSION_KEY, 0)) > STORE_FORMAT_VERSION:
        raise NotAFeatureStoreError(
            f"{location} was written by a newer cachedfeatures (format "
            f"{meta[FORMAT_VERSION_KEY]}); upgrade cachedfeatures to read it."
        )
    return root


def _holds_our_entries(root: zarr.Group) -> bool:
    """Whether some group under ``root`` carries this library's attrs (an entry)."""
    try:
        # An entry being created holds its arrays (``valid`` among them) before its attrs.
        return any(ATTRS_KEY in group.attrs or VALID in group for _name, group in root.groups())
    except (ValueError, UnicodeDecodeError, KeyError):  # a damaged child: not ours to judge here
        return False


def _with_checksum(codec: BytesBytesCodec | None, checksum: bool) -> tuple[BytesBytesCodec, ...]:
    """``codec`` followed by a crc32c of the stored bytes: a flipped bit, a torn or overwritten
    chunk fails the check and is recomputed instead of served (raw chunks have no other guard)."""
    codecs = () if codec is None else (codec,)
    return (*codecs, zarr.codecs.Crc32cCodec()) if checksum else codecs


def _create_node(
    group: zarr.Group,
    name: str,
    *,
    keep_existing: bool,
    before_replacing: Callable[[], None] = lambda: None,
    **options: Any,
) -> None:
    """Create array ``name`` in ``group``; with ``keep_existing``, keep one that is already
    there with exactly the metadata ``options`` give (created by a concurrent creator, maybe
    holding its rows), and replace any other once ``before_replacing`` has not raised.
    Without it, replace whatever is there."""
    if keep_existing:
        try:
            group.create_array(name, overwrite=False, **options)
            return
        except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError):
            if _holds_array_like(group, name, options):
                return
            before_replacing()
    group.create_array(name, overwrite=True, **options)


def _holds_array_like(group: zarr.Group, name: str, options: Mapping[str, Any]) -> bool:
    try:
        existing = group[name]
    except (KeyError, ValueError):
        return False
    if not isinstance(existing, zarr.Array):
        return False
    wanted = zarr.create_array(zarr.storage.MemoryStore(), **options)  # the metadata only
    return bool(existing.metadata.to_dict() == wanted.metadata.to_dict())


def _create_valid(
    group: zarr.Group,
    num_rows: int,
    chunk_rows: int,
    checksum: bool,
    keep_existing: bool = False,
    before_replacing: Callable[[], None] = lambda: None,
) -> None:
    """The ``valid`` mask of an entry, all false (its fill value), replacing any there (or,
    with ``keep_existing``, keeping an identical one: see :func:`_create_node`)."""
    _create_node(
        group,
        VALID,
        keep_existing=keep_existing,
        before_replacing=before_replacing,
        shape=(num_rows,),
        chunks=(chunk_rows,),
        dtype="bool",
        fill_value=False,
        compressors=_with_checksum(default_compressor(), checksum),
        dimension_names=(SAMPLE_DIM,),
    )


def _create_array(
    group: zarr.Group,
    spec: ArraySpec,
    num_rows: int,
    chunk_rows: int,
    codec: BytesBytesCodec | None,
    checksum: bool = True,
    keep_existing: bool = False,
    before_replacing: Callable[[], None] = lambda: None,
) -> None:
    dims = dimension_names(spec.name, 1 + len(spec.shape))
    is_string = spec.dtype == "str"
    fill: Any = "" if is_string else 0
    if not is_string and np.dtype(spec.dtype).kind in "fc":
        fill = float_fill_value(np.dtype(spec.dtype))
    _create_node(
        group,
        spec.name,
        keep_existing=keep_existing,
        before_replacing=before_replacing,
        shape=(num_rows, *spec.shape),
        chunks=(chunk_rows, *spec.shape),
        dtype=spec.numpy_dtype if not is_string else str,
        fill_value=fill,
        compressors=_with_checksum(codec, checksum),
        dimension_names=dims,
        attributes={TORCH_DTYPE_ATTR: spec.torch_dtype} if spec.torch_dtype else {},
        config={"write_empty_chunks": True},
    )


def holds_entries(path: Path) -> bool:
    """Whether a directory without a root ``zarr.json`` holds groups cachedfeatures wrote."""
    for child in path.iterdir():
        try:
            meta = json.loads((child / "zarr.json").read_text())
        except (OSError, ValueError):
            continue
        # An entry's attrs name its arrays; a store's root (a store inside this directory,
        # which is no entry of it) holds only the format version.
        if isinstance(meta, dict) and is_entry_meta(meta.get("attributes") or {}):
            return True
    return False


def rebuild_root(path: str | os.PathLike[str]) -> None:
    """Write a fresh root ``zarr.json`` for a local store that lost it (its entries are kept)."""
    meta = {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {
            ATTRS_KEY: {FORMAT_VERSION_KEY: STORE_FORMAT_VERSION, "created": _now(), "rebuilt": True}
        },
    }
    target = Path(path) / "zarr.json"
    partial = target.with_name(f"zarr.json.{os.getpid()}.partial")
    partial.write_text(json.dumps(meta, indent=2))
    os.replace(partial, target)  # the garbage one, if any, goes in one step


def check_store_directory(path: Path, mode: Literal["r", "a"] = "a") -> None:
    """Refuse a directory that is not a store: a clear error for a lost root, or for other files."""
    if not path.is_dir() or (path / "zarr.json").exists():
        return
    if holds_entries(path):
        raise DamagedStoreError(
            f"store {str(path)!r} has lost its root metadata (zarr.json) but still holds entries. "
            f"Run 'cachedfeatures verify --repair {path}': it rebuilds it, keeping the entries."
        )
    children = sorted(child.name for child in path.iterdir())
    if children:
        shown = ", ".join(children[:3]) + (", ..." if len(children) > 3 else "")
        raise StorePathError(
            f"store path {str(path)!r} is a non-empty directory ({shown}) with no zarr.json, so "
            f"not a Zarr store; {_what_to_do(mode)}."
        )


def _resolve(
    store: StoreLike, mode: Literal["r", "a"], storage_options: Mapping[str, Any] | None = None
) -> tuple[Store, Backend]:
    """The zarr Store and its backend (what it can do, its readable location)."""
    options = remote.parse_storage_options(storage_options, store)
    if remote.is_url(store):
        url = os.fspath(store)  # type: ignore[arg-type]
        # No locks across processes on object stores: chunk ownership (cachedfeatures.store.ownership).
        zarr_store = remote.open_url_store(url, options, read_only=mode == "r")
        return zarr_store, Backend.of(zarr_store, url)
    if store is None:
        memory = MemoryStore()
        return memory, Backend.of(memory, "<memory>")
    if isinstance(store, Store):
        return store, Backend.of(store)
    if isinstance(store, (str, os.PathLike)):
        text = os.fspath(store)
        path = Path(text.removeprefix("file://") if isinstance(text, str) else text).expanduser()
        if path.is_file():
            if mode == "r":
                raise StorePathError(
                    f"store path {str(path)!r} is a file, not a cachedfeatures store (a directory); "
                    f"{_what_to_do(mode)}."
                )
            raise StorePathError(
                f"store path {str(path)!r} is a file; pass a directory path (for example "
                f"{str(path.with_suffix('.zarr'))!r}) where the cache can live."
            )
        if mode == "r":  # mode "a" checks under the root lock, once a racing creator is done
            check_store_directory(path, mode)
            if not path.exists():
                raise StorePathError(f"no cachedfeatures store at {str(path)!r}; check the path.")
        if mode == "a":
            path.mkdir(parents=True, exist_ok=True)
        local = LocalStore(path, read_only=mode == "r")
        return local, Backend.of(local, str(path))
    raise TypeError(f"store must be a path, a zarr Store or None; got {type(store).__name__}.")
