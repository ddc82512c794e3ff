"""ChunkShuffleSampler: a permutation per epoch, split across ranks, chunk-local, well mixed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from cachedfeatures import CachedFeatureDataset, ChunkShuffleSampler, InvalidArgumentError
from tests.helpers import Backbone, Samples, scratch_files_work


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    chunk_rows=st.integers(1, 40),
    window=st.integers(1, 5),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 5),
)
def test_each_epoch_is_a_permutation(n: int, chunk_rows: int, window: int, seed: int, epoch: int) -> None:
    sampler = ChunkShuffleSampler(n, chunk_rows, window=window, seed=seed)
    sampler.set_epoch(epoch)
    rows = list(sampler)
    assert len(rows) == len(sampler) == n
    assert sorted(rows) == list(range(n))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300), chunk_rows=st.integers(1, 40), window=st.integers(1, 4), seed=st.integers(0, 99)
)
def test_batches_stay_within_a_window_of_chunks(n: int, chunk_rows: int, window: int, seed: int) -> None:
    rows = ChunkShuffleSampler(n, chunk_rows, window=window, seed=seed).indices()
    block = window * chunk_rows
    for start in range(0, n, block):
        chunks = set((rows[start : start + block] // chunk_rows).tolist())
        assert len(chunks) <= window + 1  # the short last chunk can shift one boundary


def test_seeded_per_epoch() -> None:
    a, b = ChunkShuffleSampler(1000, 16, seed=3), ChunkShuffleSampler(1000, 16, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first)
    assert list(ChunkShuffleSampler(1000, 16, seed=4)) != first


def test_no_shuffle_is_sequential() -> None:
    assert list(ChunkShuffleSampler(50, 8, shuffle=False)) == list(range(50))


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n", [100, 96, 7])
def test_ranks_split_the_epoch_like_distributed_sampler(n: int, drop_last: bool) -> None:
    world = 3
    shares = [
        ChunkShuffleSampler(n, 8, world_size=world, rank=r, seed=1, drop_last=drop_last).indices()
        for r in range(world)
    ]
    lengths = {len(share) for share in shares}
    assert lengths == {n // world if drop_last else -(-n // world)}
    rows = np.concatenate(shares)
    if drop_last:
        assert len(set(rows.tolist())) == len(rows)  # nothing repeated
    else:
        assert set(rows.tolist()) == set(range(n))  # nothing lost
    # each rank reads its own chunks: a chunk is shared only at the edge of a share
    chunk_sets = [set((share // 8).tolist()) for share in shares]
    for r in range(world - 1):
        assert len(chunk_sets[r] & chunk_sets[r + 1]) <= 1


def test_chunk_rows_come_from_a_cached_dataset(store_path: Path) -> None:
    cached = CachedFeatureDataset(Samples(40), Backbone(), store_path, chunk_rows=8)
    sampler = ChunkShuffleSampler(cached)
    assert sampler.chunk_rows == 8 and len(sampler) == 40


def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="chunk_rows"):
        ChunkShuffleSampler(list(range(10)))
    with pytest.raises(ValueError, match="rank"):
        ChunkShuffleSampler(10, 2, world_size=2, rank=2)
    with pytest.raises(ValueError, match="window"):
        ChunkShuffleSampler(10, 2, window=0)
    with pytest.raises(TypeError, match="data_source"):
        ChunkShuffleSampler(object())  # type: ignore[arg-type]


def test_each_chunk_is_decoded_about_once_per_epoch(
    store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a cache of window + 1 chunks, an epoch decodes each chunk about once; shuffle=True
    with the same cache decodes chunks over and over where no scratch file holds the decoded
    entry (``CACHEDFEATURES_SPILL_DIR=off``), and once each where one does (the default)."""
    n, chunk_rows, window = 512, 16, 2
    data = Samples(n, "tuple")
    cached = CachedFeatureDataset(data, Backbone(), store_path, chunk_rows=chunk_rows, compressor="default")
    cached.__getitems__(list(range(n)))
    row_bytes = 16 * 4 + 8  # float32 features and an int64 label
    budget = (window + 1) * (chunk_rows * row_bytes + chunk_rows)
    num_chunks = n // chunk_rows

    def misses(**loader: object) -> int:
        reloaded = CachedFeatureDataset(
            data, Backbone(), store_path, chunk_rows=chunk_rows, chunk_cache_bytes=budget
        )
        assert reloaded.entry is not None
        for _ in DataLoader(reloaded, batch_size=32, **loader):  # type: ignore[arg-type]
            pass
        assert reloaded.entry.reader.cache_info().nbytes <= budget
        return reloaded.entry.reader.cache_info().misses

    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setenv("CACHEDFEATURES_SPILL_DIR", str(spill))
    spilled = misses(shuffle=True, generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("CACHEDFEATURES_SPILL_DIR", "off")
    chunked = misses(sampler=ChunkShuffleSampler(n, chunk_rows, window=window, seed=0))
    shuffled = misses(shuffle=True, generator=torch.Generator().manual_seed(0))
    assert num_chunks <= chunked <= num_chunks * 1.1
    assert shuffled >= 3 * num_chunks
    if scratch_files_work(spill):  # else: no scratch file
        assert spilled == num_chunks


def distinct_labels_per_batch(labels: np.ndarray, order: np.ndarray, batch: int) -> float:
    return float(np.mean([len(np.unique(labels[order[i : i + batch]])) for i in range(0, len(order), batch)]))


def test_label_mixing_against_full_shuffle() -> None:
    """How many classes a batch of 256 sees (10 classes, 65536 rows, chunks of 1024 rows).

    Rows stored in random order: the sampler mixes like a full shuffle (10 of 10 classes).
    Rows sorted by class: a batch sees about as many classes as its window has chunks (1.1
    for window=1, 4.3 for window=4), and a window of 16 chunks (a quarter of the epoch) sees
    9.75 of 10, close to a full shuffle.
    """
    n, chunk_rows, batch, classes = 65536, 1024, 256, 10
    rng = np.random.default_rng(0)
    full = distinct_labels_per_batch
    random_labels = rng.integers(0, classes, n)
    sorted_labels = np.sort(random_labels)
    shuffle = rng.permutation(n)

    sampler = ChunkShuffleSampler(n, chunk_rows, window=4, seed=0).indices()
    assert full(random_labels, sampler, batch) >= 0.98 * full(random_labels, shuffle, batch)

    narrow = full(sorted_labels, sampler, batch)
    wide = full(sorted_labels, ChunkShuffleSampler(n, chunk_rows, window=16, seed=0).indices(), batch)
    everything = full(sorted_labels, shuffle, batch)
    assert narrow <= 0.5 * everything
    assert narrow < wide and wide >= 0.9 * everything


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_owner_split_gives_each_rank_only_its_own_chunks_and_together_every_row(world_size: int) -> None:
    samplers = [
        ChunkShuffleSampler(100, 16, split="owner", world_size=world_size, rank=rank)
        for rank in range(world_size)
    ]
    orders = []
    for epoch in (0, 1):
        shares = []
        for rank, sampler in enumerate(samplers):
            sampler.set_epoch(epoch)
            share = sampler.indices()
            assert len(share) == len(sampler) == len(samplers[0])  # even shares, as DDP needs
            assert set((share // 16 % world_size).tolist()) == {rank}  # only chunks it owns
            shares.append(share)
        assert set(np.concatenate(shares).tolist()) == set(range(100))
        orders.append(shares[0])
    assert not np.array_equal(orders[0], orders[1])  # a new order every epoch


def test_owner_split_with_more_ranks_than_chunks_still_yields_an_even_share() -> None:
    shares = [
        ChunkShuffleSampler(10, 4, split="owner", world_size=4, rank=rank).indices() for rank in range(4)
    ]
    assert [len(share) for share in shares] == [4, 4, 4, 4]
    assert set(np.concatenate(shares[:3]).tolist()) == set(range(10))


def test_split_must_be_epoch_or_owner() -> None:
    with pytest.raises(InvalidArgumentError, match="Expected split to be one of 'epoch', 'owner'"):
        ChunkShuffleSampler(10, 4, split="chunks")  # type: ignore[arg-type]
