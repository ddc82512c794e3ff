"""The chunk-aware reader: same rows as plain zarr, on both routes, within its memory budget,
and never serving a row whose ``valid`` bit is not set now."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, Dataset, default_collate

from cachedfeatures import CachedFeatureDataset, FeatureStore
from cachedfeatures.format.specs import ArraySpec
from cachedfeatures.reader import chunk_reader
from cachedfeatures.reader import scratch as scratch_module
from cachedfeatures.reader import signatures as signature_module
from cachedfeatures.reader.chunk_reader import ChunkReader, default_chunk_cache_bytes
from cachedfeatures.reader.signatures import QUIET_NS, ValidSignatures
from tests.helpers import Backbone, Samples, features_of, reference, scratch_files_work

ROUTES = ("auto", "zarr")
COMPRESSORS = (None, "default")


@pytest.fixture(params=ROUTES)
def route(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(
    params=[(None, False), (600, False), (600, True)], ids=["whole-entry", "two-chunks", "two-chunks-spilled"]
)
def budget(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> int | None:
    """Cache budgets: the default holds the whole entry (one dense copy); 600 bytes hold
    one chunk of ``make_entry``'s (16 rows of 4 float32, an int64 label and valid: 400 bytes),
    in the chunk cache, or (spilled) with the entry held decoded in a scratch file where its
    chunks are compressed or read through zarr."""
    cache_bytes, spilled = request.param
    monkeypatch.setenv("CACHEDFEATURES_SPILL_DIR", str(spill_dir(tmp_path)) if spilled else "off")
    return cache_bytes  # type: ignore[no-any-return]


def spill_dir(tmp_path: Path) -> Path:
    """A directory for scratch files under ``tmp_path``; skips where none can be made there (a
    ``/tmp`` in memory, say: scratch files go only where they save memory)."""
    if not scratch_files_work(tmp_path):
        pytest.skip("scratch files need a local disk file system (Linux)")
    spill = tmp_path / "spill"
    spill.mkdir(exist_ok=True)
    return spill


def spills(route: str, compressor: Any) -> bool:
    """Whether a reader of ``make_entry`` past its budget holds it in a scratch file now."""
    spilling = os.environ.get("CACHEDFEATURES_SPILL_DIR", "off") != "off"
    return spilling and (compressor is not None or route == "zarr")


@pytest.fixture(params=COMPRESSORS, ids=["raw", "blosc"])
def compressor(request: pytest.FixtureRequest) -> Any:
    return request.param


def make_entry(
    store_path: Path,
    n: int = 100,
    chunk_rows: int = 16,
    compressor: Any = None,
    dtype: str = "<f4",
    checksum: bool = True,
) -> Any:
    """An entry of (n, 4) features and an int label, written by the library, rows all missing."""
    store = FeatureStore.open(store_path, mode="a")
    specs = [ArraySpec("features", "tensor", dtype, (4,), "float32"), ArraySpec("label", "int", "<i8", ())]
    return store.create_entry(
        "e",
        {"module": {}, "dataset": {}},
        specs,
        num_rows=n,
        chunk_rows=chunk_rows,
        compressor=compressor,
        checksum=checksum,
    )


def columns(rows: np.ndarray, dtype: str = "<f4") -> dict[str, np.ndarray]:
    rows = np.asarray(rows)
    features = (rows[:, None] * 10 + np.arange(4)).astype(dtype)
    return {"features": features, "label": rows.astype(np.int64) * 3}


def fill(entry: Any, rows: Any, dtype: str = "<f4") -> None:
    rows = np.asarray(rows)
    entry.write(rows, columns(rows, dtype))


# -- agreeing with plain zarr -------------------------------------------------------------------


@pytest.mark.parametrize("checksum", [True, False], ids=["crc32c", "no-checksum"])
def test_read_agrees_with_plain_zarr(
    store_path: Path, route: str, compressor: Any, budget: int | None, checksum: bool
) -> None:
    entry = make_entry(store_path, compressor=compressor, checksum=checksum)
    fill(entry, np.arange(0, 100, 3))
    reader = ChunkReader(entry, route=route, cache_bytes=budget)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    for _ in range(5):
        indices = rng.integers(0, 100, size=40)  # repeats included
        read = reader.read(indices)
        group = zarr.open_group(store_path, mode="r")["e"]
        valid = group["valid"][:][indices]
        np.testing.assert_array_equal(read.hit, valid)
        np.testing.assert_array_equal(read.arrays["features"], group["features"][:][indices[valid]])
        np.testing.assert_array_equal(read.arrays["label"], group["label"][:][indices[valid]])
    assert (reader.cache_info().spilled > 0) == (budget is not None and spills(route, compressor))


def test_a_flipped_bit_is_a_miss_with_a_checksum(store_path: Path, route: str, caplog: Any) -> None:
    entry = make_entry(store_path, compressor=None)  # raw chunks: only the checksum can tell
    fill(entry, np.arange(100))
    chunk = store_path / "e" / "features" / "c" / "1" / "0"
    damaged = bytearray(chunk.read_bytes())
    damaged[5] ^= 0x10
    chunk.write_bytes(bytes(damaged))
    read = ChunkReader(entry, route=route).read(np.arange(100))  # type: ignore[arg-type]
    assert not read.hit[16:32].any() and read.hit[:16].all() and read.hit[32:].all()
    assert sum("cannot be read" in r.getMessage() for r in caplog.records) == 1


def test_big_endian_and_float16_arrays_read_back(store_path: Path, route: str, compressor: Any) -> None:
    for dtype in (">f4", "<f2"):
        path = store_path.with_name(f"{dtype[1:]}.zarr")
        entry = make_entry(path, compressor=compressor, dtype=dtype)
        fill(entry, np.arange(100), dtype)
        read = ChunkReader(entry, route=route).read([5, 99, 0])  # type: ignore[arg-type]
        np.testing.assert_array_equal(
            read.arrays["features"], columns(np.array([5, 99, 0]), dtype)["features"]
        )
        assert read.arrays["features"].dtype.newbyteorder("=") == np.dtype(dtype).newbyteorder("=")


def test_empty_and_all_missing_reads(store_path: Path, route: str) -> None:
    reader = ChunkReader(make_entry(store_path), route=route)  # type: ignore[arg-type]
    assert len(reader.read([]).hit) == 0
    read = reader.read([1, 2, 50])
    assert not read.hit.any() and read.arrays == {}


def test_dataset_samples_match_reference_on_both_routes(
    store_path: Path, route: str, compressor: Any
) -> None:
    data, module = Samples(70, "dict"), Backbone()
    cached = CachedFeatureDataset(
        data,
        module,
        store_path,
        input_key="image",
        chunk_rows=8,
        compressor=compressor,
        read_route=route,  # type: ignore[arg-type]
    )
    cached.__getitems__(list(range(70)))  # fill
    loads, checked = data.loads, len(cached.spot_checked_rows)
    order = np.random.default_rng(1).permutation(70).tolist()
    samples = cached.__getitems__(order)
    assert data.loads == loads + len(cached.spot_checked_rows) - checked  # all hits; spot check aside
    for index, sample in zip(order, samples, strict=True):
        assert torch.equal(features_of(sample, "dict"), reference(module, data, index))
        assert sample["label"] == index % 7 and sample["name"] == f"sample-{index}"
        assert type(sample["label"]) is int


def test_memory_store_serves_hits_and_follows_valid() -> None:
    data, module = Samples(40, "tuple"), Backbone()
    cached = CachedFeatureDataset(data, module, None, chunk_rows=8)
    cached.__getitems__(list(range(40)))
    loads, checked = data.loads, len(cached.spot_checked_rows)
    assert all(
        torch.equal(s[0], reference(module, data, i))
        for i, s in enumerate(cached.__getitems__(list(range(40))))
    )
    assert data.loads == loads + len(cached.spot_checked_rows) - checked  # all hits; spot check aside
    assert cached.entry is not None
    cached.entry.valid[0:12] = False
    assert cached.entry.read(np.arange(16)).hit.tolist() == [False] * 12 + [True] * 4


# -- never handing out internal buffers ---------------------------------------------------------


def test_returned_rows_are_copies(store_path: Path, route: str, compressor: Any, budget: int | None) -> None:
    entry = make_entry(store_path, compressor=compressor)
    fill(entry, np.arange(100))
    reader = ChunkReader(entry, route=route, cache_bytes=budget)  # type: ignore[arg-type]
    first = reader.read([3, 4, 40])
    first.arrays["features"][:] = -1  # a caller scribbling on what it got
    assert first.arrays["features"].flags.writeable
    again = reader.read([3, 4, 40])
    np.testing.assert_array_equal(again.arrays["features"], columns(np.array([3, 4, 40]))["features"])
    assert not np.shares_memory(first.arrays["features"], again.arrays["features"])


def test_dataset_tensors_survive_in_place_edits(store_path: Path, route: str) -> None:
    data, module = Samples(40, "tuple"), Backbone()
    cached = CachedFeatureDataset(data, module, store_path, chunk_rows=8, read_route=route)  # type: ignore[arg-type]
    cached[5]
    cached[5][0].mul_(0)
    assert torch.equal(cached[5][0], reference(module, data, 5))


# -- validity: cached chunks follow the store ---------------------------------------------------


@pytest.fixture(params=[False, True], ids=["just-written", "quiet"])
def quiet(request: pytest.FixtureRequest) -> bool:
    """Whether the store has been left alone long enough that its ``valid`` directory vouches
    for its chunk files (one stat per batch instead of one per chunk; see signatures.py)."""
    return bool(request.param)


def settle(quiet: bool) -> None:
    if quiet:
        time.sleep(QUIET_NS / 1e9 + 0.05)


def test_cleared_valid_bits_are_misses_even_when_chunk_is_cached(
    store_path: Path, route: str, compressor: Any, budget: int | None, quiet: bool
) -> None:
    entry = make_entry(store_path, compressor=compressor)
    fill(entry, np.arange(100))
    settle(quiet)
    reader = ChunkReader(entry, route=route, cache_bytes=budget)  # type: ignore[arg-type]
    assert reader.read(np.arange(32)).hit.all()  # chunks 0 and 1 now cached
    # Another process's pruner: clear valid first (through its own zarr handle).
    other = zarr.open_group(store_path, mode="a")["e"]
    other["valid"][4:20] = False
    read = reader.read(np.arange(32))
    np.testing.assert_array_equal(read.hit, ~((np.arange(32) >= 4) & (np.arange(32) < 20)))
    other["valid"][0:16] = False  # a whole chunk gone: its valid chunk file is deleted
    assert not reader.read(np.arange(16)).hit.any()


def test_rows_rewritten_by_another_writer_are_read_again(
    store_path: Path, route: str, compressor: Any, budget: int | None, quiet: bool
) -> None:
    entry = make_entry(store_path, compressor=compressor)
    fill(entry, np.arange(50))
    settle(quiet)
    reader = ChunkReader(entry, route=route, cache_bytes=budget)  # type: ignore[arg-type]
    assert not reader.read([60]).hit.any()
    reader.read(np.arange(16))
    assert reader.read(np.arange(16)).hit.all()
    # Another writer prunes chunk 0 and refills it with new values, then fills row 60.
    other = FeatureStore.open(store_path, mode="a").entry("e")
    assert other is not None
    other.valid[0:16] = False
    other.write(np.arange(16), {"features": np.full((16, 4), 7.0, "f4"), "label": np.zeros(16, np.int64)})
    fill(other, [60])
    read = reader.read([1, 60])
    assert read.hit.all()
    np.testing.assert_array_equal(read.arrays["features"][0], np.full(4, 7.0, "f4"))
    np.testing.assert_array_equal(read.arrays["label"], [0, 180])


@pytest.mark.parametrize(
    ("cache_bytes", "rows"),
    [(None, np.arange(0, 100, 7)), (1000, np.arange(32))],
    ids=["whole-entry", "two-chunks-cached"],
)
def test_a_quiet_store_costs_one_stat_per_batch(
    store_path: Path, route: str, cache_bytes: int | None, rows: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = make_entry(store_path)
    fill(entry, np.arange(100))
    settle(True)
    reader = ChunkReader(entry, route=route, cache_bytes=cache_bytes)  # type: ignore[arg-type]
    every_chunk = rows
    reader.read(every_chunk)  # the first look at each chunk
    looked_at: list[str] = []
    real_stat = os.stat

    def counting_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        looked_at.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    read = reader.read(every_chunk[::-1])
    monkeypatch.undo()
    assert read.hit.all()
    valid_dir = str(store_path / "e" / "valid" / "c")
    assert [path for path in looked_at if path.startswith(valid_dir)] == [valid_dir]


def test_a_change_within_the_timestamp_resolution_is_not_trusted(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory vouches for its files only once its times are older than the margin:
    a second write in the same clock tick would leave them as they were."""
    entry = make_entry(store_path)
    fill(entry, np.arange(100))
    valid_dir = store_path / "e" / "valid" / "c"
    st = os.stat(valid_dir)
    newest = max(st.st_mtime_ns, st.st_ctime_ns)
    signatures = ValidSignatures(entry.valid, entry.chunk_rows, entry.backend.root)
    clock = {"now": newest + QUIET_NS // 2}
    monkeypatch.setattr(signature_module.time, "time_ns", lambda: clock["now"])
    first = signatures.look()
    assert signatures.look() != first  # too recent: every look is a new generation
    clock["now"] = newest + 2 * QUIET_NS
    quiet = signatures.look()
    assert signatures.look() == quiet  # quiet and unchanged: one generation
    fill(entry, [3])  # the directory changes...
    clock["now"] = max(os.stat(valid_dir).st_mtime_ns, os.stat(valid_dir).st_ctime_ns) + 2 * QUIET_NS
    assert signatures.look() != quiet  # ...and a new generation starts


def test_garbled_chunk_is_a_miss_logged_once(
    store_path: Path, compressor: Any, caplog: pytest.LogCaptureFixture, budget: int | None
) -> None:
    entry = make_entry(store_path, compressor=compressor)
    fill(entry, np.arange(100))
    chunk = store_path / "e" / "features" / "c" / "1" / "0"
    chunk.write_bytes(b"not a chunk")
    reader = ChunkReader(entry, cache_bytes=budget)
    with caplog.at_level(logging.WARNING, logger="cachedfeatures.reader.chunk_reader"):
        for _ in range(3):
            read = reader.read(np.arange(10, 40))
            np.testing.assert_array_equal(read.hit, (np.arange(10, 40) < 16) | (np.arange(10, 40) >= 32))
    assert len([r for r in caplog.records if "chunk 1" in r.getMessage()]) == 1


# -- the memory budget --------------------------------------------------------------------------


def test_decoded_chunk_cache_respects_budget(store_path: Path, route: str) -> None:
    entry = make_entry(store_path, n=400, chunk_rows=16, compressor="default")
    fill(entry, np.arange(400))
    chunk_bytes = 16 * 4 * 4 + 16 * 8 + 16  # features + labels + valid mask
    budget = int(3.5 * chunk_bytes)
    # No scratch file: the chunk cache's own budget (a scratch file holds the entry decoded instead).
    reader = ChunkReader(entry, cache_bytes=budget, route=route, spill_dir=None)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    for _ in range(30):
        assert reader.read(rng.integers(0, 400, size=50)).hit.all()
        info = reader.cache_info()
        assert info.nbytes <= budget and info.max_bytes == budget
    assert reader.cache_info().chunks == 3
    reader.clear()
    reader.read(np.arange(16))
    reader.read(np.arange(16))
    assert reader.cache_info().hits >= 1


def test_cache_info_counts_chunks_pushed_out(store_path: Path, route: str) -> None:
    entry = make_entry(store_path, n=400, chunk_rows=16, compressor="default")
    fill(entry, np.arange(400))
    chunk_bytes = 16 * 4 * 4 + 16 * 8 + 16  # features + labels + valid mask
    reader = ChunkReader(entry, cache_bytes=int(2.5 * chunk_bytes), route=route, spill_dir=None)  # type: ignore[arg-type]
    for chunk in range(5):  # five chunks in turn through room for two: three pushed out (LRU)
        assert reader.read(np.arange(chunk * 16, chunk * 16 + 4)).hit.all()
    info = reader.cache_info()
    assert (info.chunks, info.misses, info.evictions) == (2, 5, 3)
    assert reader.read([4 * 16]).hit.all() and reader.cache_info().hits == 1


def test_zero_budget_caches_nothing_and_still_reads(store_path: Path, route: str, compressor: Any) -> None:
    entry = make_entry(store_path, compressor=compressor)
    fill(entry, np.arange(100))
    reader = ChunkReader(entry, cache_bytes=0, route=route)  # type: ignore[arg-type]
    for _ in range(2):
        read = reader.read(np.arange(100))
        assert read.hit.all()
        np.testing.assert_array_equal(read.arrays["label"], np.arange(100) * 3)
    assert reader.cache_info().chunks == 0 and reader.cache_info().nbytes == 0


def test_process_memory_stays_within_budget(store_path: Path) -> None:
    """What numpy allocates while reading, measured by tracemalloc, is the budget plus one batch."""
    n, width = 4096, 256
    store = FeatureStore.open(store_path, mode="a")
    spec = ArraySpec("features", "tensor", "<f4", (width,), "float32")
    entry = store.create_entry("big", {}, [spec], num_rows=n, chunk_rows=256, compressor="default")
    entry.write(np.arange(n), {"features": np.ones((n, width), "f4")})
    chunk_bytes = 256 * width * 4
    budget = 3 * chunk_bytes + 4096
    reader = ChunkReader(entry, cache_bytes=budget)
    rng = np.random.default_rng(0)
    batch_bytes = 64 * width * 4
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            reader.read(rng.integers(0, n, size=64))
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.cache_info().nbytes <= budget
    # held between reads: the cache; at peak also one chunk being decoded and one batch
    assert current - base <= budget + 2 * chunk_bytes
    assert peak - base <= budget + 4 * chunk_bytes + 2 * batch_bytes


@pytest.mark.parametrize("checksum", [True, False], ids=["crc32c", "no-checksum"])
def test_raw_local_chunks_are_mapped_within_the_map_limit(
    store_path: Path, checksum: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This entry's chunks are small, which the cache reads into memory: held open here.
    monkeypatch.setattr(chunk_reader, "MIN_MAPPED_CHUNK_BYTES", 0)
    entry = make_entry(store_path, compressor=None, checksum=checksum)
    fill(entry, np.arange(100))
    reader = ChunkReader(entry, max_maps=4, cache_bytes=2000)  # two arrays a chunk: two chunks
    for _ in range(3):
        assert reader.read(np.arange(100)).hit.all()
        assert reader.cache_info().maps <= 4
    assert reader.cache_info().maps == 4


def test_budget_argument_is_validated(store_path: Path) -> None:
    entry = make_entry(store_path)
    with pytest.raises(ValueError, match="chunk_cache_bytes"):
        ChunkReader(entry, cache_bytes=-1)
    with pytest.raises(ValueError, match="read_route"):
        ChunkReader(entry, route="mmap")  # type: ignore[arg-type]


class _DefaultBudget(Dataset[int]):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return default_chunk_cache_bytes()


def test_default_budget_is_split_between_workers() -> None:
    alone = default_chunk_cache_bytes()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert alone == int(total * 0.125)
    seen = [int(b) for b in DataLoader(_DefaultBudget(), batch_size=None, num_workers=2)]
    assert seen == [alone // 2, alone // 2]


class _ReaderInfo(Dataset[Any]):
    """Reads a row of ``cached`` and reports the reader's cache as the worker sees it."""

    def __init__(self, cached: CachedFeatureDataset) -> None:
        self.cached = cached

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[int, int, int]:
        self.cached[index]
        assert self.cached.entry is not None
        info = self.cached.entry.reader.cache_info()
        return info.max_bytes, info.chunks, info.misses


def test_forked_workers_start_with_their_own_cache_and_budget(store_path: Path) -> None:
    cached = CachedFeatureDataset(Samples(32), Backbone(), store_path, chunk_rows=8)
    cached.__getitems__(list(range(32)))
    assert cached.entry is not None
    cached.entry.read(np.arange(32))  # the parent holds every chunk before forking
    parent = cached.entry.reader.cache_info()
    assert parent.chunks == 4
    loader = DataLoader(_ReaderInfo(cached), batch_size=None, num_workers=2, multiprocessing_context="fork")
    for max_bytes, chunks, misses in loader:
        assert max_bytes == default_chunk_cache_bytes() // 2
        assert chunks == 1 and misses == 1  # read afresh, not inherited
    assert cached.entry.reader.cache_info() == parent


# -- scratch files: a compressed entry past the budget, held decoded on local disk ----------------


def _scratch_maps(directory: Path) -> list[str]:
    """This process's mappings of files in ``directory`` (a scratch file has no name left there)."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return [line for line in maps if f" {directory}/" in line]


def test_a_compressed_entry_past_the_budget_is_decoded_once_into_a_scratch_file(
    store_path: Path, tmp_path: Path
) -> None:
    """Shuffled epochs past a cache of two chunks decode each chunk once, into an unlinked file of
    the spill directory, and serve every row right; the file goes with the reader."""
    n, chunk_rows = 400, 16
    entry = make_entry(store_path, n=n, chunk_rows=chunk_rows, compressor="default")
    fill(entry, np.arange(n))
    spill = spill_dir(tmp_path)
    reader = ChunkReader(entry, cache_bytes=600, spill_dir=spill)
    rng = np.random.default_rng(0)
    for _ in range(2):
        order = rng.permutation(n)
        for start in range(0, n, 50):
            rows = order[start : start + 50]
            read = reader.read(rows)
            assert read.hit.all()
            for name, column in columns(rows).items():
                np.testing.assert_array_equal(read.arrays[name], column)
    info = reader.cache_info()
    assert info.misses == n // chunk_rows  # each chunk decoded once in two epochs
    assert (info.nbytes, info.spilled) == (n, n * (4 * 4 + 8))  # in memory only the valid mask
    assert os.listdir(spill) == []  # no name: nothing outlives the process, a SIGKILL included
    assert any("(deleted)" in line for line in _scratch_maps(spill))
    del reader, read
    gc.collect()
    assert _scratch_maps(spill) == []


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a tmpfs at /dev/shm")
def test_no_scratch_file_on_a_file_system_in_memory_or_without_room(
    store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A scratch file in memory (tmpfs) saves no memory, and one taking more than half the free
    space could starve the disk: both fall back to the chunk cache, within its budget, and say why."""
    entry = make_entry(store_path, n=400, chunk_rows=16, compressor="default")
    fill(entry, np.arange(400))
    free = spill_dir(tmp_path)
    monkeypatch.setattr(
        scratch_module.shutil,
        "disk_usage",
        lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 10**4, 10**4),
    )
    for directory, why in [("/dev/shm", "tmpfs file system"), (str(free), "more than half")]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="cachedfeatures.reader.scratch"):
            reader = ChunkReader(entry, cache_bytes=600, spill_dir=directory)
            rows = np.random.default_rng(0).permutation(400)[:100]
            read = reader.read(rows)
        assert read.hit.all()
        np.testing.assert_array_equal(read.arrays["features"], columns(rows)["features"])
        info = reader.cache_info()
        assert info.spilled == 0 and info.nbytes <= 600
        assert why in caplog.text


def test_workers_hold_a_compressed_entry_in_scratch_files_of_their_own(
    store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each DataLoader worker makes its own scratch file (``CACHEDFEATURES_SPILL_DIR``) and
    serves the cached features, never loading a raw sample."""
    spill = spill_dir(tmp_path)
    monkeypatch.setenv("CACHEDFEATURES_SPILL_DIR", str(spill))
    data, module = Samples(256), Backbone()
    options: dict[str, Any] = {"chunk_rows": 16, "compressor": "default", "spot_check": 0}
    CachedFeatureDataset(data, module, store_path, **options).__getitems__(list(range(256)))
    cached = CachedFeatureDataset(data, module, store_path, chunk_cache_bytes=2000, **options)
    parent = _SpillInfo(cached)
    _, _, before, _, parent_files = parent[0]  # the parent holds a scratch file when workers fork
    assert before.spilled > 0 and len(parent_files) == 1
    loads = data.loads  # what each worker starts from
    loader = DataLoader(parent, batch_size=None, num_workers=2, multiprocessing_context="fork")
    seen, files = [], set()
    for rows, (features, labels), info, worker_loads, worker_files in loader:
        assert worker_loads == loads and info.spilled > 0
        assert len(worker_files) == 1 and worker_files != parent_files  # its own, not the parent's
        files |= worker_files
        for index, row, label in zip(rows.tolist(), features, labels.tolist(), strict=True):
            assert torch.equal(row, reference(module, data, index)) and label == index % 7
            seen.append(index)
    assert sorted(seen) == list(range(256)) and len(files) == 2
    rows, (features, _), _, _, after = parent[1]  # the parent's own copy is untouched by them
    assert after == parent_files
    for index, row in zip(rows.tolist(), features, strict=True):
        assert torch.equal(row, reference(module, data, index))
    assert os.listdir(spill) == []


class _SpillInfo(Dataset[Any]):
    """Batches of 32 shuffled rows of ``cached``: the rows, the batch, and of the process reading
    it the reader's cache info, the raw samples loaded and the scratch files mapped (by inode)."""

    def __init__(self, cached: CachedFeatureDataset) -> None:
        self.cached = cached
        self.order = np.random.default_rng(0).permutation(len(cached)).reshape(-1, 32)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, batch: int) -> Any:
        rows = self.order[batch].tolist()
        got = default_collate(self.cached.__getitems__(rows))
        assert self.cached.entry is not None
        info = self.cached.entry.reader.cache_info()
        spill = os.environ["CACHEDFEATURES_SPILL_DIR"]
        inodes = {line.split()[4] for line in _scratch_maps(Path(spill))}
        return torch.tensor(rows), got, info, self.cached.dataset.loads, inodes


# -- workers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)], ids=["fork", "spawn"]
)
def test_workers_read_through_their_own_reader(store_path: Path, route: str, context: str) -> None:
    data, module = Samples(64, "dict"), Backbone()
    cached = CachedFeatureDataset(data, module, store_path, input_key="image", chunk_rows=8, read_route=route)  # type: ignore[arg-type]
    cached.__getitems__(list(range(64)))
    assert cached.entry is not None
    cached.entry.read(np.arange(64))  # the parent's cache is full; workers must not need it
    loads = data.loads
    loader = DataLoader(cached, batch_size=16, shuffle=True, num_workers=2, multiprocessing_context=context)
    seen = []
    for batch in loader:
        for row, name in zip(batch["image"], batch["name"], strict=True):
            index = int(name.removeprefix("sample-"))
            assert torch.equal(row, reference(module, data, index))
            seen.append(index)
    assert sorted(seen) == list(range(64))
    assert data.loads == loads


