"""The bytes of an entry's chunks in its Zarr store: their keys, their sizes, their deletion.

Store layer, below :mod:`cachedfeatures.store.feature_store`, which uses it for ``Entry.nbytes_stored`` and
to rewrite a torn chunk; :mod:`cachedfeatures.pruning` and :mod:`cachedfeatures.maintenance`
use it to drop chunks. It sees :class:`~cachedfeatures.store.feature_store.Entry` as a type only.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import LocalStore

if TYPE_CHECKING:
    from cachedfeatures.store.feature_store import Entry

__all__ = ["PARTIAL_SUFFIX", "chunk_keys", "delete_chunk_bytes", "key_sizes", "stored_bytes"]

# The suffix of the temporary files zarr's LocalStore writes a chunk to before renaming it.
PARTIAL_SUFFIX = ".partial"


def stored_bytes(store: Store, prefix: str) -> int:
    """Bytes under ``prefix`` now, less ``*.partial`` temporaries; keys deleted while listed
    (by another process's pruner) count as gone instead of raising."""
    return sum(size for key, size in key_sizes(store, prefix) if not key.endswith(PARTIAL_SUFFIX))


def key_sizes(store: Store, prefix: str) -> Iterable[tuple[str, int]]:
    """(key relative to ``prefix``, size) for every key under ``prefix``."""
    if isinstance(store, LocalStore):
        yield from _walk(Path(store.root) / prefix, "")
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


def chunk_keys(entry: Entry, chunk: int) -> dict[str, str]:
    """The store key of ``chunk`` in each fixed data array of ``entry`` (``valid`` excluded;
    a ragged array's keys are its own, see :class:`cachedfeatures.store.ragged.RaggedArray`)."""
    keys = {}
    for name, array in entry.arrays.items():
        coords = (chunk, *(0 for _ in array.shape[1:]))
        keys[name] = f"{array.path}/{array.metadata.encode_chunk_key(coords)}"
    return keys


def delete_chunk_bytes(entry: Entry, chunk: int) -> None:
    """Delete ``chunk``'s key in ``valid``, then in every data array (a ragged array's offsets
    and values array of the chunk), then its checksums (caller holds the lock)."""
    store = entry.group.store
    valid = f"{entry.valid.path}/{entry.valid.metadata.encode_chunk_key((chunk,))}"
    data = list(chunk_keys(entry, chunk).values())
    records = entry.records
    checksums = (
        None if records is None else f"{records.path}/{records.metadata.encode_chunk_key((chunk, 0, 0))}"
    )

    async def delete_all() -> None:
        await store.delete(valid)
        await asyncio.gather(*(store.delete(key) for key in data))
        for ragged in entry.ragged.values():
            await store.delete(ragged.offsets_chunk_key(chunk))
            await store.delete_dir(ragged.values_path(chunk))
        if checksums is not None:
            await store.delete(checksums)

    sync(delete_all())
