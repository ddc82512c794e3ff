"""Read-only stores: hits are served, misses computed and not stored, one warning."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from cachedfeatures import CachedFeatureDataset, FeatureStore
from cachedfeatures.errors import ReadOnlyStoreWarning, StorePathError
from tests.helpers import Backbone, Samples, reference
from tests.reliability.faulty import FaultyStore, snapshot


def _fill_half(path: Path, n: int = 48) -> tuple[Samples, Backbone]:
    data, module = Samples(n, "dict"), Backbone()
    cached = CachedFeatureDataset(data, module, path, input_key="image", chunk_rows=8)
    cached.__getitems__(list(range(0, n, 2)))
    return data, module


def _check_all(cached: CachedFeatureDataset, data: Samples, module: Backbone) -> None:
    samples = cached.__getitems__(list(range(len(data))))
    for index, sample in enumerate(samples):
        assert torch.equal(sample["image"], reference(module, data, index))
        assert sample["label"] == index % 7 and sample["name"] == f"sample-{index}"


def test_read_only_dataset_serves_hits_computes_misses_and_writes_nothing(store_path: Path) -> None:
    data, module = _fill_half(store_path)
    files = snapshot(store_path)
    cached = CachedFeatureDataset(data, module, store_path, input_key="image", read_only=True)
    loads, calls = data.loads, module.calls
    hits = cached.__getitems__(list(range(0, 48, 2)))  # all cached: no warning, no load, no compute
    # besides the spot check, which recomputes 8 of those hits and compares them
    assert data.loads == loads + len(cached.spot_checked_rows) == loads + 8
    assert module.calls == calls + cached.spot_check_calls == calls + 1
    assert all(torch.equal(s["image"], reference(module, data, 2 * i)) for i, s in enumerate(hits))
    with pytest.warns(ReadOnlyStoreWarning, match="opened read-only") as caught:
        _check_all(cached, data, module)
        _check_all(cached, data, module)  # misses again: computed again, no second warning
    assert len(caught) == 1
    assert data.loads - loads == 2 * 24 + len(cached.spot_checked_rows)  # the misses, the spot checks
    assert snapshot(store_path) == files  # not one byte changed
    assert cached.entry is not None and int(cached.entry.valid_mask().sum()) == 24


def test_read_only_store_without_the_entry_computes_everything(store_path: Path) -> None:
    FeatureStore.open(store_path, mode="a")
    files = snapshot(store_path)
    data, module = Samples(20, "dict"), Backbone()
    cached = CachedFeatureDataset(data, module, store_path, input_key="image", read_only=True)
    with pytest.warns(ReadOnlyStoreWarning, match="has no entry") as caught:
        _check_all(cached, data, module)
    assert len(caught) == 1
    assert snapshot(store_path) == files and FeatureStore.open(store_path).entries == []


def test_feature_store_opened_read_only_refuses_writes(store_path: Path) -> None:
    _fill_half(store_path)
    entry = FeatureStore.open(store_path, mode="r").entries[0]
    with pytest.raises(ValueError, match="read-only"):
        entry.write([1], {spec.name: np.zeros((1, *spec.shape), spec.numpy_dtype) for spec in entry.specs})


def test_read_only_needs_an_existing_store(store_path: Path) -> None:
    with pytest.raises(StorePathError, match="no cachedfeatures store"):
        CachedFeatureDataset(Samples(4), Backbone(), store_path, read_only=True)
    assert not store_path.exists()


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS], ids=["EACCES", "EROFS"])
def test_permission_errors_on_write_are_treated_as_read_only(tmp_path: Path, code: int) -> None:
    data, module = _fill_half(tmp_path / "features.zarr")
    store = FaultyStore(tmp_path / "features.zarr", fail_errno=code)
    store.failing = True
    cached = CachedFeatureDataset(data, module, store, input_key="image")
    with pytest.warns(ReadOnlyStoreWarning, match="refuses writes") as caught:
        _check_all(cached, data, module)
        _check_all(cached, data, module)
    assert len(caught) == 1 and store.failures >= 1
    assert cached.entry is not None and int(cached.entry.valid_mask().sum()) == 24


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_store_in_a_read_only_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEDFEATURES_LOCK_DIR", str(tmp_path / "locks"))
    path = tmp_path / "features.zarr"
    data, module = _fill_half(path)
    files = snapshot(path)
    modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
    for p in modes:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        cached = CachedFeatureDataset(data, module, path, input_key="image")
        with pytest.warns(ReadOnlyStoreWarning) as caught:
            _check_all(cached, data, module)
        assert len(caught) == 1
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert snapshot(path) == files


def test_read_only_store_over_budget_is_neither_pruned_nor_stamped(store_path: Path) -> None:
    """No pruning and no access statistics are written to a store opened read-only."""
    data, module = _fill_half(store_path)
    files = snapshot(store_path)
    cached = CachedFeatureDataset(data, module, store_path, input_key="image", read_only=True, max_bytes=1)
    with pytest.warns(ReadOnlyStoreWarning):
        _check_all(cached, data, module)
    cached.flush_access()
    assert snapshot(store_path) == files
