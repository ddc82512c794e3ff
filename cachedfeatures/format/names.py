"""The names of the bookkeeping arrays of an entry.

Every entry holds ``valid`` beside its features and fields, and ``access`` once it was read
under a budget; :mod:`cachedfeatures.store.feature_store` creates them,
:mod:`cachedfeatures.store.explore` and the pruning layer read them.
"""

__all__ = [
    "ACCESS",
    "OFFSETS_SUFFIX",
    "VALID",
    "VALUES_SUFFIX",
    "offsets_name",
    "ragged_values_chunk",
    "values_chunk_name",
    "values_name",
]

# (N,) bool: a row is served only where it is set.
VALID = "valid"
# (num_chunks, 2) float64: last access (unix seconds) and access count per chunk. Written by
# the pruning layer; absent in entries that were never read under a budget.
ACCESS = "access"

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
