"""A real on-disk store whose writes can be made to fail, as a full disk or a dying device would."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore, WrapperStore


class FaultyStore(WrapperStore[LocalStore]):
    """A ``LocalStore`` whose ``set`` raises ``OSError(fail_errno)`` while ``failing`` is set.

    ``fail_keys`` limits the failures to keys containing one of these substrings (for
    example ``"valid"``: feature chunks are written, the valid mask is not). ``attempts``
    and ``failures`` count calls, so tests can prove writes were tried and refused.

    It overrides writes only, so its backend is the plain local store's: file locks and direct
    chunk reads (see cachedfeatures.store.backend). Read faults: :class:`FaultyReadStore`.
    """

    def __init__(self, path: str | os.PathLike[str], fail_errno: int = errno.ENOSPC) -> None:
        super().__init__(LocalStore(Path(path)))
        self.failing = False
        self.fail_errno = fail_errno
        self.fail_keys: tuple[str, ...] = ()
        self.attempts = 0
        self.failures = 0

    def _with_store(self, store: LocalStore) -> FaultyStore:
        clone = type(self)(store.root, self.fail_errno)
        clone.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_store"})
        clone._store = store
        return clone

    def _should_fail(self, key: str) -> bool:
        return self.failing and (not self.fail_keys or any(part in key for part in self.fail_keys))

    async def set(self, key: str, value: Buffer) -> None:
        self.attempts += 1
        if self._should_fail(key):
            self.failures += 1
            raise OSError(self.fail_errno, os.strerror(self.fail_errno), key)
        await self._store.set(key, value)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        if self._should_fail(key):
            raise OSError(self.fail_errno, os.strerror(self.fail_errno), key)
        await self._store.set_if_not_exists(key, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self._store.root)!r})"


class FaultyReadStore(FaultyStore):
    """A :class:`FaultyStore` whose ``get`` also raises ``OSError(EIO)`` while ``failing_reads``
    is set, for keys containing one of ``fail_read_keys`` (all keys if empty).

    Because it overrides ``get``, cachedfeatures reads its chunks through zarr (never with a
    ``pread`` that would bypass it), so every injected read fault is seen. ``read_failures``
    counts them.
    """

    def __init__(self, path: str | os.PathLike[str], fail_errno: int = errno.ENOSPC) -> None:
        super().__init__(path, fail_errno)
        self.failing_reads = False
        self.fail_read_keys: tuple[str, ...] = ()
        self.read_failures = 0

    async def get(self, key: str, prototype: Any, byte_range: ByteRequest | None = None) -> Buffer | None:
        keys = self.fail_read_keys
        if self.failing_reads and (not keys or any(part in key for part in keys)):
            self.read_failures += 1
            raise OSError(errno.EIO, os.strerror(errno.EIO), key)
        return await self._store.get(key, prototype, byte_range)


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` and its bytes: proves a store was not modified."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
