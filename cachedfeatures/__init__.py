"""cachedfeatures: train on frozen backbones without recomputing their features.

Wrap a map-style dataset and a frozen module in :class:`CachedFeatureDataset`; features are
computed once, stored chunked in a Zarr store, and served from it on every later epoch.
"""

from cachedfeatures.dataset import CachedFeatureDataset
from cachedfeatures.errors import (
    CacheError,
    FieldNotStorableError,
    InputKeyError,
    ModuleOutputError,
    NonDeterministicDatasetError,
    NotAFeatureStoreError,
    OutputShapeError,
    StorePathError,
    TrainingModeError,
)
from cachedfeatures.reader import ChunkReader
from cachedfeatures.sampler import ChunkShuffleSampler
from cachedfeatures.store import Entry, FeatureStore

__version__ = "0.1.0"

__all__ = [
    "CacheError",
    "CachedFeatureDataset",
    "ChunkReader",
    "ChunkShuffleSampler",
    "Entry",
    "FeatureStore",
    "FieldNotStorableError",
    "InputKeyError",
    "ModuleOutputError",
    "NonDeterministicDatasetError",
    "NotAFeatureStoreError",
    "OutputShapeError",
    "StorePathError",
    "TrainingModeError",
    "__version__",
]
