"""Bugs the property-based tests found, each pinned by a small explicit case."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cachedfeatures import CachedFeatureDataset
from tests.helpers import Listed


class Affine(nn.Module):
    """Per element: ``2x + 1`` on the flattened input plus a ones column; ``pick`` selects one column."""

    def __init__(self, pick: int | None = None) -> None:
        super().__init__()
        self.pick = pick
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([x.float().reshape(len(x), -1) * 2 + 1, torch.ones(len(x), 1)], dim=1)
        return flat if self.pick is None else flat[:, self.pick]


def test_zero_dim_feature_rows_are_served_zero_dim(tmp_path) -> None:
    data = Listed([torch.tensor([float(i)]) for i in range(4)])
    cached = CachedFeatureDataset(data, Affine(pick=0), tmp_path / "f.zarr", chunk_rows=2)
    for _ in range(2):  # computed, then from the store
        for i in range(4):
            assert cached[i].shape == () and torch.equal(cached[i], torch.tensor(2.0 * i + 1))


def test_empty_input_tensors_are_fingerprinted_and_cached(tmp_path) -> None:
    data = Listed([(torch.from_numpy(np.zeros(0, np.float32)), i) for i in range(3)])  # stride (0,)
    cached = CachedFeatureDataset(data, Affine(), tmp_path / "f.zarr")
    assert [cached[i][1] for i in range(3)] == [0, 1, 2]
    assert torch.equal(cached[2][0], torch.ones(1))


def test_input_with_odd_strides_on_a_size_one_dim(tmp_path) -> None:
    base = torch.arange(6.0).reshape(3, 1, 2)
    data = Listed([base[i][..., 0] for i in range(3)])  # shape (1,), stride (2,)
    cached = CachedFeatureDataset(data, Affine(), tmp_path / "f.zarr")
    assert torch.equal(cached[1], torch.tensor([2.0 * 2 + 1, 1.0]))


def test_numpy_float64_field_comes_back_as_numpy_float64(tmp_path) -> None:
    data = Listed([(torch.ones(2), np.float64(i) / 3, np.zeros((0, 2), np.float32)) for i in range(4)])
    cached = CachedFeatureDataset(data, Affine(), tmp_path / "f.zarr", chunk_rows=2)
    for _ in range(2):
        for i in range(4):
            _, value, empty = cached[i]
            assert type(value) is np.float64 and value == np.float64(i) / 3
            assert empty.shape == (0, 2) and empty.dtype == np.float32


class IsLarge(nn.Module):
    """Bool features, all ``False`` for small inputs: chunks equal to the fill value."""

    def __init__(self) -> None:
        super().__init__()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x > 100


def test_features_equal_to_the_fill_value_are_stored_and_served(tmp_path) -> None:
    """zarr skips writing chunks equal to the fill value unless the array is told not to; the
    read path then took the valid rows of such a chunk for damage and recomputed them forever."""
    data = Listed([torch.full((3,), float(i)) for i in range(8)])
    path = tmp_path / "f.zarr"
    first = CachedFeatureDataset(data, IsLarge(), path, chunk_rows=4)
    first.__getitems__(list(range(8)))
    again = CachedFeatureDataset(data, IsLarge(), path, chunk_rows=4)
    samples = again.__getitems__(list(range(8)))
    assert all(torch.equal(s, torch.zeros(3, dtype=torch.bool)) for s in samples)
    assert again.module_calls == again.spot_check_calls  # all hits: only the spot check ran it
