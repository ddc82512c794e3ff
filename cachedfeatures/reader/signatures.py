"""Signatures of an entry's ``valid`` chunks: has a chunk changed since this process read it?

The reader keeps decoded chunks and serves a cached chunk only while its ``valid`` chunk is
unchanged (see :mod:`cachedfeatures.reader.chunk_reader`). Asking that of every chunk of every batch costs
one ``stat`` per chunk, and a shuffled batch touches most chunks of the entry: with 64 chunks
that was a third of the time of a hit batch.

On a local store the answer usually comes from one ``stat`` per batch. Zarr's ``LocalStore``
writes a chunk by renaming a temporary file into the chunk's directory and deletes one by
unlinking it, and both change the directory's modification time. A chunk whose file was
checked after the directory was last seen is therefore unchanged as long as the directory's
signature is. The exception is a change within the file system's timestamp resolution of the
one seen (the "racy" case that git's index also guards against), so the directory is only
trusted once its times are older than :data:`QUIET_NS` (two seconds on file systems that
store whole seconds), and every chunk is checked until then. This assumes that the clocks of
machines sharing a network file system agree to within that margin, as ``make`` does.

Elsewhere (object stores), the signature is the ``valid`` chunk's encoded bytes, fetched for
every batch.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Hashable
from typing import Any

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from cachedfeatures.format.chunk_keys import chunk_key

__all__ = ["QUIET_NS", "ValidSignatures"]

# How old a directory's times must be before its signature vouches for its files.
QUIET_NS = 100_000_000
COARSE_QUIET_NS = 2_000_000_000  # for file systems that keep whole seconds


class ValidSignatures:
    """The current signature of each ``valid`` chunk; ``None`` where the chunk is absent.

    Args:
        valid: the entry's ``valid`` array (one dimension).
        chunk_rows: rows per entry chunk (the ``valid`` array may be sharded more coarsely).
        root: the directory of the local store whose files may be signed with ``stat``; ``None``
            (the default) fetches the encoded ``valid`` chunks through the store instead.
    """

    def __init__(
        self, valid: zarr.Array[Any], chunk_rows: int, root: str | os.PathLike[str] | None = None
    ) -> None:
        self.valid = valid
        self.chunk_rows = chunk_rows
        grid = valid.chunks[0] if valid.shards is None else valid.shards[0]
        self._grid_rows = int(grid)
        self._root = None if root is None else os.fspath(root)
        self._local = self._root is not None
        self._paths: dict[int, str] = {}
        self._directory: str | None = None
        if self._local:
            last = -(-valid.shape[0] // chunk_rows) - 1
            first_dir, last_dir = os.path.dirname(self.path(0)), os.path.dirname(self.path(max(last, 0)))
            self._directory = first_dir if first_dir == last_dir else None
        self._generation = 0
        self._seen: Hashable = None  # the directory's signature, once its times were quiet
        self._known: dict[int, tuple[int, Hashable]] = {}  # chunk -> (generation, signature)

    def key(self, chunk: int) -> str:
        """The store key (relative to the array) of the ``valid`` chunk or shard holding ``chunk``."""
        grid_index = chunk * self.chunk_rows // self._grid_rows
        return chunk_key("", grid_index)

    def path(self, chunk: int) -> str:
        """The file of the ``valid`` chunk holding entry chunk ``chunk`` (local stores only)."""
        found = self._paths.get(chunk)
        if found is None:
            if self._root is None:
                raise ValueError("Expected a store directory (root=) to name chunk files. Got None.")
            found = self._paths[chunk] = os.path.join(self._root, self.valid.path, self.key(chunk))
        return found

    def look(self) -> int:
        """Look at the store once (per batch); returns the generation now.

        Chunk signatures taken in the current generation are current; a new generation starts
        whenever the directory changed or is too recent to vouch for its files (and on stores
        without one, at every look).
        """
        if self._directory is None:
            self._generation += 1
            return self._generation
        try:
            st = os.stat(self._directory)
        except FileNotFoundError:  # nothing written yet: nothing to vouch for
            self._generation += 1
            self._seen = None
            return self._generation
        signature = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        newest = max(st.st_mtime_ns, st.st_ctime_ns)
        margin = COARSE_QUIET_NS if newest % 1_000_000_000 == 0 else QUIET_NS
        quiet = time.time_ns() - newest > margin
        if not quiet or signature != self._seen:
            self._generation += 1
        self._seen = signature if quiet else None
        return self._generation

    def now(self, chunks: list[int]) -> list[Hashable]:
        """Each chunk's signature in the current generation (taken now unless already taken)."""
        if not self._local:
            return self._fetch(chunks)
        generation, known = self._generation, self._known
        signatures: list[Hashable] = []
        for chunk in chunks:
            seen = known.get(chunk)
            if seen is not None and seen[0] == generation:
                signatures.append(seen[1])
                continue
            signature = _stat_signature(self.path(chunk))
            known[chunk] = (generation, signature)
            signatures.append(signature)
        return signatures

    def fresh(self, chunk: int) -> Hashable:
        """Chunk ``chunk``'s signature taken now, whatever the directory says."""
        if not self._local:
            return self._fetch([chunk])[0]
        return _stat_signature(self.path(chunk))

    def _fetch(self, chunks: list[int]) -> list[Hashable]:
        store, prefix = self.valid.store, self.valid.path
        keys = [f"{prefix}/{self.key(chunk)}" for chunk in chunks]
        prototype = default_buffer_prototype()

        async def fetch() -> list[Any]:
            return await asyncio.gather(*(store.get(key, prototype=prototype) for key in keys))

        return [None if buffer is None else buffer.to_bytes() for buffer in sync(fetch())]


def _stat_signature(path: str) -> Hashable:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
