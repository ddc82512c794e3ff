"""cachedfeatures: train on frozen backbones without recomputing their features.

Wrap a map-style dataset and a frozen module in :class:`CachedFeatureDataset`; features are
computed once, stored chunked in a Zarr store, and served from it on every later epoch.

The modules form layers, each importing only from the layers below it (see "Layout" in
docs/development.md; the import-linter contract in ``pyproject.toml`` enforces it); this package re-exports
the public API.
"""

from cachedfeatures._version import __version__
from cachedfeatures.dataset import CachedFeatureDataset
from cachedfeatures.errors import (
    ArgumentTypeError,
    BudgetError,
    CacheError,
    CacheWarning,
    CachingPausedWarning,
    CallConventionError,
    ChunkSizeError,
    DamagedStoreError,
    DeviceInWorkerError,
    DtypeError,
    EntryNotFoundError,
    FieldNotStorableError,
    FingerprintWarning,
    InputBatchError,
    InputKeyError,
    InputTypeError,
    InvalidArgumentError,
    ModuleOutputError,
    NonDeterministicDatasetError,
    NotAFeatureStoreError,
    OptionWithoutStoreError,
    OutputShapeError,
    RankLostError,
    RankMismatchError,
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
from cachedfeatures.module_cache import ModuleCache, cached_module
from cachedfeatures.pipeline.nodes import Loader
from cachedfeatures.pipeline.prefill import PrefillResult, build_on_ranks
from cachedfeatures.pipeline.sampler import ChunkShuffleSampler
from cachedfeatures.reader.chunk_reader import ChunkReader
from cachedfeatures.store.faults import WriteGuard
from cachedfeatures.store.feature_store import Entry, FeatureStore
from cachedfeatures.store.ownership import ChunkOwnership

__all__ = [
    "ArgumentTypeError",
    "BudgetError",
    "CacheError",
    "CacheWarning",
    "CachedFeatureDataset",
    "CachingPausedWarning",
    "CallConventionError",
    "ChunkOwnership",
    "ChunkReader",
    "ChunkShuffleSampler",
    "ChunkSizeError",
    "DamagedStoreError",
    "DeviceInWorkerError",
    "DtypeError",
    "Entry",
    "EntryNotFoundError",
    "FeatureStore",
    "FieldNotStorableError",
    "FingerprintWarning",
    "InputBatchError",
    "InputKeyError",
    "InputTypeError",
    "InvalidArgumentError",
    "Loader",
    "ModuleCache",
    "ModuleOutputError",
    "NonDeterministicDatasetError",
    "NotAFeatureStoreError",
    "OptionWithoutStoreError",
    "OutputShapeError",
    "PrefillResult",
    "RankLostError",
    "RankMismatchError",
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
    "build_on_ranks",
    "cached_module",
]
