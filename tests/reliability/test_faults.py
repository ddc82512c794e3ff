"""Disk full and I/O errors: training goes on, one warning, nothing half-written, caching resumes."""

from __future__ import annotations

import errno
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cachedfeatures import CachedFeatureDataset, FeatureStore
from cachedfeatures.errors import CachingPausedWarning, ReadOnlyStoreWarning, StorePathError
from cachedfeatures.store.faults import WriteGuard, is_store_fault
from tests.helpers import Backbone, Samples, reference
from tests.reliability.faulty import FaultyStore
from tests.reliability.figures import record


def _epoch(cached: CachedFeatureDataset, data: Samples, module: Backbone, seed: int) -> int:
    """One shuffled DataLoader epoch; every feature is checked against the module. Rows seen."""
    loader = DataLoader(cached, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))
    seen = 0
    for batch in loader:
        for features, name in zip(batch["image"], batch["name"], strict=True):
            assert torch.equal(features, reference(module, data, int(name.removeprefix("sample-"))))
            seen += 1
    return seen


def _valid_rows_are_correct(cached: CachedFeatureDataset, data: Samples, module: Backbone) -> int:
    """Read the store with plain zarr: every row marked valid holds the module's output."""
    entry = cached.entry
    assert entry is not None
    valid = entry.valid_mask()
    stored = entry.arrays["features"][:]
    for row in np.flatnonzero(valid):
        assert torch.equal(torch.from_numpy(stored[row]), reference(module, data, int(row)))
    return int(valid.sum())


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_write_failures_pause_caching_with_one_warning_and_resume(tmp_path: Path, code: int) -> None:
    store = FaultyStore(tmp_path / "features.zarr", fail_errno=code)
    data, module = Samples(64, "dict"), Backbone()
    guard = WriteGuard(repr(store), retry_after_batches=3, retry_after_seconds=3600)
    cached = CachedFeatureDataset(
        data, module, store, input_key="image", chunk_rows=8, batch_size=4, write_guard=guard
    )
    assert cached.entry is not None
    before, written = cached.entry.valid_mask(), guard.stats.written  # the probe row
    store.failing = True

    with pytest.warns(CachingPausedWarning, match="caching paused") as caught:
        assert _epoch(cached, data, module, seed=0) == 64  # training goes on
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert not issubclass(caught[0].category, ReadOnlyStoreWarning)
    assert os_error_named(str(caught[0].message), code)
    assert store.failures >= 1 and guard.stats.skipped > 0 and guard.stats.written == written
    assert np.array_equal(cached.entry.valid_mask(), before)  # nothing new marked valid

    store.failing = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resuming is silent: no second warning
        _epoch(cached, data, module, seed=1)
    assert guard.stats.resumes == 1 and guard.stats.written > written and not guard.paused
    # Rows skipped while paused are computed again on the next miss, and stored this time.
    _epoch(cached, data, module, seed=2)
    assert cached.entry.valid_mask().all()
    calls, spot_calls = module.calls, cached.spot_check_calls
    _epoch(cached, data, module, seed=3)
    assert module.calls - calls == cached.spot_check_calls - spot_calls  # all hits; spot checks aside
    assert _valid_rows_are_correct(cached, data, module) == 64
    record(
        f"write faults ({errno.errorcode[code]})",
        f"64 rows served while paused, {store.failures} writes refused, 1 warning, "
        f"caching resumed, 64/64 valid rows verified",
    )


@pytest.mark.parametrize("fail_keys", [("valid",), ("name",)], ids=["valid-mask", "second-array"])
def test_a_write_failing_half_way_marks_nothing_valid(tmp_path: Path, fail_keys: tuple[str, ...]) -> None:
    """Feature chunks written but the valid mask (or a later array) refused: rows stay misses."""
    store = FaultyStore(tmp_path / "features.zarr")
    data, module = Samples(40, "dict"), Backbone()
    guard = WriteGuard(repr(store), retry_after_batches=1, retry_after_seconds=0)
    cached = CachedFeatureDataset(
        data, module, store, input_key="image", chunk_rows=8, batch_size=8, write_guard=guard
    )
    assert cached.entry is not None
    before = cached.entry.valid_mask()
    store.failing, store.fail_keys = True, fail_keys
    with pytest.warns(CachingPausedWarning):
        samples = cached.__getitems__(list(range(40)))
    for index, sample in enumerate(samples):
        assert torch.equal(sample["image"], reference(module, data, index))
    assert store.failures >= 1
    assert np.array_equal(cached.entry.valid_mask(), before)
    # A fresh process's view (reopened store) agrees: only correct rows are valid.
    reopened = CachedFeatureDataset(data, module, tmp_path / "features.zarr", input_key="image")
    assert _valid_rows_are_correct(reopened, data, module) == int(before.sum())


