"""The exploration API on real stores: features/fields/xarray views, statistics, display."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from torch import nn

from cachedfeatures import (
    CachedFeatureDataset,
    EntryNotFoundError,
    FeatureStore,
    RowsNotCachedError,
    UnknownArrayError,
)
from cachedfeatures.format.names import ACCESS
from tests.helpers import Backbone, Samples, reference

FILLED = [*range(40), 70, 75, 99]  # chunks of 16 rows: 0-2 full, 4 partly, 6 partly
CHUNK_ROWS = 16


def fill(
    store: Path, *, shape: str = "dict", rows: list[int] = FILLED, **kwargs: Any
) -> CachedFeatureDataset:
    dataset = Samples(100, shape)
    kwargs.setdefault("module", Backbone())
    cached = CachedFeatureDataset(
        dataset,
        store=store,
        input_key="image" if shape == "dict" else 0,
        chunk_rows=CHUNK_ROWS,
        **kwargs,
    )
    cached.__getitems__(rows)
    return cached


@pytest.fixture
def filled(store_path: Path) -> CachedFeatureDataset:
    """A dict-sample store, 43 of 100 rows cached (a probe row may add one)."""
    return fill(store_path)


def expected_rows(cached: CachedFeatureDataset) -> np.ndarray:
    """The rows valid in the store, straight from the ``valid`` array with plain zarr."""
    assert cached.entry is not None
    group = zarr.open_group(cached.entry.group.store, path=cached.entry.name, mode="r")
    return np.flatnonzero(group["valid"][:])


def test_features_are_the_valid_rows_computed_by_the_module(
    store_path: Path, filled: CachedFeatureDataset
) -> None:
    entry = FeatureStore.open(store_path)[0]
    rows = entry.valid_rows()
    assert set(FILLED) <= set(rows.tolist())
    np.testing.assert_array_equal(rows, expected_rows(filled))
    features = entry.features()
    assert isinstance(features, np.ndarray) and features.shape == (len(rows), 16)
    module, dataset = Backbone(), Samples(100, "dict")
    for position in (0, 17, len(rows) - 1):
        np.testing.assert_array_equal(
            features[position], reference(module, dataset, int(rows[position])).numpy()
        )


def test_features_at_given_rows_keep_order_and_repeats_as_torch(
    store_path: Path, filled: CachedFeatureDataset
) -> None:
    entry = FeatureStore.open(store_path)[0]
    features = entry.features(rows=[99, 3, 3, 70], as_="torch")
    assert isinstance(features, torch.Tensor) and features.dtype == torch.float32
    module, dataset = Backbone(), Samples(100, "dict")
    for got, row in zip(features, [99, 3, 3, 70], strict=True):
        torch.testing.assert_close(got, reference(module, dataset, row), rtol=0, atol=0)


def test_asking_for_an_uncached_row_raises_instead_of_showing_fill_values(
    store_path: Path, filled: CachedFeatureDataset
) -> None:
    entry = FeatureStore.open(store_path)[0]
    with pytest.raises(RowsNotCachedError, match=r"\[50\].*valid_rows") as caught:
        entry.features(rows=[1, 50])
    assert isinstance(caught.value, LookupError)
    with pytest.raises(IndexError, match="out of range"):
        entry.features(rows=[100])
    with pytest.raises(ValueError, match="Expected as_"):
        entry.features(as_="pandas")  # type: ignore[arg-type]


def test_bytes_written_without_the_valid_flag_are_never_returned(
    store_path: Path, filled: CachedFeatureDataset
) -> None:
    # A writer that died after writing a row's bytes but before setting ``valid``.
    # Row 50 sits in a chunk with no valid row, row 71 between valid rows 70 and 75.
    group = zarr.open_group(store_path, path=FeatureStore.open(store_path)[0].name, mode="a")
    for row in (50, 71):
        group["features"][row] = np.full(16, 123.0, dtype=np.float32)
        group["label"][row] = 123
    entry = FeatureStore.open(store_path)[0]
    assert {50, 71}.isdisjoint(entry.valid_rows().tolist())
    assert not (entry.features() == 123.0).any()
    assert 123 not in entry.fields["label"]
    with pytest.raises(RowsNotCachedError):
        entry.read_fields([71])
    assert {50, 71}.isdisjoint(entry.to_xarray()["sample"].values.tolist())
    everything = entry.to_xarray(valid_only=False)
    for row in (50, 71):
        assert not bool(everything["valid"][row])
        assert np.isnan(everything["features"][row].values).all()


def test_fields_line_up_with_features(store_path: Path, filled: CachedFeatureDataset) -> None:
    entry = FeatureStore.open(store_path)[0]
    assert entry.feature_names == ["features"] and entry.field_names == ["label", "name"]
    rows = entry.valid_rows()
    fields = entry.fields
    np.testing.assert_array_equal(fields["label"], rows % 7)
    assert [str(name) for name in fields["name"]] == [f"sample-{i}" for i in rows]
    picked = entry.read_fields([75, 2])
    assert picked["label"].tolist() == [75 % 7, 2] and list(picked["name"]) == ["sample-75", "sample-2"]


@pytest.mark.parametrize("outputs", ["tuple", "dict"])
def test_each_module_output_is_readable_by_name(store_path: Path, outputs: str) -> None:
    fill(store_path, module=Backbone(outputs=outputs))
    entry = FeatureStore.open(store_path)[0]
    names = ["features_0", "features_1"] if outputs == "tuple" else ["features_cls", "features_pooled"]
    assert entry.feature_names == names
    assert entry.features().shape[1] == 16  # the first output by default
    assert entry.features(names[1]).shape[1] == 4
    with pytest.raises(UnknownArrayError, match=re.escape(str(names))) as caught:
        entry.features("features")
    assert isinstance(caught.value, KeyError)


def test_bfloat16_features_come_back_as_float32_numpy_or_bfloat16_torch(store_path: Path) -> None:
    fill(store_path, dtype=torch.bfloat16)
    entry = FeatureStore.open(store_path)[0]
    as_torch = entry.features(as_="torch")
    as_numpy = entry.features()
    assert as_torch.dtype == torch.bfloat16 and as_numpy.dtype == np.float32
    np.testing.assert_array_equal(as_torch.float().numpy(), as_numpy)
    assert entry.info().arrays[0].dtype == "bfloat16"


def test_to_xarray_names_dimensions_and_puts_fields_on_the_sample_axis(
    store_path: Path, filled: CachedFeatureDataset
) -> None:
    entry = FeatureStore.open(store_path)[0]
    dataset = entry.to_xarray()
    assert dict(dataset.sizes) == {"sample": len(entry.valid_rows()), "features_dim1": 16}
    assert set(dataset.coords) == {"sample", "label", "name"}
    assert list(dataset.data_vars) == ["features"]
    np.testing.assert_array_equal(dataset["sample"].values, entry.valid_rows())
    np.testing.assert_array_equal(dataset["features"].values, entry.features())
    assert int(dataset["label"].sel(sample=75)) == 75 % 7
    everything = entry.to_xarray(valid_only=False)
    assert everything.sizes["sample"] == 100
    np.testing.assert_array_equal(np.flatnonzero(everything["valid"].values), entry.valid_rows())
    np.testing.assert_array_equal(everything["features"].values[entry.valid_rows()], entry.features())


def test_plain_zarr_and_xarray_read_the_store_without_cachedfeatures(
    store_path: Path, filled: CachedFeatureDataset
) -> None:
    entry = FeatureStore.open(store_path)[0]
    # An access array as the pruning layer records it, with dimension names so xarray can open it.
    group = zarr.open_group(store_path, path=entry.name, mode="a")
    group.create_array(
        ACCESS,
        shape=(entry.num_chunks, 2),
        dtype="float64",
        fill_value=0.0,
        dimension_names=("chunk", "stat"),
    )
    plain = xr.open_zarr(store_path, group=entry.name, consolidated=False)
    valid = plain["valid"].values
    np.testing.assert_array_equal(np.flatnonzero(valid), entry.valid_rows())
    np.testing.assert_array_equal(plain["features"].values[valid], entry.features())
    np.testing.assert_array_equal(plain["label"].values[valid], entry.fields["label"])
    root = zarr.open_group(store_path, mode="r")
    assert root[entry.name].attrs["cachedfeatures"]["num_rows"] == 100
    assert "access" not in entry.to_xarray()


def test_bytes_per_chunk_count_written_chunks_and_ignore_partial_files(
    store_path: Path, filled: CachedFeatureDataset
) -> None:
    entry = FeatureStore.open(store_path)[0]
    per_chunk = entry.nbytes_per_chunk()
    coverage = entry.coverage()
    assert per_chunk.shape == (7,) and coverage.shape == (7,)
    assert (per_chunk[coverage > 0] > 0).all()
    assert (per_chunk[coverage == 0] == 0).all()
    assert per_chunk.sum() < entry.nbytes_stored()  # the rest is metadata
    # A killed writer's temporary file is not a chunk.
    (store_path / entry.name / "features" / "c" / "3").mkdir(parents=True, exist_ok=True)
    (store_path / entry.name / "features" / "c" / "3" / "0.0123abcd.partial").write_bytes(b"x" * 5000)
    np.testing.assert_array_equal(entry.nbytes_per_chunk(), per_chunk)


class Constant(nn.Module):
    """Features that compress extremely well."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), 256)


