"""Checksums bound to a chunk's identity: a chunk file moved or copied onto another chunk's
key fails its check.

zarr's ``crc32c`` codec ends every chunk file in a checksum of its own bytes, so a torn or
garbled chunk is caught, but a whole valid chunk file put in another chunk's place (or another
entry's) checks fine and would be served as that chunk's rows. Entries written with the
``"crc32c-identity"`` flavour (``Entry.meta["chunk_checksums"]``) also keep, per chunk and
per array, the crc32c of the chunk's decoded rows seeded with ``"<entry>/<array>/<chunk>"``,
in the small array ``chunk_crc`` of shape ``(num_chunks, num_arrays, 2)``:

- slot 1 holds the checksum of the rows being written, slot 0 that of the rows before; a
  chunk write stores both (under the chunk's lock) *before* it writes the arrays' bytes, so
  a crash anywhere leaves each array's chunk matching one of the two;
- a read accepts an array's chunk only if its rows' seeded checksum is one of the two.

Entries written before this flavour have no ``chunk_crc`` and are read as before (their
chunk files are checked by the file's own crc32c only). The chunk files themselves are plain
zarr, so the store stays readable without this library.
"""

from __future__ import annotations

from typing import Any

import google_crc32c
import numpy as np

__all__ = ["FLAVOUR", "IdentityMismatchError", "content_crc", "check"]

# The value of an entry's "chunk_checksums" metadata where it keeps the array
# cachedfeatures.format.names.CHUNK_CRC.
FLAVOUR = "crc32c-identity"


class IdentityMismatchError(ValueError):
    """A chunk's rows are not the rows written for this chunk of this array (a file from
    another chunk or entry, or changed after writing): its rows are treated as missing."""


def _content(data: np.ndarray) -> Any:
    """The rows' bytes in a canonical form: little-endian C order; strings as UTF-8."""
    if data.dtype.kind in "TUO":
        text = "\x00".join(str(value) for value in data.reshape(-1).tolist())
        return text.encode("utf-8", "surrogatepass")
    little = data.dtype.newbyteorder("<") if data.dtype.itemsize > 1 else data.dtype
    raw = np.ascontiguousarray(data, dtype=little).reshape(-1).view(np.uint8)
    if raw.flags.writeable:
        raw = raw.view()
        raw.flags.writeable = False  # google_crc32c takes read-only buffers only
    return raw


def content_crc(entry: str, array: str, chunk: int, data: np.ndarray, *more: np.ndarray) -> int:
    """The crc32c of ``data`` (the chunk's rows, decoded) seeded with the chunk's identity.

    A ragged array's chunk passes its offsets as ``data`` and its values in ``more``.
    """
    seed = google_crc32c.value(f"{entry}/{array}/{chunk}".encode())
    crc = google_crc32c.extend(seed, _content(data))
    for part in more:
        crc = google_crc32c.extend(crc, _content(part))
    return int(crc)


def check(entry: str, array: str, chunk: int, data: np.ndarray, accepted: Any, *more: np.ndarray) -> None:
    """Raise :class:`IdentityMismatchError` unless ``data`` is one of the ``accepted`` two."""
    crc = content_crc(entry, array, chunk, data, *more)
    if crc not in (int(accepted[0]), int(accepted[1])):
        raise IdentityMismatchError(
            f"chunk {chunk} of {entry}/{array} holds rows that were not written for it (a chunk "
            "file from another chunk or entry, or changed after writing)"
        )
