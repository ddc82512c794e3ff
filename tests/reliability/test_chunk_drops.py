"""The one chunk-dropping protocol: ``valid`` first, then the bytes, then the checksum record.

A drop that dies after its first step (a crash, a store that fails) must leave rows that are
misses, never valid rows whose bytes are gone: after reopening, every row served is right and
the dropped chunk's rows are recomputed. Each path that drops chunks is tried: pruning (the
dataset's budget), ``verify --repair`` and the in-model cache's budget.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from zarr.storage import LocalStore

from cachedfeatures import CachedFeatureDataset, FeatureStore, cached_module
from cachedfeatures.maintenance import verify_store
from cachedfeatures.pruning import drop_chunk
from tests.helpers import Samples, Tile

ROWS, CHUNK_ROWS = 64, 8


class CrashAfterFirstDelete:
    """Patches ``LocalStore.delete``: the first delete of a chunk key goes through, every
    later one raises, as if the process died right after the first step of a drop."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.deleted: list[str] = []
        original = LocalStore.delete

        async def delete(store: LocalStore, key: str) -> None:
            if "/c/" in key:
                if self.deleted:
                    raise OSError(errno.EIO, "simulated crash during a drop", key)
                self.deleted.append(key)
            await original(store, key)

        monkeypatch.setattr(LocalStore, "delete", delete)


def filled(store_path: Path) -> CachedFeatureDataset:
    cached = CachedFeatureDataset(
        Samples(ROWS, "tensor"), Tile(), store_path, chunk_rows=CHUNK_ROWS, spot_check=0
    )
    cached.__getitems__(list(range(ROWS)))
    return cached


def expected() -> np.ndarray:
    images = torch.stack([Samples(ROWS, "tensor").image(i) for i in range(ROWS)])
    return Tile()(images).numpy()


def assert_reopened_store_serves_right_rows(store_path: Path, recomputed: int) -> None:
    module = Tile()
    cached = CachedFeatureDataset(
        Samples(ROWS, "tensor"), module, store_path, chunk_rows=CHUNK_ROWS, spot_check=0
    )
    samples = cached.__getitems__(list(range(ROWS)))
    np.testing.assert_array_equal(np.stack([s.numpy() for s in samples]), expected())
    assert module.rows_computed == recomputed


def test_a_drop_removes_valid_bytes_and_checksum_record(store_path: Path) -> None:
    cached = filled(store_path)
    assert cached.entry is not None and cached.entry.records is not None
    name = cached.entry_name
    for array in ("valid", "features", "chunk_crc"):
        assert (store_path / name / array / "c" / "2").exists()
    drop_chunk(cached.entry, 2)
    for array in ("valid", "features", "chunk_crc"):  # the record goes with the bytes it checks
        assert not [p for p in (store_path / name / array / "c" / "2").rglob("*") if p.is_file()], array
    assert_reopened_store_serves_right_rows(store_path, recomputed=CHUNK_ROWS)


def test_a_prune_that_dies_after_its_first_step_leaves_misses(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = filled(store_path)
    assert cached.entry is not None
    name = cached.entry_name
    crash = CrashAfterFirstDelete(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        drop_chunk(cached.entry, 2)
    monkeypatch.undo()
    assert crash.deleted == [f"{name}/valid/c/2"]  # the first step is clearing the rows' valid bits
    # What the crash left: bytes that nothing serves.
    entry = FeatureStore.open(store_path).entry(name)
    assert entry is not None
    mask = entry.valid_mask()
    assert not mask[2 * CHUNK_ROWS : 3 * CHUNK_ROWS].any() and mask.sum() == ROWS - CHUNK_ROWS
    assert (store_path / name / "features" / "c" / "2" / "0").exists()
    assert_reopened_store_serves_right_rows(store_path, recomputed=CHUNK_ROWS)


def test_a_repair_that_dies_after_its_first_step_leaves_misses(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = filled(store_path)
    name = cached.entry_name
    damaged = store_path / name / "features" / "c" / "3" / "0"
    damaged.write_bytes(b"garbage")  # verify --repair drops the chunk
    crash = CrashAfterFirstDelete(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        verify_store(FeatureStore.open(store_path, mode="a"), repair=True)
    monkeypatch.undo()
    assert crash.deleted == [f"{name}/valid/c/3"]
    assert_reopened_store_serves_right_rows(store_path, recomputed=CHUNK_ROWS)


def test_a_module_cache_drop_that_dies_after_its_first_step_serves_no_wrong_row(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-model cache's budget drops whole chunks (the one just written first, MRU). A
    drop that dies after clearing ``valid`` leaves that chunk's rows as misses: a fresh cache
    on the same store recomputes exactly them and serves every other row from the store."""
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(300 * 4, 16, generator=generator)

    def embed(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    budgeted: Any = cached_module(
        store=store_path, chunk_rows=4, max_bytes=8000, max_memory_bytes=0, version="v"
    )(embed)
    crash = CrashAfterFirstDelete(monkeypatch)
    calls = 0
    with pytest.raises(OSError, match="simulated crash"):
        for calls in range(1, 301):
            budgeted(data[(calls - 1) * 4 : calls * 4])
    monkeypatch.undo()
    assert len(crash.deleted) == 1 and "/valid/c/" in crash.deleted[0]
    seen = data[: calls * 4]
    fresh: Any = cached_module(store=store_path, chunk_rows=4, max_memory_bytes=0, version="v")(embed)
    assert torch.equal(fresh(seen), seen * 2)
    assert fresh.module_cache.miss_rows == 4  # the rows of the chunk whose drop died, no others
    assert torch.equal(fresh(seen), seen * 2) and fresh.module_cache.miss_rows == 4
