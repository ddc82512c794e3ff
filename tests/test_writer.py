"""The background writer: coalescing per chunk, flushing, errors that are never lost."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cachedfeatures import CachedFeatureDataset, WriterError
from cachedfeatures.store.writer import ChunkBuffer, Writer
from tests.helpers import Backbone, Samples, reference


def filled_columns(cached: CachedFeatureDataset, rows: np.ndarray) -> dict[str, np.ndarray]:
    return cached.compute_loaded(cached.load(rows))


@pytest.fixture
def cached(store_path: Path) -> CachedFeatureDataset:
    return CachedFeatureDataset(
        Samples(96, "tuple"), Backbone(), store_path, chunk_rows=16, dataset_version="v"
    )


def test_shuffled_rows_are_written_once_per_chunk(cached: CachedFeatureDataset) -> None:
    entry = cached.entry
    assert entry is not None
    order = np.random.default_rng(0).permutation(np.arange(1, 96))  # row 0 is the stored probe
    with Writer(entry) as writer:
        for start in range(0, len(order), 10):
            rows = order[start : start + 10]
            writer.submit(rows, filled_columns(cached, rows))
    assert writer.chunks_written == 6  # one read-modify-write per chunk, not one per batch
    assert writer.rows_written == 95
    assert entry.valid_mask().all()
    read = entry.read(np.arange(96))
    expected = torch.stack([reference(cached.module, cached.dataset, i) for i in range(96)])  # type: ignore[arg-type]
    assert torch.equal(torch.from_numpy(read.arrays["features"]), expected)


def test_without_a_buffer_every_batch_is_written_as_it_comes(cached: CachedFeatureDataset) -> None:
    entry = cached.entry
    assert entry is not None
    order = np.random.default_rng(0).permutation(np.arange(1, 96))
    with Writer(entry, max_buffer_bytes=0) as writer:
        for start in range(0, len(order), 10):
            rows = order[start : start + 10]
            writer.submit(rows, filled_columns(cached, rows))
    assert writer.chunks_written > 6
    assert entry.valid_mask().all()


def test_rows_of_an_unfinished_chunk_wait_for_flush(cached: CachedFeatureDataset) -> None:
    entry = cached.entry
    assert entry is not None
    writer = Writer(entry)
    complete, partial = np.arange(16, 32), np.arange(32, 40)
    writer.submit(complete, filled_columns(cached, complete))
    writer.submit(partial, filled_columns(cached, partial))
    deadline = time.monotonic() + 10
    while not entry.valid_mask()[16:32].all() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert entry.valid_mask()[16:32].all()  # the completed chunk went out on its own
    assert not entry.valid_mask()[32:40].any()
    writer.flush()
    assert entry.valid_mask()[32:40].all()
    writer.close()


def test_a_failed_write_is_raised_by_the_next_call_and_leaves_rows_invalid(
    cached: CachedFeatureDataset, store_path: Path
) -> None:
    entry = cached.entry
    assert entry is not None
    (store_path / entry.name / "features" / "c" / "1" / "0").mkdir(parents=True)  # chunk 1 cannot be written
    writer = Writer(entry)
    rows = np.arange(16, 32)
    writer.submit(rows, filled_columns(cached, rows))
    deadline = time.monotonic() + 10
    with pytest.raises(WriterError, match="failed") as raised:
        while time.monotonic() < deadline:
            writer.submit(np.arange(48, 50), filled_columns(cached, np.arange(48, 50)))
            time.sleep(0.01)
    assert isinstance(raised.value.__cause__, OSError)
    assert not entry.valid_mask()[16:32].any()
    with pytest.raises(WriterError):
        writer.flush()  # still reported: the error is never lost


def test_a_round_of_a_few_held_chunks_keeps_the_hold_that_writing_them_all_would_need(
    cached: CachedFeatureDataset,
) -> None:
    """A shuffled epoch's chunks come due a batch apart, so a round of writes of held chunks can
    write one of five. Its hold follows what writing all five would take: the other four wait,
    instead of coming due at once in rounds of their own (which made the map-style fill of a
    large entry write every chunk every few seconds)."""
    entry = cached.entry
    assert entry is not None
    written: list[int] = []

    def store_rows(rows: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        time.sleep(0.02)  # a chunk write of some cost
        written.append(int(rows[0]) // entry.chunk_rows)
        entry.write(rows, columns)

    buffer = ChunkBuffer(entry, store_rows, max_buffer_bytes=1 << 30, max_hold_seconds=0.5)
    first = np.arange(16, 20)  # chunk 1, the first to come due
    buffer.add(first, filled_columns(cached, first))
    time.sleep(0.3)
    later = np.concatenate([np.arange(16 * c, 16 * c + 4) for c in range(2, 6)])  # chunks 2 to 5
    buffer.add(later, filled_columns(cached, later))
    time.sleep(0.25)
    buffer.write_aged()
    assert written == [1]  # chunk 1 was due, the others not yet
    # At 0.02 s or more per chunk and 5 held, the hold is now at least 20 x 0.1 s = 2 s; from
    # the one chunk's write alone it would have stayed at the minimum, 0.5 s.
    time.sleep(0.5)
    buffer.write_aged()
    assert written == [1]  # chunks 2 to 5 still held, 0.75 s after they came
    until = buffer.until_aged()
    assert until is not None and until > 0.5
    buffer.write_all()
    assert sorted(written) == [1, 2, 3, 4, 5]
    assert entry.valid_mask()[later].all() and entry.valid_mask()[first].all()