def test_sharded_arrays_fall_back_to_zarr_reads(store_path: Path) -> None:
    entry = make_entry(store_path, n=100, chunk_rows=16)
    group = zarr.open_group(store_path, mode="a")["e"]
    group.create_array(  # the same array, with 4 chunks per shard file
        "features",
        shape=(100, 4),
        chunks=(16, 4),
        shards=(64, 4),
        dtype="<f4",
        fill_value=np.nan,
        overwrite=True,
    )
    entry = FeatureStore.open(store_path, mode="a").entry("e")
    assert entry is not None
    # Written by the library (rows written with plain zarr are not bound to their chunks'
    # checksums, so they are not served), into the array plain zarr created.
    fill(entry, np.arange(100))
    assert len(list((store_path / "e" / "features" / "c").iterdir())) == 2  # two shard files
    read = ChunkReader(entry).read([99, 0, 63, 64])
    assert read.hit.all()
    np.testing.assert_array_equal(read.arrays["features"], columns(np.array([99, 0, 63, 64]))["features"])


def test_a_private_copy_never_pushes_out_a_chunk_this_batch_just_read(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A raw chunk found again is copied into private memory only where that drops nothing a
    recent batch read: chunks put by this very batch count (they were dropped, and read again)."""
    monkeypatch.setattr(chunk_reader, "MIN_MAPPED_CHUNK_BYTES", 0)  # small chunks held open, too
    entry = make_entry(store_path)
    fill(entry, np.arange(100))
    # 400 bytes: the open chunks' valid masks plus not quite one private copy (384 bytes).
    reader = ChunkReader(entry, cache_bytes=400)
    reader.read([20])  # chunk 1, held open
    read = reader.read([5, 20])  # chunk 0 put; chunk 1 found again: a copy would need chunk 0's room
    np.testing.assert_array_equal(read.arrays["label"], [15, 60])
    misses = reader.cache_info().misses
    again = reader.read([5])
    assert reader.cache_info().misses == misses  # chunk 0 is still held: no read again
    np.testing.assert_array_equal(again.arrays["features"], columns(np.array([5]))["features"])


# -- chunks loaded side by side -------------------------------------------------------------------


@pytest.fixture
def load_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four cores, as the reader sees them (whatever this machine has), and no threads made yet."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(chunk_reader, "_THREADS", None)


def _decoded_in(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record (thread name, chunk) of every compressed feature chunk decoded into the dense copy."""
    seen: list[tuple[str, int]] = []
    real = chunk_reader._ChunkFile.decode_into

    def recording(self: Any, chunk: int, target: np.ndarray, identity: Any) -> bool:
        done = real(self, chunk, target, identity)
        if self.array.path.endswith("features"):
            seen.append((threading.current_thread().name, chunk))
        return done

    monkeypatch.setattr(chunk_reader._ChunkFile, "decode_into", recording)
    return seen


@pytest.mark.usefixtures("load_threads")
@pytest.mark.parametrize("blosc", [False, True], ids=["zstd", "blosc"])
def test_compressed_chunks_of_a_batch_are_decoded_side_by_side(
    store_path: Path, monkeypatch: pytest.MonkeyPatch, blosc: bool
) -> None:
    """A new process's first shuffled batch needs every chunk: with more than one core, the
    compressed ones are decoded in the reader's threads, into the same rows as one by one."""
    entry = make_entry(store_path, n=128, compressor="default" if blosc else zarr.codecs.ZstdCodec())
    fill(entry, np.arange(128))
    seen = _decoded_in(monkeypatch)
    rows = np.random.default_rng(0).permutation(128)
    read = ChunkReader(entry).read(rows)
    assert read.hit.all()
    expected = columns(rows)
    for name, column in expected.items():
        np.testing.assert_array_equal(read.arrays[name], column)
    assert sorted(chunk for _, chunk in seen) == list(range(8))
    assert {name for name, _ in seen} <= {f"cachedfeatures-read_{k}" for k in range(4)}, seen


@pytest.mark.usefixtures("load_threads")
def test_a_chunk_rewritten_while_a_thread_reads_it_is_not_served(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer rewrites chunk 1 once a reader thread has read all its old bytes into place:
    its ``valid`` signature changed meanwhile, so those bytes are never served; the next batch
    reads the new ones."""
    entry = make_entry(store_path, n=64, compressor=zarr.codecs.ZstdCodec())
    fill(entry, np.arange(64))
    other = FeatureStore.open(store_path, mode="a").entry("e")
    assert other is not None
    new = {"features": np.full((16, 4), 7.0, "f4"), "label": np.zeros(16, np.int64)}
    rewritten: list[str] = []
    real = ChunkReader._fill

    def fill_then_rewrite(self: ChunkReader, dense: Any, chunk: int, start: int, stop: int) -> Any:
        filled = real(self, dense, chunk, start, stop)
        if chunk == 1 and not rewritten:
            rewritten.append(threading.current_thread().name)
            other.valid[16:32] = False  # pruned and refilled by another writer
            other.write(np.arange(16, 32), new)
        return filled

    monkeypatch.setattr(ChunkReader, "_fill", fill_then_rewrite)
    reader = ChunkReader(entry)
    rows = np.arange(64)
    read = reader.read(rows)
    assert len(rewritten) == 1 and rewritten[0].startswith("cachedfeatures-read"), rewritten
    np.testing.assert_array_equal(read.hit, (rows < 16) | (rows >= 32))  # chunk 1: read again later
    for name, column in columns(rows[read.hit]).items():
        np.testing.assert_array_equal(read.arrays[name], column)
    again = reader.read(np.arange(16, 32))
    assert again.hit.all()
    for name, column in new.items():
        np.testing.assert_array_equal(again.arrays[name], column)


class _Rows(Dataset[Any]):
    """Rows of an entry read through one reader (a batch per index list)."""

    def __init__(self, reader: ChunkReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return 64

    def __getitems__(self, indices: list[int]) -> list[Any]:
        read = self.reader.read(np.asarray(indices))
        assert read.all_hit
        threads = chunk_reader._THREADS
        own = threads is not None and threads.pid == os.getpid()  # made in this worker
        return [(int(i), read.arrays["features"][k], own) for k, i in enumerate(indices)]


@pytest.mark.usefixtures("load_threads")
def test_forked_workers_make_their_own_load_threads(store_path: Path) -> None:
    """The parent's reader threads are not in a forked DataLoader worker: each makes its own
    (with the parent's, a worker's first batch would wait for threads that are not there)."""
    entry = make_entry(store_path, n=64, compressor=zarr.codecs.ZstdCodec())
    fill(entry, np.arange(64))
    reader = ChunkReader(entry)
    assert reader.read(np.arange(64)).all_hit
    threads = chunk_reader._THREADS
    assert threads is not None and threads.pid == os.getpid()
    loader = DataLoader(
        _Rows(reader),
        batch_size=32,
        shuffle=True,
        num_workers=2,
        multiprocessing_context="fork",
        collate_fn=lambda batch: batch,
        timeout=60,
    )
    seen = {}
    for batch in loader:
        for index, row, own in batch:
            assert own  # the worker's batches were read with threads of its own
            seen[index] = row
    assert sorted(seen) == list(range(64))
    np.testing.assert_array_equal(np.stack([seen[i] for i in range(64)]), columns(np.arange(64))["features"])


def test_small_raw_chunks_are_read_into_the_cache_and_large_ones_held_open(store_path: Path) -> None:
    """A shuffled read past the cache reads a held-open chunk row by row: worth it for rows of
    features, not for a label chunk of a few kB (a ``pread`` per row of 8 bytes)."""
    n, width = 2048, 128  # chunks of 256 rows: 128 kB of features, 2 kB of labels
    store = FeatureStore.open(store_path, mode="a")
    specs = [
        ArraySpec("features", "tensor", "<f4", (width,), "float32"),
        ArraySpec("label", "int", "<i8", (), "int64"),
    ]
    entry = store.create_entry("mixed", {}, specs, num_rows=n, chunk_rows=256, compressor=None)
    rows = np.arange(n)
    features = np.random.default_rng(0).standard_normal((n, width), dtype=np.float32)
    entry.write(rows, {"features": features, "label": rows * 3})
    reader = ChunkReader(entry, cache_bytes=n * width * 4 // 10)  # a tenth: never held whole
    order = np.random.default_rng(1).permutation(n)
    for start in range(0, n, 256):
        batch = order[start : start + 256]
        read = reader.read(batch)
        assert read.hit.all()
        np.testing.assert_array_equal(read.arrays["features"], features[batch])
        np.testing.assert_array_equal(read.arrays["label"], batch * 3)
    info = reader.cache_info()
    assert info.maps == 8  # each chunk's features held open
    assert info.nbytes >= 8 * 256 * 8  # and its labels in memory
