"""Size budget and MRU pruning: simulation over repeated passes, races, errors, access stats."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cachedfeatures import BudgetError, CachedFeatureDataset, FeatureStore
from cachedfeatures.pruning import drop_chunk, measure, parse_policy, plan
from cachedfeatures.store.access import read_access
from cachedfeatures.units import format_bytes, parse_bytes
from tests.helpers import Samples, Tile

ROWS, CHUNK_ROWS, BATCH = 256, 8, 32


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
        computed_before = module.rows_computed - len(cached.spot_checked_rows)
        for start in range(0, ROWS, BATCH):
            batch = order[start : start + BATCH].tolist()
            samples = cached.__getitems__(batch)
            np.testing.assert_array_equal(np.stack([s.numpy() for s in samples]), expected[batch])
            peak = max(peak, measure(store).total)
        # rows the module saw for misses: the spot checks' rows (hits recomputed) left out
        misses = module.rows_computed - len(cached.spot_checked_rows) - computed_before
        hits.append(1 - misses / ROWS)
    print(
        f"{policy}: hits per pass {[round(h, 3) for h in hits]}; peak {peak} B for a budget of {max_bytes} B"
    )
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


# -- configuration errors -------------------------------------------------------------------------


def test_max_bytes_smaller_than_one_chunk_is_a_clear_error(store_path: Path) -> None:
    with pytest.raises(
        BudgetError, match=r"smaller than one chunk.*Raise max_bytes or pass a smaller chunk_rows"
    ):
        CachedFeatureDataset(
            Samples(64, "tensor"), Tile(), store_path, chunk_rows=CHUNK_ROWS, max_bytes="4kB"
        )
    assert issubclass(BudgetError, ValueError)


def test_unknown_policy_lists_the_valid_ones(store_path: Path) -> None:
    with pytest.raises(ValueError, match=r"one of 'mru', 'lru'\. Got 'fifo'"):
        CachedFeatureDataset(Samples(8, "tensor"), Tile(), store_path, policy="fifo")  # type: ignore[arg-type]
    assert parse_policy("lru") == "lru"


def test_max_bytes_accepts_strings_and_floats(store_path: Path) -> None:
    cached = CachedFeatureDataset(Samples(16, "tensor"), Tile(), store_path, max_bytes="1.5 MiB")
    assert cached.max_bytes == 1572864
    again = CachedFeatureDataset(Samples(16, "tensor"), Tile(), store_path, max_bytes=10e9)
    assert again.max_bytes == 10_000_000_000
    with pytest.raises(ValueError, match="max_bytes"):
        CachedFeatureDataset(Samples(16, "tensor"), Tile(), store_path, max_bytes="ten gigs")


# -- what goes first ------------------------------------------------------------------------------


def fill(store_path: Path, offset: float, rows: int = 64) -> CachedFeatureDataset:
    """A fully cached entry whose dataset differs by ``offset`` (so its fingerprint differs)."""
    cached = CachedFeatureDataset(
        Samples(rows, "tensor", offset=offset), Tile(), store_path, chunk_rows=CHUNK_ROWS
    )
    cached.__getitems__(list(range(rows)))
    cached.flush_access()
    return cached


def test_other_entries_go_first_least_recently_used_first(store_path: Path) -> None:
    old, recent = fill(store_path, 1.0), fill(store_path, 2.0)
    old.__getitems__([0])  # still older than everything `recent` did...
    recent.__getitems__(list(range(64)))  # ...which is read again after it
    old.flush_access()
    recent.flush_access()
    in_use = fill(store_path, 3.0)
    store = FeatureStore.open(store_path)
    usage = measure(store)
    per_chunk = max(usage.chunks[in_use.entry_name].values())
    # Enough to need every chunk of `old` and a few of `recent`, none of the entry in use.
    target = usage.total - usage.entries[old.entry_name] - 3 * per_chunk
    chosen = plan(store.entries, usage, target, "mru", in_use=in_use.entry_name)
    names = [item.entry for item in chosen]
    n_old = len(usage.chunks[old.entry_name])
    assert names[:n_old] == [old.entry_name] * n_old
    assert set(names[n_old:]) == {recent.entry_name}
    assert in_use.entry_name not in names


def test_mru_drops_the_most_recently_used_chunk_of_the_entry_in_use(store_path: Path) -> None:
    cached = fill(store_path, 0.0)
    for chunk in [5, 2, 7]:  # 7 read last
        cached.__getitems__([chunk * CHUNK_ROWS])
    cached.flush_access()
    store = FeatureStore.open(store_path)
    usage = measure(store)
    entry = cached.entry_name
    mru = plan(store.entries, usage, usage.total - 1, "mru", in_use=entry)
    lru_target = usage.total - sum(sorted(usage.chunks[entry].values())[-3:]) - 1
    lru = plan(store.entries, usage, lru_target, "lru", in_use=entry)
    assert [item.chunk for item in mru] == [7]
    assert 7 not in [item.chunk for item in lru] and 2 not in [item.chunk for item in lru]


# -- dropping: misses, never wrong data -----------------------------------------------------------


def expected_features(rows: int, offset: float = 0.0) -> np.ndarray:
    images = torch.stack([Samples(rows, "tensor", offset=offset).image(i) for i in range(rows)])
    return Tile()(images).numpy()


def test_dropped_chunk_rows_are_misses_then_recomputed(store_path: Path) -> None:
    cached = fill(store_path, 0.0)
    entry = cached.entry
    assert entry is not None
    drop_chunk(entry, 2)
    mask = entry.valid_mask()
    assert not mask[2 * CHUNK_ROWS : 3 * CHUNK_ROWS].any() and mask.sum() == 64 - CHUNK_ROWS
    assert "features" not in [p.name for p in (store_path / cached.entry_name / "features" / "c").glob("2")]
    module = cached.module
    assert isinstance(module, Tile)
    before, checked = module.rows_computed, len(cached.spot_checked_rows)
    samples = cached.__getitems__(list(range(64)))
    spot = len(cached.spot_checked_rows) - checked
    # the dropped chunk's rows, and those a spot check recomputed (hits, compared, not stored)
    assert module.rows_computed - before == CHUNK_ROWS + spot
    np.testing.assert_array_equal(np.stack([s.numpy() for s in samples]), expected_features(64))


def test_valid_row_whose_chunk_file_is_missing_is_recomputed(
    store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cached = fill(store_path, 0.0)
    module = cached.module
    assert isinstance(module, Tile)
    (store_path / cached.entry_name / "features" / "c" / "3" / "0").unlink()  # damage, valid bits intact
    before = module.rows_computed
    with caplog.at_level(logging.WARNING, logger="cachedfeatures"):
        samples = cached.__getitems__(list(range(3 * CHUNK_ROWS, 3 * CHUNK_ROWS + 4)))
    np.testing.assert_array_equal(
        np.stack([s.numpy() for s in samples]), expected_features(64)[3 * CHUNK_ROWS : 3 * CHUNK_ROWS + 4]
    )
    assert module.rows_computed - before == 4
    assert "bytes are missing" in caplog.text
    # The rest of the chunk is a miss now too (not fill values), and computed correctly.
    rest = list(range(3 * CHUNK_ROWS + 4, 4 * CHUNK_ROWS))
    assert not cached.entry.valid_mask()[rest].any()  # type: ignore[union-attr]
    samples = cached.__getitems__(rest)
    np.testing.assert_array_equal(np.stack([s.numpy() for s in samples]), expected_features(64)[rest])


PRUNER = """
import sys, time
import numpy as np
from cachedfeatures import FeatureStore
from cachedfeatures.pruning import drop_chunk
store = FeatureStore.open(sys.argv[1], mode="a")
(entry,) = store.entries
rng = np.random.default_rng(1)
end, drops = time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < end:
    drop_chunk(entry, int(rng.integers(entry.num_chunks)))
    drops += 1
    time.sleep(0.002)
