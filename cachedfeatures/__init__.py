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
    DeviceInWorkerError,
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
    StaleFeaturesError,
    StorePathError,
    TrainingModeError,
    UnhashableArgumentError,
    UnknownArrayError,
    WriterError,
)
from cachedfeatures.faults import WriteGuard
from cachedfeatures.module_cache import ModuleCache, cached_module
from cachedfeatures.ownership import ChunkOwnership
from cachedfeatures.pipeline import Loader
from cachedfeatures.prefill import PrefillResult
from cachedfeatures.reader import ChunkReader
from cachedfeatures.sampler import ChunkShuffleSampler
from cachedfeatures.store import Entry, FeatureStore

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CacheError",
    "CacheWarning",
    "CachedFeatureDataset",
    "CachingPausedWarning",
    "ChunkOwnership",
    "ChunkReader",
    "ChunkShuffleSampler",
    "DeviceInWorkerError",
    "Entry",
    "EntryNotFoundError",
    "FeatureStore",
    "FieldNotStorableError",
    "InputBatchError",
    "InputKeyError",
    "Loader",
    "ModuleCache",
    "ModuleOutputError",
    "NonDeterministicDatasetError",
    "NotAFeatureStoreError",
    "OutputShapeError",
    "PrefillResult",
    "ReadOnlyStoreWarning",
    "RequiresGradError",
    "RowsNotCachedError",
    "StaleFeaturesError",
    "StorePathError",
    "TrainingModeError",
    "UnhashableArgumentError",
    "UnknownArrayError",
    "WriteGuard",
    "WriterError",
    "__version__",
    "cached_module",
]
