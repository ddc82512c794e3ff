"""Modules that behave legally but unusually must never make the cache store or serve a wrong row.

Each case checks every row against the module's output computed directly, once through the
map-style API, once through ``loader()``, once through ``prefill()``, and again from the store
reopened in this process (what later runs would be served).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from cachedfeatures import CachedFeatureDataset, FeatureStore

N, DIM = 64, 4


class Inputs(Dataset[Any]):
    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int) -> Any:
        return (torch.arange(DIM, dtype=torch.float32) + 10 * index, index)


def expected(index: int) -> torch.Tensor:
    return (torch.arange(DIM, dtype=torch.float32) + 10 * index) * 2 + 1


class ReusedBuffer(nn.Module):
    """Writes each batch's output into one preallocated buffer and returns a view of it, as
    optimized inference code and CUDA graphs do: the next call overwrites the last output."""

    def __init__(self) -> None:
        super().__init__()
        self.out = torch.zeros(N, DIM)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.out[: len(x)] = x * 2 + 1
        return self.out[: len(x)]


def _check_rows(samples: list[Any], rows: list[int]) -> None:
    wrong = [
        row
        for (features, label), row in zip(samples, rows, strict=True)
        if label != row or not torch.equal(features, expected(row))
    ]
    assert wrong == [], f"{len(wrong)} of {len(rows)} rows wrong: {wrong[:8]}"


def _check_store(path: Any) -> None:
    entry = FeatureStore.open(path).entries[0]
    rows = entry.valid_rows()
    assert len(rows) == N
    stored = torch.from_numpy(entry.features(rows=rows))
    assert torch.equal(stored, torch.stack([expected(int(i)) for i in rows]))


def _cached(path: Any, module: nn.Module) -> CachedFeatureDataset:
    # module_version: the buffer changes with every call, so a hashed state would too.
    return CachedFeatureDataset(Inputs(), module, path, batch_size=8, chunk_rows=16, module_version="v1")


def test_reused_output_buffer_getitems(tmp_path) -> None:
    cached = _cached(tmp_path / "f.zarr", ReusedBuffer())
    _check_rows(cached.__getitems__(list(range(N))), list(range(N)))
    _check_store(tmp_path / "f.zarr")
    again = _cached(tmp_path / "f.zarr", ReusedBuffer())
    _check_rows(again.__getitems__(list(range(N))), list(range(N)))
    assert again.module_calls == again.spot_check_calls  # every row a hit: only the spot check ran


def test_reused_output_buffer_loader(tmp_path) -> None:
    cached = _cached(tmp_path / "f.zarr", ReusedBuffer())
    loader = cached.loader(batch_size=16, shuffle=True)
    try:
        for features, labels in loader:
            _check_rows(list(zip(features, labels.tolist(), strict=True)), labels.tolist())
    finally:
        loader.close()
    _check_store(tmp_path / "f.zarr")


def test_reused_output_buffer_prefill(tmp_path) -> None:
    cached = _cached(tmp_path / "f.zarr", ReusedBuffer())
    cached.prefill(progress=False)
    _check_store(tmp_path / "f.zarr")


class CollidingKeys(nn.Module):
    """A dict output whose keys sanitise to one array name (``"a b"`` and ``"a_b"``)."""

    def __init__(self) -> None:
        super().__init__()
        self.eval()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a b": x * 2 + 1, "a_b": x * 3, "a/b": x - 1}


def test_dict_keys_that_sanitise_to_one_name_get_their_own_arrays(tmp_path) -> None:
    path = tmp_path / "f.zarr"
    for attempt in range(2):  # computed, then from the reopened store
        cached = CachedFeatureDataset(Inputs(), CollidingKeys(), path, batch_size=8, chunk_rows=16)
        for row, (out, label) in zip(range(N), cached.__getitems__(list(range(N))), strict=True):
            x = torch.arange(DIM, dtype=torch.float32) + 10 * row
            assert label == row and list(out) == ["a b", "a_b", "a/b"]
            assert torch.equal(out["a b"], x * 2 + 1), (attempt, row)
            assert torch.equal(out["a_b"], x * 3), (attempt, row)
            assert torch.equal(out["a/b"], x - 1), (attempt, row)
        assert attempt == 0 or cached.module_calls == cached.spot_check_calls  # hits, and the spot check
    names = FeatureStore.open(path).entries[0].feature_names
    assert names == ["features_a_b", "features_a_b_2", "features_a_b_3"]


def test_an_entry_written_with_colliding_output_names_is_not_reused(tmp_path, monkeypatch, caplog) -> None:
    """Entries written before names were made unique hold two outputs in one array: a new entry."""
    from cachedfeatures.compute import layout

    path = tmp_path / "f.zarr"
    with monkeypatch.context() as patch:  # the old naming: one name for "a b", "a_b" and "a/b"
        patch.setattr(layout, "_unique_name", lambda name, taken: name)
        old = CachedFeatureDataset(Inputs(), CollidingKeys(), path, batch_size=8, chunk_rows=16)
        old.__getitems__(list(range(N)))
    cached = CachedFeatureDataset(Inputs(), CollidingKeys(), path, batch_size=8, chunk_rows=16)
    assert cached.entry_name != old.entry_name
    assert "stores two module outputs in one array" in caplog.text
    out, _ = cached[5]
    x = torch.arange(DIM, dtype=torch.float32) + 50
    assert torch.equal(out["a b"], x * 2 + 1) and torch.equal(out["a_b"], x * 3)