print(drops)
"""


@pytest.mark.slow
def test_reader_racing_a_pruner_gets_correct_features_or_a_miss(store_path: Path) -> None:
    import subprocess
    import sys

    cached = fill(store_path, 0.0)
    module = cached.module
    assert isinstance(module, Tile)
    expected = expected_features(64)
    pruner = subprocess.Popen(
        [sys.executable, "-c", PRUNER, str(store_path), "3"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    rng = np.random.default_rng(0)
    reads = misses = 0
    entry = cached.entry
    assert entry is not None
    try:
        while pruner.poll() is None:
            batch = rng.integers(0, 64, size=16)
            # The store's own contract: a hit read while a chunk is dropped is right.
            read = entry.read(batch)
            if read.hit.any():
                np.testing.assert_array_equal(read.arrays["features"], expected[batch[read.hit]])
            misses += int((~read.hit).sum())
            if not read.hit.all():
                cached.compute(np.unique(batch[~read.hit]))  # refill, as training would
            # And through the dataset, which recomputes misses itself.
            samples = cached.__getitems__(batch.tolist())
            np.testing.assert_array_equal(np.stack([s.numpy() for s in samples]), expected[batch])
            reads += 1
    finally:
        out, _ = pruner.communicate(timeout=60)
    assert pruner.returncode == 0
    assert int(out) > 50 and reads > 20
    assert misses > 0  # the pruner did turn rows into misses under the reader


# -- accounting --------------------------------------------------------------------------------


def test_partial_temp_files_are_not_counted_and_stale_ones_are_removed(store_path: Path) -> None:
    from cachedfeatures.pruning import remove_orphans

    fill(store_path, 0.0)
    store = FeatureStore.open(store_path, mode="a")
    before = measure(store)
    orphan = store_path / next(iter(before.chunks)) / "features" / "c" / "0" / "0.deadbeef.partial"
    orphan.write_bytes(b"x" * 1_000_000)
    after = measure(store)
    assert after.total == before.total and len(after.orphans) == 1
    assert remove_orphans(store) == []  # fresh: may belong to a live write
    os.utime(orphan, (0, 0))
    assert len(remove_orphans(store)) == 1 and not orphan.exists()


@pytest.mark.slow
def test_budget_holds_across_sessions_and_prunes_other_entries_first(store_path: Path) -> None:
    import subprocess
    import sys

    script = "import sys, pathlib, tests.test_pruning as t; t.fill(pathlib.Path(sys.argv[1]), 9.0)"
    subprocess.run(
        [sys.executable, "-c", script, str(store_path)],
        check=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    mine = fill(store_path, 0.0)
    store = FeatureStore.open(store_path)
    usage = measure(store)
    other = next(name for name in usage.chunks if name != mine.entry_name)
    budget = usage.total - usage.entries[other] // 2
    # A new session with a budget prunes at once, the other process's entry first.
    again = CachedFeatureDataset(
        Samples(64, "tensor"), Tile(), store_path, chunk_rows=CHUNK_ROWS, max_bytes=budget
    )
    usage = measure(store)
    assert usage.total <= budget
    assert len(usage.chunks[mine.entry_name]) == 8 and len(usage.chunks.get(other, {})) < 8
    assert again.entry is not None and again.entry.valid_mask().all()


@pytest.mark.slow
def test_budget_holds_with_dataloader_workers_writing(store_path: Path) -> None:
    from torch.utils.data import DataLoader

    expected = expected_features(256)
    full = CachedFeatureDataset(
        Samples(256, "tensor"), Tile(), store_path.with_name("full.zarr"), chunk_rows=CHUNK_ROWS
    )
    full.__getitems__(list(range(256)))
    usage = measure(FeatureStore.open(store_path.with_name("full.zarr")))
    budget, chunk = usage.total // 2, max(usage.chunks[full.entry_name].values())
    cached = CachedFeatureDataset(
        Samples(256, "tensor"), Tile(), store_path, chunk_rows=CHUNK_ROWS, max_bytes=budget
    )
    loader = DataLoader(
        cached, batch_size=16, num_workers=2, collate_fn=torch.stack, multiprocessing_context="fork"
    )
    for _ in range(2):
        features = torch.cat(list(loader)).numpy()
        np.testing.assert_array_equal(features, expected)
        # Each worker may be one chunk over at the moment it writes; nothing more.
        assert measure(FeatureStore.open(store_path)).total <= budget + 2 * chunk
    # Worker processes flushed their access statistics when they exited.
    counts = read_access(cached.entry)[:, 1]  # type: ignore[arg-type]
    assert counts.sum() >= 2 * 256 // CHUNK_ROWS


def test_access_statistics_are_counted_in_memory_and_flushed(store_path: Path) -> None:
    cached = CachedFeatureDataset(Samples(64, "tensor"), Tile(), store_path, chunk_rows=CHUNK_ROWS)
    cached.__getitems__(list(range(16)))  # chunks 0 and 1 (computed, written)
    entry = cached.entry
    assert entry is not None
    assert read_access(entry)[:, 1].sum() == 0  # nothing written on the read path yet
    cached.__getitems__(list(range(8)))  # chunk 0 again, as hits
    cached.flush_access()
    stats = read_access(entry)
    # chunk 0: the probe row (cached at construction) hit, the rest written, then all hit
    assert stats[:2, 1].tolist() == [3, 1] and stats[2:, 1].sum() == 0
    assert stats[0, 0] > stats[1, 0] > 0  # chunk 0 used last


# -- units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("10GB", 10**10),
        ("512MiB", 512 * 2**20),
        ("1.5 kB", 1500),
        (" 7 ", 7),
        ("2e3", 2000),
        ("3gib", 3 * 2**30),
    ],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize(
    "bad", ["", "GB", "10 G", "-5", "1e400", "inf", "10 gigabytes", True, None, -1, float("nan")]
)
def test_parse_bytes_rejects(bad: object) -> None:
    with pytest.raises((ValueError, TypeError), match="Expected max_bytes"):
        parse_bytes(bad)


@given(
    number=st.integers(min_value=0, max_value=10**6),
    unit=st.sampled_from(["B", "kB", "KB", "MB", "GB", "KiB", "MiB", "GiB", "tib"]),
    space=st.sampled_from(["", " "]),
)
def test_parse_bytes_is_number_times_unit(number: int, unit: str, space: str) -> None:
    scale = {
        "b": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
    }
    assert parse_bytes(f"{number}{space}{unit}") == number * scale[unit.lower()]


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (0, 999, 1500, 2_340_000, 5 * 10**12)] == [
        "0 B",
        "999 B",
        "1.5 kB",
        "2.34 MB",
        "5 TB",
    ]
