"""The Zarr feature store: backends, entries, locks, ownership, access log, the hit-path integrity
check, the writer, the write guard.

Imports the reader, the format layer and the base; never pruning, compute, the pipeline or the faces.
"""

from cachedfeatures.store.backend import Backend
from cachedfeatures.store.feature_store import Entry, FeatureStore

__all__ = ["Backend", "Entry", "FeatureStore"]
