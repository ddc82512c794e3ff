"""Damaged metadata: a garbage or deleted ``zarr.json`` of an entry, of one of its arrays, or of
the store's root. Budgets skip what they cannot read (and say so once), opening gives a clear
error that names the fix, and ``verify --repair`` rebuilds what can be rebuilt or drops the
entry, saying so."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cachedfeatures import CachedFeatureDataset, FeatureStore
from cachedfeatures.cli import main
from cachedfeatures.errors import CacheError, DamagedStoreError
from cachedfeatures.pruning import prune
from tests.helpers import Backbone, Samples, reference

N, CHUNK = 64, 8


def _fill(store_path: Path, version: str, **options: object) -> CachedFeatureDataset:
    cached = CachedFeatureDataset(
        Samples(N),
        Backbone(),
        store_path,
        chunk_rows=CHUNK,
        batch_size=16,
        dataset_version=version,
        **options,
    )
    cached.__getitems__(list(range(N)))
    return cached


def _check(cached: CachedFeatureDataset) -> None:
    module, data = Backbone(), Samples(N)
    for i in range(N):
        features, label = cached[i]
        assert torch.equal(features, reference(module, data, i)) and label == i % 7


@pytest.mark.parametrize("damaged", ["zarr.json", "features/zarr.json"], ids=["entry", "array"])
def test_budget_skips_an_unreadable_entry_and_says_so_once(store_path: Path, damaged: str, caplog) -> None:
    other = _fill(store_path, "b").entry_name
    (store_path / other / damaged).write_text("{ not json")
    with caplog.at_level(logging.WARNING, logger="cachedfeatures"):
        cached = _fill(store_path, "a", max_bytes=12_000)  # A and B are ~10 kB each: prunes
        _check(cached)
        cached.__getitems__(list(range(N)))
    skipped = [
        record for record in caplog.records if other in record.getMessage() and "skip" in record.getMessage()
    ]
    assert len(skipped) == 1, [record.getMessage() for record in caplog.records]


def test_prune_says_which_entries_it_could_not_read(store_path: Path, capsys) -> None:
    other = _fill(store_path, "b").entry_name
    _fill(store_path, "a")
    (store_path / other / "zarr.json").write_text("{ not json")
    report = prune(FeatureStore.open(store_path, mode="a"), 1)
    assert other in report.skipped
    assert main(["prune", str(store_path), "--max-bytes", "1"]) == 1
    out = capsys.readouterr().out
    assert other in out and "could not be read" in out and "empty entries" not in out


def _damage(store_path: Path, entry: str, what: str) -> None:
    if what == "valid deleted":
        shutil.rmtree(store_path / entry / "valid")
    elif what == "valid garbage":
        (store_path / entry / "valid" / "zarr.json").write_text("garbage")
    elif what == "features deleted":
        shutil.rmtree(store_path / entry / "features")
    elif what == "label garbage":
        (store_path / entry / "field_1" / "zarr.json").write_bytes(b"\x00\xff")
    else:
        raise AssertionError(what)


DAMAGE = ["valid deleted", "valid garbage", "features deleted", "label garbage"]


@pytest.mark.parametrize("what", DAMAGE)
def test_damaged_array_metadata_is_a_clear_error_then_repaired(store_path: Path, what: str, capsys) -> None:
    name = _fill(store_path, "a").entry_name
    fields = sorted(p.name for p in (store_path / name).iterdir() if p.is_dir())
    assert "field_1" in fields, fields  # the label field's array
    _damage(store_path, name, what)
    with pytest.raises(DamagedStoreError, match="cachedfeatures verify --repair"):
        _fill(store_path, "a")
    assert main(["verify", str(store_path)]) == 1
    assert "run with --repair" in capsys.readouterr().out
    assert main(["verify", str(store_path), "--repair"]) == 1
    out = capsys.readouterr().out
    assert "[repaired]" in out, out
    assert main(["verify", str(store_path)]) == 0, capsys.readouterr().out
    entry = FeatureStore.open(store_path, mode="r")[name]
    assert not entry.valid_mask().any()  # rebuilt: an entry with no valid rows
    cached = _fill(store_path, "a")
    _check(cached)
    assert FeatureStore.open(store_path, mode="r")[name].valid_mask().all()


def test_unreadable_entry_is_dropped_by_repair(store_path: Path, capsys) -> None:
    name = _fill(store_path, "a").entry_name
    (store_path / name / "zarr.json").write_text("[1, 2")
    with pytest.raises(DamagedStoreError, match="cachedfeatures verify --repair"):
        _fill(store_path, "a")
    assert main(["verify", str(store_path), "--repair"]) == 1
    out = capsys.readouterr().out
    assert "dropped" in out and name in out, out
    assert main(["verify", str(store_path)]) == 0
    _check(_fill(store_path, "a"))


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_lost_root_metadata_is_a_clear_error_then_rebuilt(store_path: Path, damage: str, capsys) -> None:
    name = _fill(store_path, "a").entry_name
    if damage == "deleted":
        (store_path / "zarr.json").unlink()
    else:
        (store_path / "zarr.json").write_text('{"zarr_format": 3, "node_')
    for mode in ("r", "a"):
        with pytest.raises(DamagedStoreError, match="cachedfeatures verify --repair"):
            FeatureStore.open(store_path, mode=mode)  # type: ignore[arg-type]
    with pytest.raises(CacheError, match="cachedfeatures verify --repair"):
        _fill(store_path, "a")
    assert main(["verify", str(store_path), "--repair"]) == 1
    assert "root" in capsys.readouterr().out
    assert main(["verify", str(store_path)]) == 0
    entry = FeatureStore.open(store_path, mode="r")[name]
    assert entry.valid_mask().all()  # nothing lost: only the root's metadata was rebuilt
    cached = _fill(store_path, "a")
    assert np.array_equal(cached.entry.valid_rows(), np.arange(N))
    _check(cached)
