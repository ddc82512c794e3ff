"""A process that is one rank of several stores only its own chunks on a store without file locks.

In one process, with torchrun's ``RANK``/``WORLD_SIZE`` set and an fsspec ``memory://`` store (no
file locks, like an object store). The torchrun tests on S3 are in
``tests/reliability/test_ddp_training.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Iterable
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, WrapperStore

from cachedfeatures import CachedFeatureDataset, ChunkOwnership, FeatureStore, build_on_ranks
from cachedfeatures.pipeline.prefill import owned_chunks, owned_valid
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


class CountingStore(WrapperStore[LocalStore]):
    """A local store that records the keys it is asked for (in one list shared by the copies
    zarr makes of it, e.g. read-only ones)."""

    keys: ClassVar[list[str]] = []

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        self.keys.append(key)
        return await super().get(key, prototype, byte_range)

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)


def test_a_rank_reads_only_its_own_chunks_of_valid(tmp_path: Path) -> None:
    cached = _cached(tmp_path / "features.zarr")
    cached.prefill(progress=False)
    counting = CountingStore(LocalStore(tmp_path / "features.zarr"))
    entry = FeatureStore.open(counting).entry(cached.entry_name)
    assert entry is not None
    chunks = owned_chunks(entry.num_chunks, 1, 2)
    owned = np.zeros(ROWS, dtype=bool)
    for chunk in chunks:
        owned[chunk * CHUNK_ROWS : (chunk + 1) * CHUNK_ROWS] = True
    counting.keys.clear()
    mask = owned_valid(entry, owned, 2)
    assert np.array_equal(mask, owned)  # every row valid: exactly the owned ones are set
    read = {key.rsplit("/", 1)[-1] for key in counting.keys if "/valid/c/" in key}
    assert read == {str(c) for c in chunks.tolist()}