@pytest.mark.parametrize("root_exists", [True, False], ids=["new-entry", "new-store"])
def test_store_that_cannot_be_written_serves_computed_features(tmp_path: Path, root_exists: bool) -> None:
    store = FaultyStore(tmp_path / "features.zarr")
    if root_exists:
        FeatureStore.open(store, mode="a")
    store.failing = True
    data, module = Samples(20, "tuple"), Backbone()
    cached = CachedFeatureDataset(data, module, store, chunk_rows=8)
    match = "could not create entry" if root_exists else "could not be opened for writing"
    with pytest.warns(CachingPausedWarning, match=match) as caught:
        first = [cached[i] for i in range(20)]
        again = [cached[i] for i in range(20)]
    assert len(caught) == 1 and not issubclass(caught[0].category, ReadOnlyStoreWarning)
    for index in range(20):
        assert torch.equal(first[index][0], reference(module, data, index))
        assert torch.equal(again[index][0], first[index][0]) and again[index][1] == index % 7


def test_guard_retries_after_seconds_with_its_clock() -> None:
    now = [0.0]
    guard = WriteGuard("test", retry_after_batches=1000, retry_after_seconds=10, clock=lambda: now[0])
    attempts = []

    def failing() -> None:
        attempts.append(now[0])
        raise OSError(errno.EIO, "I/O error")

    with pytest.warns(CachingPausedWarning):
        assert guard.run(failing) is False
    assert [guard.run(failing) for _ in range(5)] == [False] * 5
    assert attempts == [0.0] and guard.stats.skipped == 5
    now[0] = 10.0
    assert guard.run(failing) is False  # retried, still failing: no second warning
    assert attempts == [0.0, 10.0] and guard.stats.pauses == 1
    now[0] = 15.0
    assert guard.run(lambda: None) is False  # paused again from t=10
    now[0] = 20.0
    assert guard.run(lambda: None) is True and not guard.paused and guard.stats.resumes == 1


def test_guard_lets_bugs_through() -> None:
    guard = WriteGuard("test")

    def buggy() -> None:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        guard.run(buggy)
    assert not guard.paused
    assert is_store_fault(OSError(errno.ENOSPC, "full")) and is_store_fault(PermissionError())
    assert not is_store_fault(ValueError("bad")) and not is_store_fault(KeyError("x"))
    assert not is_store_fault(StorePathError("store path is a file"))  # ours: says what to fix


@pytest.mark.parametrize(
    "kwargs", [{"retry_after_batches": 0}, {"retry_after_batches": 1.5}, {"retry_after_seconds": -1}]
)
def test_guard_rejects_bad_retry_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises((TypeError, ValueError), match="Expected retry_after"):
        WriteGuard("test", **kwargs)  # type: ignore[arg-type]


def os_error_named(message: str, code: int) -> bool:
    return f"[Errno {code}]" in message


def test_write_failures_under_a_budget_pause_and_resume(tmp_path: Path) -> None:
    """With max_bytes, writes go chunk by chunk, each followed by pruning; all under the guard."""
    store = FaultyStore(tmp_path / "features.zarr")
    data, module = Samples(32, "dict"), Backbone()
    guard = WriteGuard(repr(store), retry_after_batches=1, retry_after_seconds=3600)
    cached = CachedFeatureDataset(
        data, module, store, input_key="image", chunk_rows=8, max_bytes="1GB", write_guard=guard
    )
    assert cached.entry is not None
    before = cached.entry.valid_mask()
    store.failing = True
    with pytest.warns(CachingPausedWarning) as caught:
        _epoch(cached, data, module, seed=0)
    assert len(caught) == 1 and np.array_equal(cached.entry.valid_mask(), before)
    store.failing = False
    for seed in (1, 2, 3):
        _epoch(cached, data, module, seed=seed)
    assert guard.stats.resumes == 1 and cached.entry.valid_mask().all()
    assert _valid_rows_are_correct(cached, data, module) == 32


def test_pipeline_loader_and_prefill_keep_going_on_a_full_disk(tmp_path: Path) -> None:
    """The background writer stores through the same guard: a full disk pauses, never stops."""
    store = FaultyStore(tmp_path / "features.zarr")
    data, module = Samples(48, "dict"), Backbone()
    guard = WriteGuard(repr(store), retry_after_batches=1, retry_after_seconds=3600)
    cached = CachedFeatureDataset(
        data, module, store, input_key="image", chunk_rows=8, batch_size=8, write_guard=guard
    )
    assert cached.entry is not None
    before = cached.entry.valid_mask()
    store.failing = True
    with pytest.warns(CachingPausedWarning) as caught:
        seen = 0
        for batch in cached.loader(batch_size=8, shuffle=True):
            for features, name in zip(batch["image"], batch["name"], strict=True):
                assert torch.equal(features, reference(module, data, int(name.removeprefix("sample-"))))
                seen += 1
    assert seen == 48 and len(caught) == 1
    assert np.array_equal(cached.entry.valid_mask(), before)
    store.failing = False
    cached.prefill(progress=False)
    cached.prefill(progress=False)  # the first may only retry; the second stores what is left
    assert cached.entry.valid_mask().all() and guard.stats.resumes == 1
    assert _valid_rows_are_correct(cached, data, module) == 48
