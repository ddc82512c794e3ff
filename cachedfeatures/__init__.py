"""cachedfeatures: train on frozen backbones without recomputing their features.

Wrap a map-style dataset and a frozen module in :class:`CachedFeatureDataset`; features are
computed once, stored chunked in a Zarr store, and served from it on every later epoch.
"""

from cachedfeatures.dataset import CachedFeatureDataset
from cachedfeatures.errors import (
    CacheError,
    CacheWarning,
    CachingPausedWarning,
    FieldNotStorableError,
    InputKeyError,
    ModuleOutputError,
    NonDeterministicDatasetError,
    NotAFeatureStoreError,
    OutputShapeError,
    ReadOnlyStoreWarning,
    RowsNotCachedError,
    StorePathError,
    TrainingModeError,
    UnknownArrayError,
    UnknownEntryError,
)
from cachedfeatures.faults import WriteGuard
from cachedfeatures.ownership import ChunkOwnership
from cachedfeatures.store import Entry, FeatureStore

__version__ = "0.1.0"

__all__ = [
    "CacheError",
    "CacheWarning",
    "CachedFeatureDataset",
    "CachingPausedWarning",
    "ChunkOwnership",
    "Entry",
    "FeatureStore",
    "FieldNotStorableError",
    "InputKeyError",
    "ModuleOutputError",
    "NonDeterministicDatasetError",
    "NotAFeatureStoreError",
    "OutputShapeError",
    "ReadOnlyStoreWarning",
    "RowsNotCachedError",
    "StorePathError",
    "TrainingModeError",
    "UnknownArrayError",
    "UnknownEntryError",
    "WriteGuard",
    "__version__",
]
