"""Settings and values the cache used to accept silently or fail on unclearly: huge rows,
integer storage dtypes, strings that are not valid Unicode, access statistics on a store that
turned out read-only, all-NaN rows, damaged chunks under ``prefill()``, and a ``chunk_rows``
that an existing entry does not have."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cachedfeatures import CachedFeatureDataset, cached_module
from cachedfeatures.errors import (
    CacheError,
    ChunkSizeError,
    FieldNotStorableError,
    ReadOnlyStoreWarning,
)
from cachedfeatures.store.feature_store import MAX_CHUNK_BYTES, default_chunk_rows
from cachedfeatures.store.keyed_entry import keyed_chunk_rows
from tests.helpers import Backbone, Listed, Samples, reference
from tests.reliability.faulty import FaultyStore

ROW_144MB = 144 * 1024 * 1024


class Wide(nn.Module):
    """Rows of ``width`` float32 values: the input's first value, repeated."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].expand(len(x), self.width).contiguous()


# -- huge rows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("row_nbytes", [ROW_144MB, 600 * 1024 * 1024, 40 * 1024 * 1024])
def test_default_chunks_of_huge_rows_stay_within_the_codec_limit(row_nbytes: int) -> None:
    for rows in (default_chunk_rows(row_nbytes, 10_000), keyed_chunk_rows(row_nbytes)):
        assert rows >= 1 and rows * row_nbytes <= MAX_CHUNK_BYTES
    assert default_chunk_rows(ROW_144MB, 10_000) == 1


def test_explicit_chunk_rows_over_the_codec_limit_say_what_to_set(store_path: Path) -> None:
    data = Listed([torch.zeros(1)] * 4)
    width = 256 * 1024  # float32 rows of 1 MiB: 2048 of them are one byte over 2**31 - 1
    with pytest.raises(ChunkSizeError, match=r"chunk_rows=2047"):
        CachedFeatureDataset(data, Wide(width), store_path, chunk_rows=2048)


@pytest.mark.slow  # two 144 MB rows written and read back
def test_rows_of_144_mb_are_written_and_served(store_path: Path) -> None:
    data = Listed([torch.full((1,), float(i + 1)) for i in range(2)])
    width = ROW_144MB // 4
    cached = CachedFeatureDataset(data, Wide(width), store_path, batch_size=1)
    assert cached.entry is not None and cached.entry.chunk_rows == 1
    cached.prefill(progress=False)
    again = CachedFeatureDataset(data, Wide(width), store_path, batch_size=1)
    assert again.entry is not None and again.entry.valid_mask().all()
    for i in range(2):
        row = again[i]
        assert row.shape == (width,) and bool((row == i + 1).all())


# -- storage dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool, torch.complex64])
def test_storage_dtypes_must_be_floating(store_path: Path, dtype: torch.dtype) -> None:
    with pytest.raises(CacheError, match="floating"):
        CachedFeatureDataset(Samples(8), Backbone(), store_path, dtype=dtype)
    with pytest.raises(CacheError, match="floating"):
        cached_module(store=store_path, cache_dtype=dtype)


def test_floating_storage_dtype_is_accepted(store_path: Path) -> None:
    cached = CachedFeatureDataset(Samples(8), Backbone(), store_path, dtype=torch.float16)
    features, _ = cached[0]
    assert features.dtype == torch.float16


# -- strings ---------------------------------------------------------------------------------------


def test_lone_surrogate_in_a_string_field_names_field_and_row(store_path: Path) -> None:
    samples = [{"x": torch.ones(2) * i, "name": f"file-{i}"} for i in range(6)]
    samples[4]["name"] = "caf\udce9.jpg"  # os.fsdecode of a Latin-1 file name
    cached = CachedFeatureDataset(Listed(samples), Wide(3), store_path, input_key="x", chunk_rows=2)
    with pytest.raises(FieldNotStorableError, match=r"\['name'\].*sample 4"):
        cached.__getitems__([3, 4, 5])
    assert cached[3]["name"] == "file-3"  # the others are unaffected


# -- access statistics on a store that refuses writes ------------------------------------------------


