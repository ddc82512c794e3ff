"""Chunk keys: where a chunk of an entry's array lives in the store, built and parsed here only.

Every array of a store uses Zarr v3's default chunk key encoding: the chunk at grid position
``(i, j, ...)`` of the array at ``path`` is the key ``"<path>/c/<i>/<j>..."``. Arrays chunked
along rows are chunked only there, so their other coordinates are 0: row chunk ``i`` of a 3-d
array is ``"<path>/c/<i>/0/0"``. The temporary ``*.partial`` files zarr's local store writes a
chunk to are not chunk keys.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["ChunkKey", "chunk_key", "parse_chunk_key"]

_PATTERN = re.compile(r"^(?:(?P<path>.+)/)?c/(?P<coords>\d+(?:/\d+)*)$")


class ChunkKey(NamedTuple):
    """A parsed chunk key: the array's path (relative to what the key was) and its grid coords."""

    path: str
    coords: tuple[int, ...]

    @property
    def chunk(self) -> int:
        """The chunk's index along the first (row) dimension."""
        return self.coords[0]


def chunk_key(path: str, chunk: int, ndim: int = 1) -> str:
    """The key of row chunk ``chunk`` of the ``ndim``-dimensional array at ``path``.

    ``path`` is the array's path (``array.path``, relative to the store root), or ``""`` for the
    key relative to the array itself.
    """
    relative = f"c/{int(chunk)}" + "/0" * (ndim - 1)
    return f"{path}/{relative}" if path else relative


def parse_chunk_key(key: str) -> ChunkKey | None:
    """The array path and coordinates of chunk ``key``, or ``None`` if it is no chunk key
    (metadata, a ``*.partial`` temporary). ``path`` is ``""`` for a key relative to its array."""
    match = _PATTERN.match(key)
    if match is None:
        return None
    coords = tuple(int(part) for part in match["coords"].split("/"))
    return ChunkKey(match["path"] or "", coords)