def test_compression_ratio_reflects_the_codec_not_how_full_the_entry_is(tmp_path: Path) -> None:
    fill(
        tmp_path / "raw.zarr", shape="tuple", compressor=None, module=Backbone(out=256), rows=list(range(16))
    )
    fill(tmp_path / "zeros.zarr", shape="tuple", module=Constant().eval(), rows=list(range(16)))
    raw = FeatureStore.open(tmp_path / "raw.zarr")[0]
    zeros = FeatureStore.open(tmp_path / "zeros.zarr")[0]
    # Only the first (of 7) chunks is written: a ratio against the full entry would read ~7x.
    # Raw chunks decode to their stored bytes less the 4-byte checksum: just under 1x.
    assert 0.95 < raw.compression_ratio() <= 1.0
    fill(
        tmp_path / "half.zarr", shape="tuple", compressor=None, module=Backbone(out=256), rows=list(range(8))
    )
    # Half a chunk cached: the chunk is stored (and decodes) whole, so raw chunks still read ~1x
    # (a ratio over the cached rows would read 0.5x: how full the chunk is, not the codec).
    assert 0.95 < FeatureStore.open(tmp_path / "half.zarr")[0].compression_ratio() <= 1.0
    assert zeros.compression_ratio() > 20
    assert zeros.info().compression_ratio == pytest.approx(zeros.compression_ratio())


