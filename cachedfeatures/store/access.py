"""Per-chunk access statistics: when each chunk was last used, and how often.

They live in each entry's reserved ``access`` array, shape ``(num_chunks, 2)`` float64:
column 0 the last access (unix seconds), column 1 the access count. Pruning reads them to
choose what to drop, and ``cachedfeatures info`` shows when an entry was last used.

Recording sits on the hot read path, so an :class:`AccessLog` counts in memory and writes
to the store only now and then: every ``flush_every`` seconds, at :meth:`AccessLog.flush`
and at process exit, merging with what other processes wrote (latest time wins, counts
add) under a lock. A pruner in the same process merges in what is still pending.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from cachedfeatures.format.names import ACCESS, ACCESS_COLUMNS, ACCESS_DIMS
from cachedfeatures.store.exit_hooks import at_exit

if TYPE_CHECKING:
    from cachedfeatures.store.feature_store import Entry

__all__ = ["AccessLog", "read_access"]

logger = logging.getLogger(__name__)

LAST, COUNT = 0, 1
DEFAULT_FLUSH_EVERY = 10.0


def read_access(entry: Entry) -> np.ndarray:
    """The stored statistics of ``entry``, ``(num_chunks, 2)``; zeros where never recorded."""
    array = _access_array(entry)
    if array is None:
        return np.zeros((entry.num_chunks, 2), dtype=np.float64)
    return np.asarray(array[:], dtype=np.float64)


def last_used(entry: Entry, stats: np.ndarray | None = None) -> float | None:
    """When any chunk of ``entry`` was last read or written (unix seconds), or ``None`` if
    never recorded: the one definition behind ``Entry.last_used``, ``cachedfeatures info`` and
    the order in which pruning empties entries. ``stats`` (as :func:`read_access` returns
    them) saves reading them again."""
    stats = read_access(entry) if stats is None else stats
    latest = float(np.nanmax(stats[:, LAST], initial=0.0)) if len(stats) else 0.0
    return latest if latest > 0 else None


class AccessLog:
    """Access counts of one entry's chunks, kept in memory and merged into the store on flush.

    Safe to copy into DataLoader workers: a forked or unpickled copy starts with nothing
    pending, so counts are never flushed twice.
    """

    def __init__(self, entry: Entry, flush_every: float = DEFAULT_FLUSH_EVERY) -> None:
        self.entry = entry
        self.flush_every = flush_every
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._guard = threading.Lock()
        self._last = np.zeros(self.entry.num_chunks, dtype=np.float64)
        self._count = np.zeros(self.entry.num_chunks, dtype=np.float64)
        self._clock = 0.0
        self._flushed_at = time.monotonic()
        self._array: zarr.Array[Any] | None = None
        _register_for_exit(self)

    def __getstate__(self) -> dict[str, Any]:
        return {"entry": self.entry, "flush_every": self.flush_every}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.entry = state["entry"]
        self.flush_every = state["flush_every"]
        self._reset()

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # forked: the parent flushes its own counts
            self._reset()

    def record(self, chunks: Iterable[int] | np.ndarray) -> None:
        """Count one access of each distinct chunk in ``chunks``, stamped now.

        Stamps strictly increase within a process, so a later call is always more recent.
        (A chunk listed twice counts once: NumPy's indexed ``+=`` adds once per distinct index.)
        """
        self._check_process()
        chunks = np.asarray(chunks, dtype=np.int64)
        if len(chunks) == 0:
            return
        with self._guard:
            self._clock = max(time.time(), self._clock + 1e-6)
            self._last[chunks] = self._clock
            self._count[chunks] += 1
        if time.monotonic() - self._flushed_at >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Merge the pending counts into the store (latest time wins, counts add)."""
        self._check_process()
        with self._guard:
            touched = np.flatnonzero(self._count)
            self._flushed_at = time.monotonic()
            if len(touched) == 0:
                return
            last, count = self._last[touched], self._count[touched]
            self._count[touched] = 0
        with self.entry.locks.lock(f"{self.entry.name}.access"):
            array = self._ensure_array()
            stored = np.asarray(array.oindex[touched], dtype=np.float64)
            stored[:, LAST] = np.maximum(stored[:, LAST], last)
            stored[:, COUNT] += count
            array.oindex[touched] = stored

    def stats(self) -> np.ndarray:
        """Stored statistics merged with what this process has not flushed yet."""
        self._check_process()
        merged = read_access(self.entry)
        with self._guard:
            merged[:, LAST] = np.maximum(merged[:, LAST], self._last)
            merged[:, COUNT] += self._count
        return merged

    def _ensure_array(self) -> zarr.Array[Any]:
        if self._array is None:
            self._array = _access_array(self.entry) or _create_access_array(self.entry)
        return self._array


def _access_array(entry: Entry) -> zarr.Array[Any] | None:
    try:
        array = entry.group[ACCESS]
    except KeyError:
        return None
    return array if isinstance(array, zarr.Array) else None


def _create_access_array(entry: Entry) -> zarr.Array[Any]:
    with entry.locks.entry(entry.name):
        existing = _access_array(entry)
        if existing is not None:
            return existing
        try:
            return _new_access_array(entry)
        except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError):
            # Created by another process (no lock between processes on an object store).
            return _access_array(entry) or _new_access_array(entry)


def _new_access_array(entry: Entry) -> zarr.Array[Any]:
    return entry.group.create_array(
        ACCESS,
        shape=(entry.num_chunks, 2),
        chunks=(min(entry.num_chunks, 65536), 2),
        dtype="float64",
        fill_value=0.0,
        dimension_names=ACCESS_DIMS,
        attributes={"columns": list(ACCESS_COLUMNS), "chunk_rows": entry.chunk_rows},
    )


# -- flushing at process exit ------------------------------------------------------------------
# One hook per process flushes every live log (cachedfeatures.store.exit_hooks says where it runs).

_live: weakref.WeakSet[AccessLog] = weakref.WeakSet()


def _register_for_exit(log: AccessLog) -> None:
    _live.add(log)
    at_exit(_flush_all, priority=100)


def _flush_all() -> None:
    for log in list(_live):
        try:
            log.flush()
        except Exception as error:  # statistics are advisory; never fail an exit over them
            logger.debug("cachedfeatures: could not flush access statistics: %s", error)
