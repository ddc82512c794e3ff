"""Serialising chunk writes: a chunk write is read-modify-write, and two unserialised
writers of one chunk lose one writer's rows.

On a local filesystem every chunk has an OS file lock (``flock`` through ``filelock``),
which the kernel releases when a process dies, so a crash never leaves a chunk locked. The
lock files live outside the Zarr hierarchy (Zarr warns about unknown files inside a group),
in a directory derived from the store's real path; set ``CACHEDFEATURES_LOCK_DIR`` to move
them. Stores without a filesystem (memory, object storage) get in-process locks only; there
each chunk must have exactly one writer process (see :mod:`cachedfeatures.store.ownership`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from contextlib import AbstractContextManager
from pathlib import Path

from filelock import FileLock

__all__ = ["FileLocks", "Locks", "ThreadLocks"]


class Locks:
    """A family of named locks; ``lock(name)`` returns a context manager."""

    def lock(self, name: str) -> AbstractContextManager[object]:
        raise NotImplementedError

    def chunk(self, entry: str, chunk: int) -> AbstractContextManager[object]:
        return self.lock(f"{entry}.chunk{chunk}")

    def entry(self, entry: str) -> AbstractContextManager[object]:
        return self.lock(f"{entry}.entry")


class ThreadLocks(Locks):
    """In-process locks, for stores no other process writes to."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def lock(self, name: str) -> AbstractContextManager[object]:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def __getstate__(self) -> dict[str, object]:
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__()  # type: ignore[misc]


class FileLocks(Locks):
    """OS file locks shared by every process on this machine that opens the same store."""

    def __init__(self, store_path: str | os.PathLike[str]) -> None:
        real = os.path.realpath(store_path)
        base = os.environ.get("CACHEDFEATURES_LOCK_DIR") or os.path.join(
            tempfile.gettempdir(), "cachedfeatures-locks"
        )
        digest = hashlib.blake2b(real.encode(), digest_size=8).hexdigest()
        self.directory = Path(base) / f"{Path(real).name}-{digest}"

    def lock(self, name: str) -> AbstractContextManager[object]:
        self.directory.mkdir(parents=True, exist_ok=True)
        # A fresh FileLock per use: instances must not travel into forked workers holding
        # a lock, and the kernel lock is per open file description anyway.
        return FileLock(self.directory / f"{name}.lock", thread_local=False)
