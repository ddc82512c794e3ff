"""The bytes of an entry's chunks in its Zarr store: their keys, sizes, compression, deletion.

Store layer, below :mod:`cachedfeatures.store.feature_store`, which uses it for ``Entry.nbytes_stored`` and
to rewrite a torn chunk; :mod:`cachedfeatures.pruning` (every size budget: the dataset's,
``cached_module``'s, ``cachedfeatures prune``) and :mod:`cachedfeatures.maintenance` drop chunks
with :func:`drop_chunk`, the one protocol for removing a chunk. It sees
:class:`~cachedfeatures.store.feature_store.Entry` as a type only.

Dropping a chunk, in this order, under the chunk's lock (so no writer marks rows valid in between):

1. delete its key in ``valid``: every row of the chunk becomes a miss at once (the fill value is
   ``False``), for this process and any other reading the store;
2. delete its bytes in every data array;
3. delete its ``chunk_crc`` record (:mod:`cachedfeatures.format.chunk_identity`), the checksums
   its bytes were checked against: otherwise the records of dropped chunks add up forever.

A reader checks ``valid`` again after reading a chunk's bytes (``ChunkReader``, ``KeyedEntry``),
so one that races a drop gets either the bytes as written or a miss, never the fill values of
deleted bytes nor the bytes of a later write. A crash after step 1 leaves bytes that nothing
serves (they still count in the store's size, so pruning may drop them again, and a later write
marks rows valid only together with their new bytes); the reverse order would leave valid rows
whose bytes are gone.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from zarr.abc.store import Store
from zarr.core.sync import sync

from cachedfeatures.format.chunk_keys import chunk_key, parse_chunk_key
from cachedfeatures.format.names import NOT_ROW_CHUNKED, VALID, offsets_name, ragged_values_chunk
from cachedfeatures.store.backend import Backend

if TYPE_CHECKING:
    from cachedfeatures.store.feature_store import Entry

__all__ = [
    "PARTIAL_SUFFIX",
    "array_chunk_sizes",
    "chunk_keys",
    "compression_ratio",
    "decoded_chunk_nbytes",
    "delete_chunk_bytes",
    "drop_chunk",
    "key_sizes",
    "stored_bytes",
]

# The suffix of the temporary files zarr's LocalStore writes a chunk to before renaming it.
PARTIAL_SUFFIX = ".partial"


def stored_bytes(store: Store, prefix: str, backend: Backend | None = None) -> int:
    """Bytes under ``prefix`` now, less ``*.partial`` temporaries; keys deleted while listed
    (by another process's pruner) count as gone instead of raising."""
    pairs = key_sizes(store, prefix, backend)
    return sum(size for key, size in pairs if not key.endswith(PARTIAL_SUFFIX))


def key_sizes(store: Store, prefix: str, backend: Backend | None = None) -> Iterable[tuple[str, int]]:
    """(key relative to ``prefix``, size) for every key under ``prefix``.

    A walk of the directory where ``backend`` (default: asked of ``store``) allows it, else
    the store's listing.
    """
    backend = backend if backend is not None else Backend.of(store)
    if backend.root is not None and backend.direct_listing:
        yield from _walk(backend.root / prefix, "")
        return

    async def listing() -> list[tuple[str, int]]:
        keys = [key async for key in store.list_prefix(f"{prefix}/" if prefix else "")]

        async def size(key: str) -> int:
            try:
                return await store.getsize(key)
            except FileNotFoundError:  # deleted since listed
                return 0

        sizes = await asyncio.gather(*(size(key) for key in keys))
        start = len(prefix) + 1 if prefix else 0
        return [(key[start:], size) for key, size in zip(keys, sizes, strict=True)]

    yield from sync(listing())


def _walk(directory: Path, relative: str) -> Iterable[tuple[str, int]]:
    try:
        scanner = os.scandir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    with scanner:
        for item in scanner:
            key = f"{relative}{item.name}"
            try:
                if item.is_dir(follow_symlinks=False):
                    yield from _walk(Path(item.path), f"{key}/")
                elif item.is_file(follow_symlinks=False):
                    yield key, item.stat(follow_symlinks=False).st_size
            except FileNotFoundError:  # removed while we walked
                continue


def array_chunk_sizes(entry: Entry) -> dict[tuple[str, int], int]:
    """Bytes of each stored row chunk of ``entry``: ``(array, chunk) -> bytes``, every array
    chunked along rows (data arrays, ``valid``, ``chunk_crc``); metadata and ``*.partial``
    temporaries are not chunks."""
    sizes: dict[tuple[str, int], int] = {}
    for key, size in key_sizes(entry.group.store, entry.group.path):
        found = parse_chunk_key(key)
        if found is not None and "/" in found.path:  # a ragged array's values of one row chunk
            values_chunk = ragged_values_chunk(f"{found.path}/")
            if values_chunk is not None and values_chunk < entry.num_chunks:
                name = found.path.split("/", 1)[0]
                sizes[name, values_chunk] = sizes.get((name, values_chunk), 0) + size
            continue
        if found is None or found.path in NOT_ROW_CHUNKED:
            continue
        if found.chunk < entry.num_chunks:
            sizes[found.path, found.chunk] = size
    return sizes


def decoded_chunk_nbytes(entry: Entry) -> dict[str, int]:
    """The bytes one stored chunk of each array holding rows (data arrays and ``valid``)
    decodes to; bookkeeping (``chunk_crc``, ``access``) is left out.

    Taken from the entry's metadata alone (no array is opened, so a damaged one does not stop
    ``cachedfeatures info``). A chunk decodes to whole chunk rows, an edge chunk included
    (zarr stores it at the full chunk shape); strings count 16 bytes each.
    """
    decoded = {spec.name: entry.chunk_rows * spec.row_nbytes for spec in entry.specs if not spec.ragged}
    # A ragged array: its offsets (two int64 per row); its values arrays are left out, since
    # their decoded size is not in the entry's metadata.
    decoded.update({offsets_name(spec.name): entry.chunk_rows * 16 for spec in entry.specs if spec.ragged})
    decoded[VALID] = entry.chunk_rows  # one bool per row
    return decoded


def compression_ratio(entry: Entry, sizes: Mapping[tuple[str, int], int]) -> float:
    """What the codecs achieve on ``entry``: the bytes its stored chunks decode to over the
    bytes they take in the store; ``nan`` while no chunk is stored.

    ``sizes`` maps ``(array, chunk)`` to the stored bytes of that chunk (see
    :func:`array_chunk_sizes`); the arrays of :func:`decoded_chunk_nbytes` count, on both
    sides. Only chunks that exist count, each as a whole chunk, so the
    ratio does not depend on how full the entry or a chunk is: raw (uncompressed) chunks read
    about 1.0x whether one row or all are cached. The rows of a partly cached chunk that are not
    cached hold the fill value, which compresses well, so a sparsely cached entry reads high;
    what a cached row costs on disk is ``nbytes_stored / valid_rows``. The one definition behind
    ``Entry.info()``, the notebook display and ``cachedfeatures info``.
    """
    decoded = decoded_chunk_nbytes(entry)
    known = [(decoded[name], size) for (name, _), size in sizes.items() if name in decoded]
    stored = sum(size for _, size in known)
    if stored == 0:
        return float("nan")
    return sum(nbytes for nbytes, _ in known) / stored


def chunk_keys(entry: Entry, chunk: int) -> dict[str, str]:
    """The store key of ``chunk`` in each fixed data array of ``entry`` (``valid`` excluded;
    a ragged array's keys are its own, see :class:`cachedfeatures.store.ragged.RaggedArray`)."""
    return {name: chunk_key(array.path, chunk, array.ndim) for name, array in entry.arrays.items()}


def drop_chunk(entry: Entry, chunk: int) -> None:
    """Make ``chunk``'s rows misses, then delete its bytes and its checksums (see the module
    docstring for the order and why), under the chunk's lock."""
    with entry.locks.chunk(entry.name, chunk):
        delete_chunk_bytes(entry, chunk)


def delete_chunk_bytes(entry: Entry, chunk: int) -> None:
    """The steps of :func:`drop_chunk` for a caller that holds the chunk's lock already: delete
    ``chunk``'s key in ``valid``, then in every data array (a ragged array's offsets and its
    values array of the chunk), then its checksum record.

    Each step starts only after the one before finished, so a failure (or a crash) part way
    leaves the chunk's rows invalid, never valid rows without their bytes.
    """
    store = entry.group.store
    valid = chunk_key(entry.valid.path, chunk)
    data = list(chunk_keys(entry, chunk).values())
    records = entry.records
    checksums = None if records is None else chunk_key(records.path, chunk, records.ndim)

    async def delete_all() -> None:
        await store.delete(valid)
        await asyncio.gather(*(store.delete(key) for key in data))
        for ragged in entry.ragged.values():
            await store.delete(ragged.offsets_chunk_key(chunk))
            await store.delete_dir(ragged.values_path(chunk))
        if checksums is not None:
            await store.delete(checksums)

    sync(delete_all())
