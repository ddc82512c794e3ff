"""The store kinds the contract runs over: how to open one, and how to open its bytes again.

Importable from subprocesses (``tests.store_contract.kinds``), so that a fresh process can
open the same store the way a new training run would.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from zarr.storage import MemoryStore

from cachedfeatures.store.feature_store import StoreLike
from tests.reliability.faulty import FaultyStore


class StoreKind:
    """One kind of store at one place. ``store()`` is a fresh handle on the same bytes: what a
    new process (or a new run) passes as ``store=``."""

    name: ClassVar[str]
    on_disk: ClassVar[bool] = True  # another process can open it

    def __init__(self, where: str, storage_options: dict[str, Any] | None = None) -> None:
        self.where = where
        self.storage_options = storage_options

    def store(self) -> StoreLike:
        raise NotImplementedError

    def args(self) -> list[str]:
        """The arguments that :func:`kind_from_args` turns back into this kind (in a subprocess)."""
        return [self.name, self.where, json.dumps(self.storage_options)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.where!r})"


class LocalKind(StoreKind):
    """A directory, passed as a path."""

    name = "local"

    def store(self) -> StoreLike:
        return self.where


class WrappedKind(StoreKind):
    """The same directory behind a zarr ``WrapperStore`` (the fault-injection wrapper, idle)."""

    name = "wrapped"

    def store(self) -> StoreLike:
        return FaultyStore(self.where)


class MemoryKind(StoreKind):
    """A zarr ``MemoryStore``: its bytes live in this process only, so "reopen" is a new
    :class:`~cachedfeatures.FeatureStore` over the same ``MemoryStore``."""

    name = "memory"
    on_disk = False

    def __init__(self, where: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(where, storage_options)
        self._memory = MemoryStore()

    def store(self) -> StoreLike:
        return self._memory


class S3Kind(StoreKind):
    """An ``s3://`` URL on the loopback moto server, with its fsspec options."""

    name = "s3"

    def store(self) -> StoreLike:
        return self.where


KINDS: dict[str, type[StoreKind]] = {kind.name: kind for kind in (LocalKind, WrappedKind, MemoryKind, S3Kind)}


def kind_from_args(name: str, where: str, options: str) -> StoreKind:
    """The kind that :meth:`StoreKind.args` described."""
    return KINDS[name](where, json.loads(options))
