"""Every name a store holds on disk, and the format versions: the one place they are spelled.

A store is plain Zarr v3::

    <root>/                     attrs[ATTRS_KEY] = {"format_version": STORE_FORMAT_VERSION, "created"}
      <entry>/                  attrs[ATTRS_KEY]: the entry's metadata (ENTRY_META_KEYS)
        features                (N, *out_shape), or features_<key> per module output (FEATURES)
        <field>                 passthrough fields (labels, ids, ...)
        valid                   (N,) bool: a row is served only where it is set (VALID)
        chunk_crc               (chunks, arrays, 2) uint32: identity-bound checksums (CHUNK_CRC)
        access                  (chunks, 2) float64: last access and count per chunk (ACCESS)
        key, next_row           keyed entries only (cached_module): content keys, rows handed out
        <name>.offsets          a ragged array's (N, 2) int64 [start, stop) per row in its chunk's values
        <name>.values/<chunk>   a ragged array's values of one row chunk (one zarr chunk)

Arrays chunked along rows have the dimension ``SAMPLE_DIM`` first; their chunk keys are built
and parsed by :mod:`cachedfeatures.format.chunk_keys`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "ACCESS",
    "ACCESS_COLUMNS",
    "ACCESS_DIMS",
    "ATTRS_KEY",
    "CHUNK_CRC",
    "CHUNK_CRC_DIMS",
    "CREATING_KEY",
    "ENTRY_KEY_VERSION",
    "ENTRY_META_KEYS",
    "FEATURES",
    "FORMAT_VERSION_KEY",
    "KEY",
    "NEXT_ROW",
    "NOT_ROW_CHUNKED",
    "OFFSETS_SUFFIX",
    "RESERVED",
    "SAMPLE_DIM",
    "STORE_FORMAT_VERSION",
    "STREAM_ROWS",
    "TORCH_DTYPE_ATTR",
    "VALID",
    "VALUES_SUFFIX",
    "dimension_names",
    "is_entry_meta",
    "offsets_name",
    "ragged_values_chunk",
    "values_chunk_name",
    "values_name",
]

# -- versions ------------------------------------------------------------------------------------

# The layout of a store (the names here, the arrays' shapes and meaning), written as
# "format_version" into the root's and every entry's attrs. A reader refuses a store whose
# version is higher than its own; bump it only for a change older readers would misread.
STORE_FORMAT_VERSION = 1
# The scheme of entry names: mixed into every entry's option digest (as "format_version", see
# cachedfeatures.compute.fingerprint.options_json). Bumping it gives every entry a new name, so
# nothing cached before is served; stores stay readable.
ENTRY_KEY_VERSION = 1

# -- attributes ----------------------------------------------------------------------------------

# The attribute (of the root group and of each entry group) that holds the library's metadata.
ATTRS_KEY = "cachedfeatures"
# The key of the version inside that attribute (root and entries).
FORMAT_VERSION_KEY = "format_version"
# The keys of an entry's metadata. "arrays" marks an entry as complete: it is written last.
ENTRY_META_KEYS = (
    "kind",  # "module_cache" or "stream" for keyed entries; absent for dataset entries
    "stream",  # stream entries: the record of a complete epoch (keys, digest, source state)
    "module",  # {"description", "digest", ...}: the module's fingerprint
    "dataset",  # {"description", "digest", ...}: the dataset's fingerprint
    "options",
    "outputs",  # the OutputLayout: which arrays hold module outputs
    "sample",  # the SampleLayout: how a sample is rebuilt from the arrays
    FORMAT_VERSION_KEY,
    "entry",  # the entry's name
    "num_rows",
    "chunk_rows",
    "arrays",  # one ArraySpec.to_json() per data array
    "compressor",
    "chunk_checksums",  # "crc32c-identity" where CHUNK_CRC exists
    "created",
    "library_version",
)
# The attribute of an entry group while it is being created (before ATTRS_KEY lands): the
# creator's storage options ("chunk_rows", "compressor", "checksum") and "started" (unix
# seconds), so a concurrent creator with other options gets an error instead of replacing
# the arrays. Dropped when the entry's metadata is written.
CREATING_KEY = "cachedfeatures_creating"
# An attribute of each data array: the torch dtype its rows are served as (bfloat16 bits...).
TORCH_DTYPE_ATTR = "torch_dtype"

# -- arrays --------------------------------------------------------------------------------------

# The module output of a module returning one tensor; "features_<key>" for tuples and dicts.
FEATURES = "features"
# (N,) bool: a row is served only where it is set.
VALID = "valid"
# (num_chunks, 2) float64: last access (unix seconds) and access count per chunk. Written by
# the access log; absent in entries that were never read under a budget.
ACCESS = "access"
# (num_chunks, num_arrays, 2) uint32: checksums bound to each chunk's identity (see
# cachedfeatures.format.chunk_identity); absent in entries written before them.
CHUNK_CRC = "chunk_crc"
# Keyed entries (cached_module): (capacity, 16) uint8 content key of each row, and the
# (1,) int64 count of rows handed out so far.
KEY = "key"
NEXT_ROW = "next_row"
# Stream entries (CachedIterableDataset): (num_keys,) int64 rows of every key of the source,
# written when an epoch ended with every key cached (the cache-only pass serves them).
STREAM_ROWS = "stream_rows"
# Names a dataset's passthrough field may not take: the bookkeeping arrays of every entry.
RESERVED = frozenset({VALID, ACCESS, CHUNK_CRC})
# Arrays of an entry whose chunks are not row chunks: their bytes are not part of any row chunk
# (dropping a chunk does not free them).
NOT_ROW_CHUNKED = frozenset({ACCESS, NEXT_ROW, STREAM_ROWS})

# -- dimensions ----------------------------------------------------------------------------------

# The first dimension of every row-chunked array: the row index in the wrapped dataset.
SAMPLE_DIM = "sample"
ACCESS_DIMS = ("chunk", "access_stat")
# The "columns" attribute of ACCESS: what its two columns hold.
ACCESS_COLUMNS = ("last_access_unix_seconds", "count")
CHUNK_CRC_DIMS = ("chunk", "array", "slot")


def dimension_names(array: str, ndim: int) -> tuple[str, ...]:
    """The dimension names of data array ``array`` of ``ndim`` dimensions (xarray reads them):
    ``("sample", "<array>_dim1", ...)``."""
    return (SAMPLE_DIM, *(f"{array}_dim{i}" for i in range(1, ndim)))


def is_entry_meta(attrs: Mapping[str, Any]) -> bool:
    """Whether a group's ``attrs`` mark it as a complete entry (its metadata names its arrays)."""
    meta = attrs.get(ATTRS_KEY)
    return isinstance(meta, Mapping) and "arrays" in meta


