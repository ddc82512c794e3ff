"""``cached.on_device()``: the whole entry held on a device serves exactly the batches of the
loader's epochs (same order, same views, same structure), without reading or running anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from cachedfeatures import CachedFeatureDataset, DeviceFeatures
from cachedfeatures.errors import InvalidArgumentError, RowsNotCachedError
from cachedfeatures.pipeline.collate import move_to
from tests.helpers import Backbone, Listed, Samples, assert_same


def _filled(path: Path, shape: str, **options: Any) -> tuple[CachedFeatureDataset, Backbone]:
    data, module = Samples(70, shape), Backbone()
    if shape == "dict":
        options["input_key"] = "image"
    cached = CachedFeatureDataset(data, module, path, chunk_rows=16, spot_check=0, **options)
    cached.prefill(progress=False)
    return cached, module


@pytest.mark.parametrize("shape", ["tensor", "tuple", "dict"])
def test_on_device_serves_the_loaders_epochs(tmp_path: Path, shape: str) -> None:
    cached, module = _filled(tmp_path / "features.zarr", shape)
    features = cached.on_device("cpu")
    assert isinstance(features, DeviceFeatures) and len(features) == 70
    calls, loads = module.calls, cached.dataset.loads
    loader = cached.loader(16, shuffle=True, seed=3)
    for _epoch in range(2):  # a new permutation each epoch, as the loader's
        expected = list(loader)
        served = list(features.batches(16, shuffle=True, seed=3))
        assert len(served) == len(expected) == 5
        for got, want in zip(served, expected, strict=True):
            assert_same(got, want)
    assert module.calls == calls and cached.dataset.loads == loads  # nothing computed or loaded
    picked = [5, 69, 0, 5]
    assert_same(features.batch(picked), default_collate([cached[i] for i in picked]))
    assert list(features.batches(32, drop_last=True)).__len__() == 2


def test_on_device_serves_each_epochs_views(tmp_path: Path) -> None:
    cached, _module = _filled(tmp_path / "features.zarr", "tuple", views=2)
    features = cached.on_device("cpu")
    loader = cached.loader(16, shuffle=True)
    for epoch in range(3):
        expected = list(loader)  # the dataset's epoch `epoch`: one view of each sample
        served = list(features.batches(16, shuffle=True, epoch=epoch))
        for got, want in zip(served, expected, strict=True):
            assert_same(got, want)
    rows = cached.rows_of(np.arange(70), 1)
    assert set((rows // cached.entry.meta["views"]["stride"]).tolist()) == {0, 1}  # both views served


def test_on_device_needs_every_row_stored(tmp_path: Path) -> None:
    data, module = Samples(40, "tuple"), Backbone()
    cached = CachedFeatureDataset(data, module, tmp_path / "features.zarr", chunk_rows=16, spot_check=0)
    cached.__getitems__(list(range(10)))
    cached.flush()
    with pytest.raises(RowsNotCachedError, match="prefill"):
        cached.on_device("cpu")
    cached.prefill(progress=False)
    assert_same(cached.on_device("cpu").batch([39]), default_collate([cached[39]]))


def test_on_device_refuses_variable_length_rows_with_the_fix(tmp_path: Path) -> None:
    samples = [{"image": torch.randn(3, 8, 8), "ids": list(range(i % 5 + 1))} for i in range(20)]
    cached = CachedFeatureDataset(
        Listed(samples), Backbone(), tmp_path / "features.zarr", input_key="image", spot_check=0
    )
    cached.prefill(progress=False)
    with pytest.raises(InvalidArgumentError, match="loader"):
        cached.on_device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_device_cuda_serves_the_loaders_batches_on_the_gpu(tmp_path: Path) -> None:
    cached, _module = _filled(tmp_path / "features.zarr", "dict")
    features = cached.on_device("cuda")
    expected = list(cached.loader(16, shuffle=True, seed=1))
    for got, want in zip(features.batches(16, shuffle=True, seed=1), expected, strict=True):
        assert {leaf.device.type for leaf in (got["image"], got["label"])} == {"cuda"}
        assert_same(move_to(got, torch.device("cpu")), want)