def test_last_used_reads_the_access_statistics_when_recorded(
    store_path: Path, filled: CachedFeatureDataset
) -> None:
    entry = FeatureStore.open(store_path)[0]
    assert entry.last_used is None and entry.access_stats() is None
    group = zarr.open_group(store_path, path=entry.name, mode="a")
    access = group.create_array(
        ACCESS,
        shape=(entry.num_chunks, 2),
        dtype="float64",
        fill_value=0.0,
        dimension_names=("chunk", "stat"),
    )
    entry = FeatureStore.open(store_path)[0]
    assert entry.last_used is None  # recorded, but no chunk read yet
    now = time.time()
    access[2] = [now - 60, 3]
    access[5] = [now, 1]
    entry = FeatureStore.open(store_path)[0]
    assert entry.last_used == dt.datetime.fromtimestamp(now, dt.UTC)
    np.testing.assert_array_equal(entry.access_stats()[:, 1], [0, 0, 3, 0, 0, 1, 0])


def test_info_describes_the_entry(store_path: Path, filled: CachedFeatureDataset) -> None:
    entry = FeatureStore.open(store_path)[0]
    info = entry.info()
    assert info.name == entry.name and info.num_rows == 100 and info.num_chunks == 7
    assert info.valid_rows == len(entry.valid_rows()) and info.chunk_rows == CHUNK_ROWS
    assert info.module.startswith("tests.helpers.Backbone") and info.dataset.startswith(
        "tests.helpers.Samples"
    )
    assert info.module_digest == entry.meta["module"]["digest"]
    assert info.nbytes_stored == entry.nbytes_stored() and info.nbytes_logical == entry.nbytes_logical()
    assert "blosc lz4" in info.codecs
    assert [(a.name, a.role, a.dtype, a.shape, a.chunks) for a in info.arrays] == [
        ("features", "feature", "float32", (16,), (16, 16)),
        ("label", "field", "int64", (), (16,)),
        ("name", "field", "str", (), (16,)),
    ]
    assert dt.datetime.fromisoformat(info.created) <= dt.datetime.now(dt.UTC)


def test_repr_reads_well_in_a_terminal(store_path: Path, filled: CachedFeatureDataset) -> None:
    store = FeatureStore.open(store_path)
    entry = store[0]
    valid = len(entry.valid_rows())
    text = repr(entry)
    assert text.startswith(f"<Entry {entry.name}>")
    assert f"{valid} / 100 valid" in text and "7 chunks of 16 rows" in text
    assert "features float32(16,)" in text and "label int64()" in text and "last used never" in text
    store_text = repr(store)
    assert store_text.startswith(f"<FeatureStore {store_path}: 1 entry,")
    assert f"{entry.name}  {valid}/100 rows" in store_text


