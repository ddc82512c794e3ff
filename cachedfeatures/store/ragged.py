"""The Zarr nodes of a ragged (variable-length) array of an entry, and their chunk-wise I/O.

A ragged array ``<name>`` is two nodes beside the entry's fixed arrays (the names are in
:mod:`cachedfeatures.format.names`, the chunk layout in :mod:`cachedfeatures.format.ragged`)::

    <name>.offsets             (N, 2) int64, chunked along rows like every array: row i's
                               [start, stop) in its row chunk's values; (-1, -1) for none
    <name>.values/             a group with one array per row chunk that holds rows:
      <chunk>                  (values in that chunk, *inner shape), one zarr chunk

A row chunk is written whole (under its lock, by :meth:`Entry.write`): its values array is
replaced, then its offsets; pruning deletes both with the chunk. Plain zarr reads row ``i``
as ``group[f"<name>.values/{i // chunk_rows}"][slice(*group["<name>.offsets"][i])]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.core.sync import sync

from cachedfeatures.errors import ChunkSizeError
from cachedfeatures.format.chunk_keys import chunk_key
from cachedfeatures.format.names import offsets_name, values_chunk_name, values_name
from cachedfeatures.format.ragged import ABSENT, RaggedChunk
from cachedfeatures.format.specs import ArraySpec

__all__ = ["RaggedArray", "create_ragged"]

MAX_VALUES_BYTES = 2**31 - 1  # what Blosc and the chunk checksum take (feature_store.MAX_CHUNK_BYTES)

SAMPLE_DIM = "sample"


def create_ragged(
    group: zarr.Group,
    spec: ArraySpec,
    num_rows: int,
    chunk_rows: int,
    compressors: tuple[BytesBytesCodec, ...],
    keep_existing: bool = False,
    before_replacing: Callable[[], None] = lambda: None,
) -> None:
    """Create the offsets array and the (empty) values group of ragged array ``spec``.

    With ``keep_existing`` (entry creation, which must be idempotent: processes may create one
    entry at once on an object store), an offsets array and a values group already there with
    exactly this metadata are kept, rows and all; anything else there is replaced once
    ``before_replacing`` has not raised.
    """
    offsets: dict[str, Any] = {
        "shape": (num_rows, 2),
        "chunks": (chunk_rows, 2),
        "dtype": "int64",
        "fill_value": ABSENT,
        "compressors": compressors,
        "dimension_names": (SAMPLE_DIM, "bound"),
        "attributes": {"ragged": spec.name, "values": values_name(spec.name)},
        "config": {"write_empty_chunks": True},
    }
    values_attrs = {
        "ragged": spec.name,
        "dtype": spec.dtype,
        "inner_shape": list(spec.shape),
        **({"torch_dtype": spec.torch_dtype} if spec.torch_dtype else {}),
    }
    if not (keep_existing and _holds(group, offsets_name(spec.name), offsets)):
        if keep_existing and _member(group, offsets_name(spec.name)) is not None:
            before_replacing()
        group.create_array(offsets_name(spec.name), overwrite=True, **offsets)
    existing = _member(group, values_name(spec.name))
    if not (keep_existing and isinstance(existing, zarr.Group) and dict(existing.attrs) == values_attrs):
        if keep_existing and existing is not None:
            before_replacing()
        group.create_group(values_name(spec.name), attributes=values_attrs, overwrite=True)


def _member(group: zarr.Group, name: str) -> Any:
    try:
        return group[name]
    except (KeyError, ValueError):
        return None


def _holds(group: zarr.Group, name: str, options: dict[str, Any]) -> bool:
    """Whether ``group`` has array ``name`` with exactly the metadata ``options`` give."""
    existing = _member(group, name)
    if not isinstance(existing, zarr.Array):
        return False
    wanted = zarr.create_array(zarr.storage.MemoryStore(), **options)  # the metadata only
    return bool(existing.metadata.to_dict() == wanted.metadata.to_dict())


class RaggedArray:
    """Reads and writes the row chunks of one ragged array of an entry through zarr."""

    def __init__(self, group: zarr.Group, spec: ArraySpec, offsets: zarr.Array[Any]) -> None:
        self.group = group
        self.spec = spec
        self.name = spec.name
        self.offsets = offsets
        self.dtype: np.dtype[Any] = spec.numpy_dtype

    def _value_dims(self) -> tuple[str, ...]:
        return (f"{self.name}_value", *(f"{self.name}_dim{i}" for i in range(1, len(self.spec.shape) + 1)))

    def values_path(self, chunk: int) -> str:
        """The store path of the values array of ``chunk``."""
        relative = values_chunk_name(self.name, chunk)
        return f"{self.group.path}/{relative}" if self.group.path else relative

    def values_chunk_key(self, chunk: int) -> str:
        """The store key of the one zarr chunk of ``chunk``'s values array."""
        return chunk_key(self.values_path(chunk), 0, len(self.spec.shape) + 1)

    def offsets_chunk_key(self, chunk: int) -> str:
        return chunk_key(self.offsets.path, chunk, self.offsets.ndim)

    def read_chunk(self, chunk: int, start: int, stop: int) -> RaggedChunk:
        """Row chunk ``chunk`` (rows ``start:stop``) as stored; raises if it is inconsistent.

        A values array whose chunk is missing while offsets point into it raises (it is never
        read as fill values).
        """
        offsets = np.asarray(self.offsets[start:stop], dtype=np.int64)
        total = RaggedChunk.total(offsets)
        if total == 0:
            values = np.empty((0, *self.spec.shape), dtype=self.dtype)
        else:
            # Damage, not a refused write: a ValueError (an OSError would stop the writer).
            store = self.group.store
            missing = ValueError(f"the values of chunk {chunk} of {self.name!r} are missing")
            if not sync(store.exists(self.values_chunk_key(chunk))):
                raise missing
            try:
                array = zarr.open_array(store, path=self.values_path(chunk), mode="r")
            except FileNotFoundError:
                raise missing from None
            values = np.asarray(array[...])
        found = RaggedChunk(offsets, values)
        found.check()
        return found

    def write_chunk(self, chunk: int, data: RaggedChunk) -> None:
        """Replace ``chunk``'s values, then its offsets (the caller holds the chunk's lock and has
        cleared the chunk's ``valid`` rows if any were set)."""
        total = len(data.values)
        inner = tuple(self.spec.shape)
        if data.values.nbytes > MAX_VALUES_BYTES:
            raise ChunkSizeError(
                f"row chunk {chunk} of ragged array {self.name!r} holds {data.values.nbytes} bytes of "
                f"values, over the {MAX_VALUES_BYTES} a chunk can hold (Blosc and the chunk checksum "
                "refuse larger buffers); its chunking was estimated from one sample's length. Pass a "
                "smaller chunk_rows (a new entry: 'cachedfeatures rm' this one)."
            )
        array = zarr.create_array(
            self.group.store,
            name=self.values_path(chunk),
            shape=(total, *inner),
            chunks=(max(total, 1), *(max(n, 1) for n in inner)),
            dtype=self.dtype,
            fill_value=0,
            compressors=self.offsets.compressors,
            dimension_names=self._value_dims(),
            attributes={"torch_dtype": self.spec.torch_dtype} if self.spec.torch_dtype else {},
            config={"write_empty_chunks": True},
            overwrite=True,
        )
        if total:
            array[...] = data.values
        start = chunk * self.offsets.chunks[0]
        self.offsets[start : start + len(data.offsets)] = data.offsets