# A ragged (variable-length) array ``<name>`` is stored as ``<name>.offsets``, (N, 2) int64 chunked
# along rows like every array (each row's [start, stop) in its row chunk's values; -1 for a row
# without values), and the group ``<name>.values``, holding one array per row chunk,
# ``<name>.values/<chunk>``, of shape (values in that chunk, *inner shape), in one zarr chunk.
# See docs/concepts/variable-length.md and cachedfeatures.format.ragged.
OFFSETS_SUFFIX = ".offsets"
VALUES_SUFFIX = ".values"


def offsets_name(name: str) -> str:
    """The offsets array of ragged array ``name``."""
    return f"{name}{OFFSETS_SUFFIX}"


def values_name(name: str) -> str:
    """The group of per-row-chunk values arrays of ragged array ``name``."""
    return f"{name}{VALUES_SUFFIX}"


def values_chunk_name(name: str, chunk: int) -> str:
    """The values array of row chunk ``chunk`` of ragged array ``name`` (relative to the entry)."""
    return f"{name}{VALUES_SUFFIX}/{chunk}"


def ragged_values_chunk(key: str) -> int | None:
    """The row chunk a key inside an entry belongs to if it is part of a per-chunk values array
    (``<name>.values/<chunk>/...``), else ``None``."""
    parts = key.split("/", 2)
    if len(parts) >= 3 and parts[0].endswith(VALUES_SUFFIX) and parts[1].isdigit():
        return int(parts[1])
    return None
