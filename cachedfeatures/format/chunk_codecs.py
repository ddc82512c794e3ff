"""Plain chunk codecs: the arrays whose chunk files this library encodes and decodes itself.

An array is *plain* when its chunks are ``bytes`` (either byte order), optionally followed by
one Blosc, Zstd or Gzip codec, optionally followed by a ``crc32c`` checksum, on a regular grid
that splits rows only, under the chunk key encoding this library writes (see
:mod:`cachedfeatures.format.chunk_keys`). Every array an entry creates for fixed-shape numbers
is plain. :class:`PlainCodecs` encodes a whole chunk to the bytes of its file and decodes them
back with numcodecs, as zarr's codec pipeline does (zarr's Blosc, Zstd and Gzip codecs are
numcodecs underneath, and their frames describe themselves), minus zarr's event loop: a
chunk read or written this way is one call in the caller's thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
import zarr.codecs
from numcodecs.abc import Codec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.metadata import ArrayV3Metadata

from cachedfeatures.format.chunk_keys import chunk_key

__all__ = ["PlainCodecs", "crc32c_of"]

_SHUFFLES = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE, "bitshuffle": 2}


def crc32c_of(payload: np.ndarray | bytes | memoryview) -> int:
    """The crc32c zarr's ``crc32c`` codec appends (little-endian) to a chunk's encoded bytes."""
    if not isinstance(payload, bytes):
        view = np.frombuffer(payload, dtype=np.uint8) if isinstance(payload, memoryview) else payload
        view = view.reshape(-1).view(np.uint8)
        view.flags.writeable = False  # google_crc32c takes read-only buffers only
        payload = view  # type: ignore[assignment]
    return int(google_crc32c.value(payload))


def _compressor(codec: object, itemsize: int) -> Codec | None:
    """The numcodecs codec doing what zarr's bytes-to-bytes ``codec`` does (on items of
    ``itemsize`` bytes), or ``None``."""
    config: dict[str, Any] = codec.to_dict().get("configuration", {})  # type: ignore[attr-defined]
    if type(codec) is zarr.codecs.BloscCodec:
        shuffle = config.get("shuffle", "noshuffle")
        return numcodecs.Blosc(
            cname=str(config["cname"]),
            clevel=int(config["clevel"]),
            shuffle=_SHUFFLES[str(getattr(shuffle, "value", shuffle))],
            blocksize=int(config.get("blocksize") or 0),
            typesize=int(config.get("typesize") or itemsize),  # the shuffle's unit: the item
        )
    if type(codec) is zarr.codecs.ZstdCodec:
        return numcodecs.Zstd(level=int(config.get("level", 0)), checksum=bool(config.get("checksum", False)))
    if type(codec) is zarr.codecs.GzipCodec:
        return numcodecs.GZip(level=int(config.get("level", 5)))
    return None


@dataclass(frozen=True)
class PlainCodecs:
    """How one plain array's chunks are stored: encode a whole chunk, decode a chunk file.

    Args:
        dtype: the stored dtype, in the ``bytes`` codec's byte order.
        chunk_shape: the shape of one chunk (rows first; the other axes whole).
        compressor: the numcodecs codec between ``bytes`` and the checksum, or ``None``.
        checksum: whether the file ends in the crc32c of the bytes before it.
        fill_value: what a chunk without a file holds.
        path: the array's path in the store (chunk keys are relative to the store root).
    """

    dtype: np.dtype[Any]
    chunk_shape: tuple[int, ...]
    compressor: Codec | None
    checksum: bool
    fill_value: Any
    path: str

    @classmethod
    def of(cls, array: zarr.Array[Any]) -> PlainCodecs | None:
        """The plain codecs of ``array``, or ``None`` where it is not plain (see the module)."""
        metadata = array.metadata
        if not isinstance(metadata, ArrayV3Metadata) or not isinstance(metadata.chunk_grid, RegularChunkGrid):
            return None
        if tuple(metadata.chunk_grid.chunk_shape[1:]) != tuple(array.shape[1:]):
            return None
        if metadata.encode_chunk_key((0,) * array.ndim) != chunk_key("", 0, array.ndim):
            return None
        try:
            dtype = np.dtype(array.dtype)
        except TypeError:
            return None
        if dtype.kind not in "biufc":
            return None
        codecs = list(metadata.codecs)
        checksum = bool(codecs) and type(codecs[-1]) is zarr.codecs.Crc32cCodec
        if checksum:
            codecs = codecs[:-1]
        if not codecs or type(codecs[0]) is not zarr.codecs.BytesCodec or len(codecs) > 2:
            return None
        endian = codecs[0].endian
        if dtype.itemsize > 1 and endian is not None:
            dtype = dtype.newbyteorder("<" if endian.value == "little" else ">")
        compressor = None
        if len(codecs) == 2:
            compressor = _compressor(codecs[1], dtype.itemsize)
            if compressor is None:
                return None
        shape = tuple(int(n) for n in metadata.chunk_grid.chunk_shape)
        return cls(dtype, shape, compressor, checksum, array.fill_value, array.path)

    @property
    def nbytes(self) -> int:
        """Bytes of one decoded chunk."""
        return int(np.prod(self.chunk_shape, dtype=np.int64)) * self.dtype.itemsize

    def key(self, chunk: int) -> str:
        """The store key of row chunk ``chunk``'s file."""
        return chunk_key(self.path, chunk, len(self.chunk_shape))

    def filled(self) -> np.ndarray:
        """A whole chunk of the fill value (what a chunk without a file holds)."""
        return np.full(self.chunk_shape, self.fill_value, dtype=self.dtype)

    def encode(self, data: np.ndarray) -> bytes:
        """The bytes of the file of a chunk holding ``data`` (a whole chunk)."""
        if data.shape != self.chunk_shape:
            raise ValueError(f"expected a whole chunk of shape {self.chunk_shape}; got {data.shape}")
        raw = np.ascontiguousarray(data, dtype=self.dtype)
        payload: Any = raw.reshape(-1).view(np.uint8)
        if self.compressor is not None:
            payload = self.compressor.encode(payload)
        body = bytes(payload)
        if self.checksum:
            body += crc32c_of(body).to_bytes(4, "little")
        return body

    def decode(self, stored: bytes, where: str) -> np.ndarray:
        """The whole chunk stored as ``stored`` (a writable array of its own), checked: its
        checksum and its size. ``where`` names the file in errors."""
        payload: Any = stored
        if self.checksum:
            if len(stored) < 4:
                raise ValueError(f"chunk {where} holds {len(stored)} bytes: too short for its checksum")
            payload = memoryview(stored)[:-4]
            if crc32c_of(payload) != int.from_bytes(stored[-4:], "little"):
                raise ValueError(f"chunk {where} fails its crc32c checksum: its bytes changed after writing")
        if self.nbytes == 0:  # rows of no values (Blosc cannot decode an empty frame)
            return np.empty(self.chunk_shape, dtype=self.dtype)
        if self.compressor is not None:
            payload = self.compressor.decode(payload)
        if len(payload) != self.nbytes:
            raise ValueError(f"chunk {where} decodes to {len(payload)} bytes; expected {self.nbytes}")
        return np.frombuffer(payload, dtype=self.dtype).reshape(self.chunk_shape).copy()
