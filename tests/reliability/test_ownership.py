"""Chunk ownership: every chunk has exactly one writer, also after splitting between workers."""

from __future__ import annotations

import numpy as np
import pytest

from cachedfeatures import CachedFeatureDataset
from cachedfeatures.store.ownership import ChunkOwnership
from tests.helpers import Backbone, Samples


@pytest.mark.parametrize("world_size,workers", [(1, 1), (1, 3), (2, 2), (3, 4)])
def test_ranks_and_their_workers_partition_the_chunks(world_size: int, workers: int) -> None:
    num_chunks = 50
    owners = np.zeros(num_chunks, dtype=int)
    for rank in range(world_size):
        owner = ChunkOwnership(rank, world_size)
        mine = set(owner.chunks(num_chunks))
        parts = [set(owner.split(w, workers).chunks(num_chunks)) for w in range(workers)]
        assert set().union(*parts) == mine  # workers share exactly their rank's chunks
        for part in parts:
            owners[list(part)] += 1
    assert owners.tolist() == [1] * num_chunks  # every chunk: exactly one writer


def test_owned_rows_follow_chunk_boundaries() -> None:
    owner = ChunkOwnership(1, 3)
    rows = np.arange(40)
    assert np.array_equal(owner.owned_rows(rows, 4), (rows // 4) % 3 == 1)


@pytest.mark.parametrize(
    "rank,world_size,error",
    [(2, 2, ValueError), (-1, 2, ValueError), (0, 0, ValueError), (0.5, 2, TypeError)],
)
def test_bad_ownership_is_rejected(rank: object, world_size: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="Expected"):
        ChunkOwnership(rank, world_size)  # type: ignore[arg-type]


def test_owned_chunks_must_be_a_chunk_ownership(store_path) -> None:
    with pytest.raises(TypeError, match="Expected owned_chunks to be None or a ChunkOwnership"):
        CachedFeatureDataset(Samples(4), Backbone(), store_path, owned_chunks=[0, 1])  # type: ignore[arg-type]


def test_from_env_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert ChunkOwnership.from_env() == ChunkOwnership(3, 4)
