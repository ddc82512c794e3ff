"""Exceptions raised by cachedfeatures.

Every error derives from :class:`CacheError`, and most also from the matching built-in
(``InputKeyError`` is a ``KeyError``), so callers can catch the family or one case.
Each message says what happened and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ArgumentTypeError",
    "BudgetError",
    "CacheError",
    "CacheWarning",
    "CallConventionError",
    "CachingPausedWarning",
    "ChunkSizeError",
    "DamagedStoreError",
    "DtypeError",
    "DuplicateKeyError",
    "DeviceInWorkerError",
    "EntryConflictError",
    "EntryNotFoundError",
    "FieldNameError",
    "FieldNotStorableError",
    "FingerprintWarning",
    "InputBatchError",
    "InvalidArgumentError",
    "InputKeyError",
    "InputTypeError",
    "ModuleOutputError",
    "NonDeterministicDatasetError",
    "NotAFeatureStoreError",
    "OptionWithoutStoreError",
    "OutputShapeError",
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
    "WriterError",
]


class CacheError(Exception):
    """Base class of every error raised by cachedfeatures."""


class InvalidArgumentError(CacheError, ValueError):
    """An argument has a value the function cannot take (``batch_size=0``, ``policy="fifo"``);
    the message reads "Expected X. Got Y." and says how to fix it where it can."""


class ArgumentTypeError(CacheError, TypeError):
    """An argument is of a type the function cannot take (``storage_options=[...]``)."""


class InputKeyError(CacheError, KeyError):
    """``input_key`` does not name a field of the dataset's samples."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


class FieldNameError(CacheError, ValueError):
    """``field_names`` names something that is not a passthrough field, or gives a name that
    cannot be an array's (reserved, taken twice, or with characters a path cannot hold)."""


class FieldNotStorableError(CacheError, TypeError):
    """A sample field cannot be stored beside the features."""


class InputTypeError(CacheError, TypeError):
    """The module cannot take the input the samples give it (a ``PIL.Image``, a label, a
    ``datasets.Dataset`` row of Python lists); the message names the sample, the field and the fix."""


class CallConventionError(CacheError, TypeError):
    """``call="kwargs"`` was asked for, but the collated batch is not a Mapping with string keys."""


class ModuleOutputError(CacheError, TypeError):
    """The module returned something that is not a tensor, or a tuple/dict of tensors."""


class OutputShapeError(CacheError, ValueError):
    """The module's output (or a field) changed shape or dtype between batches."""


class NonDeterministicDatasetError(CacheError, RuntimeError):
    """The same sample loaded twice gave different inputs (random augmentation).

    ``sample`` is the index of that sample, where known.
    """

    def __init__(self, message: str, *, sample: int | None = None) -> None:
        super().__init__(message)
        self.sample = sample


class TrainingModeError(CacheError, RuntimeError):
    """The module is in training mode, so its outputs would depend on the batch."""


class StorePathError(CacheError, NotADirectoryError):
    """The store path cannot hold a Zarr store (it is a file, or a non-Zarr directory)."""


class NotAFeatureStoreError(CacheError, ValueError):
    """The Zarr store exists but was not written by cachedfeatures."""


class RowsNotCachedError(CacheError, LookupError):
    """Rows asked of a store entry are not valid there (never computed, or pruned)."""


class UnknownArrayError(CacheError, KeyError):
    """A store entry has no array of the given name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


class BudgetError(CacheError, ValueError):
    """The size budget cannot work: ``max_bytes`` is smaller than one chunk."""


class DamagedStoreError(CacheError, ValueError):
    """A store's metadata is damaged (a ``zarr.json`` unreadable or missing); the message names
    what, and ``cachedfeatures verify --repair STORE`` rebuilds it or drops the entry."""


class DtypeError(CacheError, TypeError):
    """A storage dtype that is not a floating-point type: casting features to an integer or
    bool type would silently round them away (features in -0.76..0.12 stored as int8 are 0)."""


class ChunkSizeError(CacheError, ValueError):
    """A chunk would be larger than the compressor can take (Blosc: 2 GiB)."""


class OptionWithoutStoreError(CacheError, ValueError):
    """An option that only a persistent store uses (a compressor, a byte budget, chunk rows)
    was given to a cache that has no store."""


class EntryConflictError(CacheError, ValueError):
    """Another process (or dataset) is creating, or has just created, the same entry with other
    storage options (``compressor``, ``chunk_rows``, ``checksum``: they are not part of the
    entry's name). Its arrays and rows are kept; pass the same options everywhere, or use
    another store."""


class EntryNotFoundError(CacheError, KeyError):
    """A store has no entry of the given name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


# -- warnings ---------------------------------------------------------------------------------


class CacheWarning(UserWarning):
    """Base class of every warning issued by cachedfeatures."""


class CachingPausedWarning(CacheWarning, RuntimeWarning):
    """Writing to the store failed (disk full, I/O error); features are served uncached."""


class ReadOnlyStoreWarning(CachingPausedWarning):
    """The store cannot be written (read-only, permissions); misses are computed, not stored."""


class RequiresGradError(CacheError, RuntimeError):
    """A cached module has parameters that require grad: cached outputs cannot carry gradients."""


class UnhashableArgumentError(CacheError, TypeError):
    """A cached call got a non-tensor argument that is not an int, float, str, bool or None."""


class InputBatchError(CacheError, ValueError):
    """A cached call's tensor inputs do not share one batch dimension (or there are none)."""


class DeviceInWorkerError(CacheError, RuntimeError):
    """A DataLoader worker would have to run the module on a CUDA device."""


class RankLostError(CacheError, RuntimeError):
    """A rank of a distributed ``prefill()`` did not reach its end in time (dead, hung, or far
    slower than the others): this rank's rows are stored; rerun the job to compute the rest."""


class RankMismatchError(CacheError, RuntimeError):
    """The ranks of a distributed ``prefill()`` do not fill one entry (their modules, datasets
    or options differ), so each would fill part of a different entry."""


class ViewLoadError(CacheError, RuntimeError):
    """Loading a view of a sample (``views=K``) in a helper process failed: the process died, or
    the dataset raised an exception that cannot be sent back whole (the message has its text)."""


class WriterError(CacheError, RuntimeError):
    """The background writer failed to store computed rows (the cause is chained)."""


class FingerprintWarning(CacheWarning):
    """Part of a module's or dataset's state could not be hashed: changes there go unseen."""


class StaleFeaturesError(CacheError, RuntimeError):
    """A spot check recomputed cached rows and they differ from what the store holds.

    Something the fingerprint cannot see changed (a file edited in place, a global config
    the module reads). ``entry`` names the store entry and ``rows`` the rows that differ.
    Takes the message alone as well, so a DataLoader worker can re-raise it in the main process.
    """

    def __init__(self, message: str, *, entry: str | None = None, rows: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.entry = entry
        self.rows = rows


class DuplicateKeyError(CacheError, ValueError):
    """A stream yielded one sample key twice in one pass: rows are stored by key, so two
    samples under one key would serve one's features for both."""
