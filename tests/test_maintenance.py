"""describe_store / verify_store in-process (the command line runs them in test_cli.py)."""

from __future__ import annotations

from pathlib import Path

import zarr

from cachedfeatures import CachedFeatureDataset, FeatureStore
from cachedfeatures.maintenance import describe_store, verify_store
from tests.helpers import Samples, Tile


def filled(store_path: Path) -> CachedFeatureDataset:
    cached = CachedFeatureDataset(Samples(24, "tuple"), Tile(), store_path, chunk_rows=8)
    cached.__getitems__(list(range(24)))
    return cached


def test_verify_reports_arrays_that_disagree_with_the_metadata(store_path: Path) -> None:
    cached = filled(store_path)
    group = zarr.open_group(str(store_path / cached.entry_name), mode="a")
    group.create_array("field_1", shape=(24,), chunks=(8,), dtype="float64", overwrite=True)  # was int64
    report = verify_store(FeatureStore.open(store_path))
    assert not report["ok"]
    (problem,) = report["problems"]
    assert problem["kind"] == "layout" and "'field_1'" in problem["detail"] and "float64" in problem["detail"]


def test_verify_without_repair_changes_nothing(store_path: Path) -> None:
    cached = filled(store_path)
    (store_path / cached.entry_name / "features" / "c" / "1" / "0").unlink()
    store = FeatureStore.open(store_path)
    before = store.entry(cached.entry_name).valid_mask().copy()  # type: ignore[union-attr]
    report = verify_store(store)
    assert [(p["kind"], p["chunk"], p["repaired"]) for p in report["problems"]] == [("missing", 1, False)]
    assert (store.entry(cached.entry_name).valid_mask() == before).all()  # type: ignore[union-attr]


def test_describe_counts_rows_and_chunks(store_path: Path) -> None:
    cached = filled(store_path)
    (entry,) = describe_store(FeatureStore.open(store_path))["entries"]
    assert entry["name"] == cached.entry_name
    assert (entry["rows"], entry["rows_valid"], entry["chunks"], entry["chunks_stored"]) == (24, 24, 3, 3)
    assert entry["logical_bytes"] == 24 * (256 * 4 + 8 + 1)
