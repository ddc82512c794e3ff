"""Store write faults: a full disk, an I/O error or a read-only store pauses caching, never training.

Every store write from the data path goes through a :class:`WriteGuard`. When a write fails
with an operating-system error (``ENOSPC``, ``EIO``, ``EACCES``, ``EROFS``, an object store
refusing a put, ...) or because the store is read-only, the guard issues ONE warning
(:class:`~cachedfeatures.errors.CachingPausedWarning`), and later writes are skipped: the
features computed for the batch are still served. After ``retry_after_batches`` skipped
writes or ``retry_after_seconds``, whichever comes first, the guard tries again; when a write
succeeds, caching has resumed (logged at INFO). Nothing half-written is served: ``Entry.write``
marks a chunk's rows valid only after all their arrays were stored, and a failed write leaves
``valid`` as it was.

The guard is a plain callable object, so any writer (the map-style dataset, a background
writer thread) can share it: ``guard.run(lambda: entry.write(rows, columns))``.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cachedfeatures.errors import CacheError, CachingPausedWarning, InvalidArgumentError, ReadOnlyStoreWarning
from cachedfeatures.parse import expected, parse_int

if TYPE_CHECKING:
    from cachedfeatures.store.feature_store import Entry

__all__ = ["WriteGuard", "WriteStats", "is_read_only_error", "is_store_fault"]

logger = logging.getLogger(__name__)

# Errnos that mean "this store cannot be written here" rather than "the device failed".
_READ_ONLY_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def is_read_only_error(error: BaseException) -> bool:
    """Whether ``error`` says the store refuses writes (permissions, read-only mode)."""
    if isinstance(error, PermissionError):
        return True
    if isinstance(error, OSError) and error.errno in _READ_ONLY_ERRNOS:
        return True
    # zarr's Store._check_writable raises a bare ValueError with this wording.
    return isinstance(error, ValueError) and "read-only mode" in str(error)


def is_store_fault(error: BaseException) -> bool:
    """Whether ``error`` is a failure of the storage (retryable), not a bug in the data.

    Operating-system errors (disk full, I/O error, permissions, network, an object store
    refusing a put) and zarr's read-only refusal are store faults; anything else (a wrong
    shape, a bad dtype) is a bug that must surface.
    """
    if isinstance(error, CacheError):  # our own errors say what to fix (StorePathError is an OSError)
        return False
    return isinstance(error, OSError) or is_read_only_error(error)


@dataclass
class WriteStats:
    """What a :class:`WriteGuard` did: writes attempted, failed and skipped while paused."""

    written: int = 0
    failed: int = 0
    skipped: int = 0
    pauses: int = 0
    resumes: int = 0


class WriteGuard:
    """Runs store writes; pauses caching (one warning) when the store fails, and retries later.

    Args:
        location: the store's location, named in the warning.
        retry_after_batches: while paused, try writing again after this many skipped
            writes. Default 64.
        retry_after_seconds: ... or after this many seconds, whichever comes first. Default 30.
        read_only: never write; the first skipped write warns
            (:class:`~cachedfeatures.errors.ReadOnlyStoreWarning`). Default ``False``.
        clock: a monotonic clock in seconds (tests pass their own).
    """

    def __init__(
        self,
        location: str = "the store",
        *,
        retry_after_batches: int = 64,
        retry_after_seconds: float = 30.0,
        read_only: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        retry_after_batches = parse_int(
            "retry_after_batches", retry_after_batches, minimum=1, strict_type=True
        )
        if not retry_after_seconds >= 0:
            raise InvalidArgumentError(
                expected("retry_after_seconds to be a number >= 0", retry_after_seconds)
            )
        self.location = location
        self.retry_after_batches = retry_after_batches
        self.retry_after_seconds = float(retry_after_seconds)
        self.clock = clock
        self.stats = WriteStats()
        self._read_only_reason: str | None = "the store was opened read-only" if read_only else None
        self._read_only_category: type[CachingPausedWarning] = ReadOnlyStoreWarning
        self._warned_read_only = False
        self._paused_at: float | None = None
        self._skipped_since_pause = 0
        self._lock = threading.Lock()

    @property
    def paused(self) -> bool:
        """Whether writes are being skipped now (after a failure, or read-only)."""
        return self._paused_at is not None or self._read_only_reason is not None

    @property
    def read_only(self) -> bool:
        return self._read_only_reason is not None

    def set_read_only(self, reason: str, error: BaseException | None = None) -> None:
        """Never write again, and say why once (for example the store refused to create an entry).

        The warning is a :class:`~cachedfeatures.errors.ReadOnlyStoreWarning` unless ``error``
        is a fault other than a refusal (a full disk), which gives a ``CachingPausedWarning``.
        """
        self._read_only_reason = reason
        self._read_only_category = (
            CachingPausedWarning
            if error is not None and not is_read_only_error(error)
            else ReadOnlyStoreWarning
        )

    def write(
        self, entry: Entry, indices: Sequence[int] | np.ndarray, columns: Mapping[str, np.ndarray]
    ) -> bool:
        """``entry.write(indices, columns)`` under the guard; whether the rows were stored."""
        if len(indices) == 0:
            return True
        return self.run(lambda: entry.write(indices, columns))

    def run(self, write: Callable[[], object]) -> bool:
        """Call ``write()`` unless caching is paused; whether it ran and succeeded.

        A store fault (see :func:`is_store_fault`) pauses caching with one warning and returns
        ``False``; any other exception propagates.
        """
        with self._lock:
            if self._read_only_reason is not None:
                self.stats.skipped += 1
                self._warn_read_only_once()
                return False
            if self._paused_at is not None and not self._retry_due():
                self.stats.skipped += 1
                self._skipped_since_pause += 1
                return False
            retrying = self._paused_at is not None
        try:
            write()
        except Exception as error:
            if not is_store_fault(error):
                raise
            with self._lock:
                self.stats.failed += 1
                self._pause(error, retrying)
            return False
        with self._lock:
            self.stats.written += 1
            if self._paused_at is not None:
                self._paused_at = None
                self.stats.resumes += 1
                logger.info("cachedfeatures: writing to %s works again; caching resumed.", self.location)
        return True

    # -- internals -------------------------------------------------------------------------------

    def _retry_due(self) -> bool:
        if self._paused_at is None:
            return True
        waited = self.clock() - self._paused_at
        return self._skipped_since_pause >= self.retry_after_batches or waited >= self.retry_after_seconds

    def _pause(self, error: BaseException, retrying: bool) -> None:
        self._paused_at = self.clock()
        self._skipped_since_pause = 0
        if retrying:  # still failing: the warning was issued when caching paused
            logger.debug("cachedfeatures: writing to %s still fails: %r", self.location, error)
            return
        self.stats.pauses += 1
        read_only = is_read_only_error(error)
        category = ReadOnlyStoreWarning if read_only else CachingPausedWarning
        what = "the store refuses writes" if read_only else "the write failed"
        warnings.warn(
            f"cachedfeatures: caching paused: {what} at {self.location} ({type(error).__name__}: "
            f"{error}). Training goes on with freshly computed features, which are not stored; "
            f"no row is marked valid unless all its bytes were written. Writes are retried after "
            f"{self.retry_after_batches} batches or {self.retry_after_seconds:g} s. Free space or "
            "fix the store to resume caching.",
            category,
            stacklevel=4,
        )

    def _warn_read_only_once(self) -> None:
        if self._warned_read_only:
            return
        self._warned_read_only = True
        warnings.warn(
            f"cachedfeatures: {self._read_only_reason} ({self.location}): cached rows are served, "
            "misses are computed but not stored. Open the store writable to cache them.",
            self._read_only_category,
            stacklevel=4,
        )

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