CELL = re.compile(
    r"<title>rows? (\d+)(?:-(\d+))?: (\d+)/(\d+) cached</title>.*?"
    r'<rect x="[0-9.]+" y="[0-9.]+" width="[0-9.]+" height="([0-9.]+)" fill="#2a7ab9"/>'
)


def bar_cells(page: str) -> list[tuple[int, int, int, int, float]]:
    """(first row, last row, cached, rows, filled height) of each cell of the coverage bar."""
    return [
        (int(first), int(last or first), int(cached), int(rows), float(height))
        for first, last, cached, rows, height in CELL.findall(page)
    ]


def test_html_shows_a_coverage_bar_of_the_valid_rows(store_path: Path, filled: CachedFeatureDataset) -> None:
    store = FeatureStore.open(store_path)
    entry = store[0]
    page = entry._repr_html_()
    assert "<script" not in page and page.count("<svg") == 1
    cells = bar_cells(page)
    mask = entry.valid_mask()
    assert [first for first, *_ in cells] == list(range(100))  # 100 rows: one cell each
    assert [cached for _, _, cached, _, _ in cells] == mask.astype(int).tolist()
    assert [height for *_, height in cells] == [14.0 if cached else 0.0 for cached in mask]
    assert page.count('stroke="white"') == 6  # 7 chunks, 6 boundaries
    assert entry.module_description.split(",")[0] in page and "40 / 100" not in page
    assert f"{len(entry.valid_rows())} / 100 valid" in page
    store_page = store._repr_html_()
    assert entry.name in store_page and store_page.count("<svg") == 1
    assert bar_cells(store_page) == cells


def test_html_groups_rows_when_there_are_many_and_escapes_text(store_path: Path) -> None:
    dataset = Samples(2000, "tuple")
    cached = CachedFeatureDataset(dataset, Backbone(), store=store_path, chunk_rows=4)
    cached.__getitems__(list(range(40)))
    entry = FeatureStore.open(store_path)[0]
    page = entry._repr_html_()
    cells = bar_cells(page)
    assert len(cells) == 120
    assert sum(rows for _, _, _, rows, _ in cells) == 2000
    assert sum(cached for _, _, cached, _, _ in cells) == len(entry.valid_rows())
    first_rows, first_cached = cells[0][3], cells[0][2]
    assert cells[0][4] == pytest.approx(14 * first_cached / first_rows, abs=0.01)
    assert 'stroke="white"' not in page  # 500 chunks: too many boundaries to draw
    assert "<Conv2d" not in page  # text from the store is escaped


def test_store_indexing_by_name_and_position(store_path: Path, filled: CachedFeatureDataset) -> None:
    store = FeatureStore.open(store_path)
    assert len(store) == 1 and store[filled.entry_name].name == filled.entry_name == store[-1].name
    with pytest.raises(EntryNotFoundError, match=filled.entry_name) as caught:
        store["Backbone-nope"]
    assert isinstance(caught.value, KeyError)
    with pytest.raises(IndexError, match="has 1 entry"):
        store[1]


def test_empty_entry_reads_as_empty(store_path: Path) -> None:
    cached = CachedFeatureDataset(Samples(40, "tuple"), Backbone(), store=store_path, dataset_version="v1")
    assert cached.entry is not None
    cached.entry.valid[:] = False  # the entry's creation caches one row; forget it
    entry = FeatureStore.open(store_path)[0]
    assert len(entry.valid_rows()) == 0
    assert entry.features().shape == (0, 16)
    assert entry.fields["field_1"].shape == (0,)
    assert entry.to_xarray().sizes["sample"] == 0
    assert "0 / 40 valid" in repr(entry)


def test_an_in_memory_store_can_be_explored_too() -> None:
    cached = CachedFeatureDataset(
        Samples(40, "dict"), Backbone(), store=None, input_key="image", chunk_rows=8
    )
    cached.__getitems__(list(range(20)))
    entry = cached.store[0]
    np.testing.assert_array_equal(entry.valid_rows(), np.arange(20))
    np.testing.assert_array_equal(entry.to_xarray()["features"].values, entry.features())
    assert (entry.nbytes_per_chunk()[:2] > 0).all() and (entry.nbytes_per_chunk()[3:] == 0).all()
    assert "<memory>" in repr(cached.store)


def test_repr_of_an_entry_whose_store_is_gone_says_so_instead_of_raising(
    store_path: Path, filled: CachedFeatureDataset
) -> None:
    entry = FeatureStore.open(store_path)[0]
    shutil.rmtree(store_path / entry.name / "valid")
    assert repr(entry).startswith(f"<Entry {entry.name} (unreadable: ")
