"""cachedfeatures: train on frozen backbones without recomputing their features.

Wrap a map-style dataset and a frozen module in :class:`CachedFeatureDataset`; features are
computed once, stored chunked in a Zarr store, and served from it on every later epoch.
"""

from cachedfeatures.dataset import CachedFeatureDataset
from cachedfeatures.errors import (
    BudgetError,
    CacheError,
    CacheWarning,
    CachingPausedWarning,
    EntryNotFoundError,
    FieldNotStorableError,
    InputBatchError,
    InputKeyError,
    ModuleOutputError,
    NonDeterministicDatasetError,
    NotAFeatureStoreError,
    OutputShapeError,
    ReadOnlyStoreWarning,
    RequiresGradError,
    RowsNotCachedError,
    StorePathError,
    TrainingModeError,
    UnhashableArgumentError,
    UnknownArrayError,
)
from cachedfeatures.faults import WriteGuard
from cachedfeatures.module_cache import ModuleCache, cached_module
from cachedfeatures.ownership import ChunkOwnership
from cachedfeatures.store import Entry, FeatureStore

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CacheError",
    "CacheWarning",
    "CachedFeatureDataset",
    "CachingPausedWarning",
    "ChunkOwnership",
    "Entry",
    "EntryNotFoundError",
    "FeatureStore",
    "FieldNotStorableError",
    "InputBatchError",
    "InputKeyError",
    "ModuleCache",
    "ModuleOutputError",
    "NonDeterministicDatasetError",
    "NotAFeatureStoreError",
    "OutputShapeError",
    "ReadOnlyStoreWarning",
    "RequiresGradError",
    "RowsNotCachedError",
    "StorePathError",
    "TrainingModeError",
    "UnhashableArgumentError",
    "UnknownArrayError",
    "WriteGuard",
    "__version__",
    "cached_module",
]