def test_flush_access_on_a_store_that_turned_out_read_only_warns_once(tmp_path: Path) -> None:
    path, data = tmp_path / "features.zarr", Samples(32)
    CachedFeatureDataset(data, Backbone(), path, chunk_rows=8).__getitems__(list(range(32)))
    store = FaultyStore(path, fail_errno=errno.EACCES)
    cached = CachedFeatureDataset(data, Backbone(), store, chunk_rows=8)
    store.failing = True
    with pytest.warns(ReadOnlyStoreWarning) as caught:
        assert len(cached.__getitems__(list(range(32)))) == 32  # hits: access recorded
        cached.flush_access()
        cached.flush_access()
    assert len(caught) == 1 and store.failures >= 1


# -- all-NaN rows, prefill over damaged chunks, chunk_rows of an existing entry ------------------------


class NanEvery(nn.Module):
    """``x * 2``, but all NaN where the sample's first value is a multiple of 4."""

    __cachedfeatures_exclude__ = ("calls",)  # counts calls; not what it computes

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = x * 2
        out[(x[:, 0] % 4) == 0] = float("nan")
        return out


def test_all_nan_rows_are_cached(store_path: Path) -> None:
    data = Listed([torch.full((3,), float(i)) for i in range(16)])
    module = NanEvery()
    cached = CachedFeatureDataset(data, module, store_path, chunk_rows=4, batch_size=16)
    cached.__getitems__(list(range(16)))
    module.calls = 0
    again = CachedFeatureDataset(data, module, store_path, chunk_rows=4, batch_size=16)
    served = again.__getitems__(list(range(16)))
    assert module.calls == again.spot_check_calls, "rows were recomputed"  # the spot check's call only
    for i, row in enumerate(served):
        assert torch.isnan(row).all() if i % 4 == 0 else torch.equal(row, torch.full((3,), 2.0 * i))


def test_prefill_recomputes_rows_of_damaged_chunks(store_path: Path, caplog) -> None:
    data, module = Samples(64), Backbone()
    cached = CachedFeatureDataset(data, module, store_path, chunk_rows=8, batch_size=16)
    cached.prefill(progress=False)
    assert cached.entry is not None
    chunk = store_path / cached.entry.name / "features" / "c" / "3" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])  # torn
    (store_path / cached.entry.name / "features" / "c" / "5" / "0").unlink()  # deleted
    fresh = CachedFeatureDataset(data, module, store_path, chunk_rows=8, batch_size=16)
    assert fresh.prefill(progress=False, check_valid=False).computed == 0  # valid rows left unread
    with caplog.at_level(logging.WARNING, logger="cachedfeatures"):
        result = fresh.prefill(progress=False)
    assert result.computed == 16 and result.skipped == 48
    check = CachedFeatureDataset(data, module, store_path, chunk_rows=8, batch_size=16)
    data.loads = 0  # the probes of construction are not training
    for i in range(64):
        features, _ = check[i]
        assert torch.equal(features, reference(module, data, i))
    # The only raw loads are the spot checks' (which passed): nothing recomputed.
    assert data.loads == len(check.spot_checked_rows), "training recomputed rows that prefill should have"


def test_chunk_rows_of_an_existing_entry_with_other_chunking_is_logged_once(store_path: Path, caplog) -> None:
    data = Samples(64)
    CachedFeatureDataset(data, Backbone(), store_path, chunk_rows=8)
    with caplog.at_level(logging.WARNING, logger="cachedfeatures"):
        cached = CachedFeatureDataset(data, Backbone(), store_path, chunk_rows=16)
        CachedFeatureDataset(data, Backbone(), store_path, chunk_rows=16)
        CachedFeatureDataset(data, Backbone(), store_path, chunk_rows=8)
        CachedFeatureDataset(data, Backbone(), store_path)
    assert cached.entry is not None and cached.entry.chunk_rows == 8
    said = [r.getMessage() for r in caplog.records if "chunk_rows" in r.getMessage()]
    assert len(said) == 1 and "chunk_rows=16" in said[0] and "8" in said[0], said


def test_store_fill_value_sentinel_is_not_nan() -> None:
    # Guard for the fix above: a NaN fill value makes all-NaN rows indistinguishable from
    # missing bytes; the sentinel must be an ordinary value no module plausibly outputs.
    from cachedfeatures.store.feature_store import float_fill_value

    for dtype in ("<f2", "<f4", "<f8"):
        fill = float_fill_value(np.dtype(dtype))
        assert np.isfinite(fill) and fill != 0
