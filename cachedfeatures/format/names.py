"""The names of the bookkeeping arrays of an entry.

Every entry holds ``valid`` beside its features and fields, and ``access`` once it was read
under a budget; :mod:`cachedfeatures.store.feature_store` creates them,
:mod:`cachedfeatures.store.explore` and the pruning layer read them.
"""

__all__ = ["ACCESS", "VALID"]

# (N,) bool: a row is served only where it is set.
VALID = "valid"
# (num_chunks, 2) float64: last access (unix seconds) and access count per chunk. Written by
# the pruning layer; absent in entries that were never read under a budget.
ACCESS = "access"
