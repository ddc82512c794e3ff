"""The fault-injection wrappers run the production path: what a wrapper leaves alone is taken
as for the plain local store; what it intercepts is never bypassed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from zarr.storage import LocalStore, LoggingStore, MemoryStore, WrapperStore

from cachedfeatures import CachedFeatureDataset, FeatureStore
from cachedfeatures.errors import CachingPausedWarning
from cachedfeatures.store.backend import Backend
from cachedfeatures.store.locks import FileLocks, ThreadLocks
from tests.helpers import Backbone, Samples, reference
from tests.reliability.faulty import FaultyReadStore, FaultyStore


def _feature_chunk_gets(store: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fill an entry through ``store``, then serve every row again from a fresh open of it; the
    feature chunk keys that ``LocalStore.get`` was asked for while serving those hits."""
    data, module = Samples(32, "tuple"), Backbone()
    first = CachedFeatureDataset(data, module, store, chunk_rows=8, compressor=None, spot_check=0)
    first.__getitems__(list(range(32)))
    asked: list[str] = []
    plain_get = LocalStore.get

    async def get(self: LocalStore, key: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(key)
        return await plain_get(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", get)
    again = CachedFeatureDataset(data, module, store, chunk_rows=8, compressor=None, spot_check=0)
    rows = again.__getitems__(list(range(32)))
    monkeypatch.undo()
    assert again.module_calls == 0  # all hits
    for index, (features, _label) in enumerate(rows):
        assert torch.equal(features, reference(module, data, index))
    return [key for key in asked if "/features/c/" in key]


def test_a_write_fault_wrapper_gets_the_plain_local_backend(store_path: Path) -> None:
    """File locks on the same directory and the direct chunk-read route, as the plain store."""
    plain = FeatureStore.open(store_path, mode="a")
    faulty = FeatureStore.open(FaultyStore(store_path), mode="a")
    for store in (plain, faulty):
        assert isinstance(store.locks, FileLocks)
        assert store.backend.is_local and store.backend.direct_reads and store.backend.direct_exists
        assert store.backend.root == store_path
    assert isinstance(faulty.locks, FileLocks) and isinstance(plain.locks, FileLocks)
    assert faulty.locks.directory == plain.locks.directory  # the same locks: they exclude each other
    assert faulty.backend.wrappers == ("FaultyStore",) and faulty.location == str(store_path)


def test_hits_through_a_write_fault_wrapper_take_the_direct_route(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hits read feature chunks with pread, never through zarr, through the wrapper as without it."""
    assert _feature_chunk_gets(store_path, monkeypatch) == []
    other = store_path.with_name("wrapped.zarr")
    assert _feature_chunk_gets(FaultyStore(other), monkeypatch) == []


def test_a_read_fault_wrapper_is_read_through_zarr_and_its_faults_are_seen(
    store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrapper that overrides ``get`` is never bypassed: an injected read fault makes the
    chunk a miss (logged, recomputed; storing it again fails too, as it reads the chunk), and
    the served rows are still exact."""
    store = FaultyReadStore(store_path)
    data, module = Samples(32, "tuple"), Backbone()
    first = CachedFeatureDataset(data, module, store, chunk_rows=8, compressor=None, spot_check=0)
    first.__getitems__(list(range(32)))
    opened = FeatureStore.open(store, mode="a")
    assert opened.backend.is_local and not opened.backend.direct_reads
    assert isinstance(opened.locks, FileLocks)  # still the local store's file locks
    store.fail_read_keys = ("features/c/1/",)
    store.failing_reads = True
    again = CachedFeatureDataset(data, module, store, chunk_rows=8, compressor=None, spot_check=0)
    with (
        caplog.at_level(logging.WARNING, logger="cachedfeatures.reader.chunk_reader"),
        pytest.warns(CachingPausedWarning, match="Input/output error"),  # rewriting it reads it too
    ):
        rows = again.__getitems__(list(range(32)))
    assert store.read_failures >= 1
    assert again.module_calls == 1  # chunk 1's rows recomputed, the others served
    assert any("chunk 1 " in record.getMessage() for record in caplog.records)
    for index, (features, _label) in enumerate(rows):
        assert torch.equal(features, reference(module, data, index))


class _ExistsOverride(WrapperStore[LocalStore]):
    """A wrapper that overrides ``exists`` (as a caching layer would), and nothing else."""

    async def exists(self, key: str) -> bool:
        return await self._store.exists(key)


class _LocalSubclass(LocalStore):
    """A ``LocalStore`` subclass that overrides ``get``: held to the same rule as a wrapper."""

    async def get(self, key: str, *args: Any, **kwargs: Any) -> Any:
        return await super().get(key, *args, **kwargs)


@pytest.mark.parametrize(
    ("make", "kind", "local", "direct_reads", "direct_exists", "direct_writes", "locks"),
    [
        (lambda path: LocalStore(path), "local", True, True, True, True, FileLocks),
        (lambda path: FaultyStore(path), "local", True, True, True, False, FileLocks),
        (lambda path: FaultyReadStore(path), "local", True, False, True, False, FileLocks),
        (lambda path: _ExistsOverride(LocalStore(path)), "local", True, True, False, True, FileLocks),
        (lambda path: LoggingStore(LocalStore(path)), "local", True, False, False, False, FileLocks),
        (
            lambda path: WrapperStore(WrapperStore(LocalStore(path))),
            "local",
            True,
            True,
            True,
            True,
            FileLocks,
        ),
        (lambda path: _LocalSubclass(path), "local", True, False, True, True, FileLocks),
        (lambda path: MemoryStore(), "memory", False, False, False, False, ThreadLocks),
        (lambda path: WrapperStore(MemoryStore()), "memory", False, False, False, False, ThreadLocks),
    ],
    ids=["local", "faulty", "faulty-get", "exists", "logging", "nested", "subclass", "memory", "wrapped-mem"],
)
def test_backend_capabilities_are_seen_through_wrappers(
    store_path: Path,
    make: Any,
    kind: str,
    local: bool,
    direct_reads: bool,
    direct_exists: bool,
    direct_writes: bool,
    locks: type,
) -> None:
    store_path.mkdir()
    backend = Backend.of(make(store_path))
    assert backend.kind == kind and backend.is_local is local
    assert backend.direct_reads is direct_reads and backend.direct_exists is direct_exists
    assert backend.direct_writes is direct_writes
    assert type(backend.new_locks()) is locks
    assert backend.is_memory is (kind == "memory")
    assert backend.needs_chunk_ownership is False  # local: file locks; memory: private to the process
    assert backend.root == (store_path if local else None)
