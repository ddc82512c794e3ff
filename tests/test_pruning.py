"""Size budget and MRU pruning: simulation over repeated passes, races, errors, access stats."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cachedfeatures import BudgetError, CachedFeatureDataset, FeatureStore
from cachedfeatures.access import read_access
from cachedfeatures.pruning import drop_chunk, measure, parse_policy, plan, prune
from cachedfeatures.units import format_bytes, parse_bytes
from tests.helpers import Samples

ROWS, CHUNK_ROWS, BATCH = 256, 8, 32


class Tile(torch.nn.Module):
    """A cheap, batch-invariant module (element-wise): 256 float32 features per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.rows_computed = 0
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows_computed += len(x)
        return torch.tanh(x.flatten(1)).repeat(1, 2)[:, :256]


def full_reference(tmp_path: Path) -> tuple[np.ndarray, int, int]:
    """Every row's features, the bytes of the fully cached store, and its largest chunk."""
    path = tmp_path / "full.zarr"
    cached = CachedFeatureDataset(Samples(ROWS, "tensor"), Tile(), path, chunk_rows=CHUNK_ROWS)
    features = np.stack([sample.numpy() for sample in cached.__getitems__(list(range(ROWS)))])
    usage = measure(FeatureStore.open(path))
    return features, usage.total, max(usage.chunks[cached.entry_name].values())


def simulate(store_path: Path, max_bytes: int, policy: str, orders: list[np.ndarray], expected: np.ndarray):
    """Hit fraction of each pass, and the largest store size seen after any batch."""
    module = Tile()
    cached = CachedFeatureDataset(
        Samples(ROWS, "tensor"),
        module,
        store_path,
        chunk_rows=CHUNK_ROWS,
        max_bytes=max_bytes,
        policy=policy,  # type: ignore[arg-type]
    )
    store = FeatureStore.open(store_path)
    hits, peak = [], 0
    for order in orders:
        computed_before = module.rows_computed
        for start in range(0, ROWS, BATCH):
            batch = order[start : start + BATCH].tolist()
            samples = cached.__getitems__(batch)
            np.testing.assert_array_equal(np.stack([s.numpy() for s in samples]), expected[batch])
            peak = max(peak, measure(store).total)
        hits.append(1 - (module.rows_computed - computed_before) / ROWS)
    return hits, peak


@pytest.mark.slow
def test_mru_keeps_half_the_rows_cached_over_repeated_passes(tmp_path: Path, store_path: Path) -> None:
    expected, full_bytes, chunk_bytes = full_reference(tmp_path)
    budget = full_bytes // 2
    rng = np.random.default_rng(0)
    orders = [np.arange(ROWS)] * 5 + [rng.permutation(ROWS) for _ in range(5)]
    hits, peak = simulate(store_path, budget, "mru", orders, expected)
    assert hits[0] == pytest.approx(0.0, abs=1 / ROWS)  # the probe row is the only early hit
    assert min(hits[1:]) >= 0.45, hits
    assert peak <= budget + chunk_bytes, (peak, budget, chunk_bytes)
    assert measure(FeatureStore.open(store_path)).total <= budget


@pytest.mark.slow
def test_lru_thrashes_on_sequential_passes(tmp_path: Path, store_path: Path) -> None:
    expected, full_bytes, chunk_bytes = full_reference(tmp_path)
    budget = full_bytes // 2
    hits, peak = simulate(store_path, budget, "lru", [np.arange(ROWS)] * 5, expected)
    assert max(hits[1:]) < 0.05, hits
    assert peak <= budget + chunk_bytes
