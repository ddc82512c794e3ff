"""A process that is one rank of several stores only its own chunks on a store without file locks.

In one process, with torchrun's ``RANK``/``WORLD_SIZE`` set and an fsspec ``memory://`` store (no
file locks, like an object store). The torchrun tests on S3 are in
``tests/reliability/test_ddp_training.py``.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from cachedfeatures import CachedFeatureDataset, ChunkOwnership, build_on_ranks
from tests.helpers import Backbone, Samples, reference

ROWS, CHUNK_ROWS = 64, 16  # 4 chunks: rank 1 of 2 owns chunks 1 and 3


def _cached(store: str | Path, **kwargs: object) -> CachedFeatureDataset:
    return CachedFeatureDataset(
        Samples(ROWS), Backbone(), store, chunk_rows=CHUNK_ROWS, batch_size=16, spot_check=0, **kwargs
    )


@pytest.fixture
def rank_1_of_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")


def _url() -> str:
    return f"memory://{uuid.uuid4().hex}/features.zarr"


def _owned_by_rank_1(valid: np.ndarray) -> bool:
    rows = np.arange(ROWS)
    return bool(np.array_equal(valid[1:], ((rows // CHUNK_ROWS) % 2 == 1)[1:]))  # row 0: the creation probe


@pytest.mark.usefixtures("rank_1_of_2")
def test_one_rank_of_several_stores_only_its_own_chunks_on_a_store_without_locks() -> None:
    cached = _cached(_url())
    assert cached.entry is not None
    served = cached.__getitems__(list(range(ROWS)))
    assert _owned_by_rank_1(cached.entry.valid_mask())  # the other rank's rows: served, not stored
    data, module = Samples(ROWS), Backbone()
    assert all(torch.equal(served[i][0], reference(module, data, i)) for i in range(ROWS))


@pytest.mark.usefixtures("rank_1_of_2")
def test_prefill_without_distributed_stores_every_chunk_even_in_one_rank_of_several() -> None:
    cached = _cached(_url())
    cached.prefill(progress=False, distributed=False)
    assert cached.entry is not None and cached.entry.valid_mask().all()
    assert cached.owned_chunks is None  # restored after the call


@pytest.mark.usefixtures("rank_1_of_2")
def test_explicit_ownership_wins_over_the_rank() -> None:
    cached = _cached(_url(), owned_chunks=ChunkOwnership(0, 1))
    cached.__getitems__(list(range(ROWS)))
    assert cached.entry is not None and cached.entry.valid_mask().all()


@pytest.mark.usefixtures("rank_1_of_2")
def test_a_local_store_has_file_locks_so_every_rank_stores_what_it_computes(store_path: Path) -> None:
    cached = _cached(store_path)
    cached.__getitems__(list(range(ROWS)))
    assert cached.entry is not None and cached.entry.valid_mask().all()


def test_build_on_ranks_without_a_process_group_just_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    calls = []
    assert build_on_ranks(lambda: calls.append(1) or "built") == "built"
    assert calls == [1]
