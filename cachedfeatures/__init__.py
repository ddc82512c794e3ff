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
    DuplicateKeyError,
    EntryConflictError,
    EntryNotFoundError,
    FieldNameError,
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
    ViewLoadError,
    WriterError,
)
from cachedfeatures.module_cache import ModuleCache, cached_module, default_cache_dir, default_store_path
from cachedfeatures.options import DatasetOptions
from cachedfeatures.pipeline.collate import PadCollate, RaggedBatch, pad_collate
from cachedfeatures.pipeline.nodes import Loader
from cachedfeatures.pipeline.prefill import PrefillResult, build_on_ranks
from cachedfeatures.pipeline.resident import DeviceFeatures
from cachedfeatures.pipeline.sampler import ChunkShuffleSampler
from cachedfeatures.reader.chunk_reader import ChunkReader
from cachedfeatures.store.faults import WriteGuard
from cachedfeatures.store.feature_store import Entry, FeatureStore
from cachedfeatures.store.ownership import ChunkOwnership
from cachedfeatures.stream_dataset import CachedIterableDataset

__all__ = [
    "ArgumentTypeError",
    "BudgetError",
    "CacheError",
    "CacheWarning",
    "CachedFeatureDataset",
    "CachedIterableDataset",
    "CachingPausedWarning",
    "CallConventionError",
    "ChunkOwnership",
    "ChunkReader",
    "ChunkShuffleSampler",
    "ChunkSizeError",
    "DamagedStoreError",
    "DatasetOptions",
    "DeviceFeatures",
    "DeviceInWorkerError",
    "DtypeError",
    "DuplicateKeyError",
    "Entry",
    "EntryConflictError",
    "EntryNotFoundError",
    "FeatureStore",
    "FieldNameError",
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
    "PadCollate",
    "PrefillResult",
    "RaggedBatch",
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
    "ViewLoadError",
    "WriteGuard",
    "WriterError",
    "__version__",
    "build_on_ranks",
    "cached_module",
    "default_cache_dir",
    "default_store_path",
    "pad_collate",
]
