"""Misses computed on the map-style path are held per process and written a chunk at a time.

A plain ``DataLoader(cached, shuffle=True)`` fill epoch touches every chunk in every batch; the
write-back buffer turns one read-modify-write per chunk per batch into about one per chunk per
process. Real stores, real DataLoader worker processes, fresh processes to check what is stored.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cachedfeatures import CachedFeatureDataset, FeatureStore, binding
from cachedfeatures.store.feature_store import Entry
from tests.helpers import ROOT, Backbone, Samples, reference, run_script

N, CHUNK_ROWS, BATCH = 192, 16, 16
NUM_CHUNKS = N // CHUNK_ROWS


def _cached(store_path: Path, dataset: Samples | None = None, **options: object) -> CachedFeatureDataset:
    return CachedFeatureDataset(
        dataset or Samples(N, "tuple"),
        Backbone(),
        store_path,
        chunk_rows=CHUNK_ROWS,
        batch_size=BATCH,
        dataset_version="write-back",
        spot_check=0,
        **options,  # type: ignore[arg-type]
    )


def _count_chunk_writes(monkeypatch: pytest.MonkeyPatch, log: Path) -> None:
    """Log every chunk each ``Entry.write`` rewrites, from any process (workers are forked)."""
    original = Entry.write

    def counted(self: Entry, indices: object, columns: object) -> None:
        rows = np.asarray(indices, dtype=np.int64)
        with open(log, "a") as out:
            out.write("".join(f"{os.getpid()} {c}\n" for c in np.unique(rows // self.chunk_rows)))
        original(self, indices, columns)  # type: ignore[arg-type]

    monkeypatch.setattr(Entry, "write", counted)


def _chunk_writes(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _no_writes_but_coalesced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Held rows are written only when a chunk completes, past the budget, or at exit: no hold
    time nor idle flush comes due on a loaded machine (forked workers inherit this)."""
    monkeypatch.setattr(binding, "DEFAULT_MAX_HOLD_SECONDS", 600.0)
    monkeypatch.setattr(binding, "IDLE_FLUSH_SECONDS", 600.0)


def _expected() -> torch.Tensor:
    backbone, samples = Backbone(), Samples(N, "tuple")
    return torch.stack([reference(backbone, samples, i) for i in range(N)])


def _stored(store_path: Path) -> tuple[np.ndarray, torch.Tensor]:
    """The valid mask and the stored features, as read from disk now."""
    entry = FeatureStore.open(store_path, mode="r").entries[0]
    return entry.valid_mask(), torch.from_numpy(np.asarray(entry.arrays["features"][:]))


def _valid_in_a_fresh_process(store_path: Path) -> list[bool]:
    result = run_script(
        """
        import json, sys
        from cachedfeatures import FeatureStore
        entry = FeatureStore.open(sys.argv[1], mode="r").entries[0]
        print(json.dumps(entry.valid_mask().tolist()))
        """,
        str(store_path),
    )
    return result  # type: ignore[return-value]


@pytest.mark.parametrize(("workers", "persistent"), [(0, False), (2, False), (2, True)])
def test_a_shuffled_fill_epoch_is_exact_stored_and_written_once_per_chunk(
    store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int, persistent: bool
) -> None:
    cached = _cached(store_path)
    log = tmp_path / "chunk-writes.log"
    _count_chunk_writes(monkeypatch, log)
    _no_writes_but_coalesced(monkeypatch)
    expected = _expected()
    seen: list[int] = []
    torch.manual_seed(workers)
    loader = DataLoader(
        cached, batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=persistent
    )
    for features, labels in loader:
        rows = [int(np.flatnonzero((expected == f).all(dim=1))[0]) for f in features]
        assert torch.equal(features, expected[rows])  # every row exact, as it is computed
        assert labels.tolist() == [row % 7 for row in rows]
        seen.extend(rows)
    assert sorted(seen) == list(range(N))
    if workers == 0:
        cached.flush()  # this process holds nothing more anyway: every chunk completed
        assert cached.held_bytes == 0
    if persistent:  # the workers hold their rows until they leave: here, when the loader goes
        assert not _stored(store_path)[0].all()
        del loader
    # The workers have exited, so every computed row is stored: a fresh process sees it valid.
    assert all(_valid_in_a_fresh_process(store_path))
    valid, stored = _stored(store_path)
    assert valid.all() and torch.equal(stored, expected)
    # Writing each batch at once rewrote every chunk a batch touched: ~N / BATCH * 10 writes
    # (about 110, as workers did before they held rows). Held rows: about one write per chunk
    # per process, for each process holds some rows of every chunk.
    assert _chunk_writes(log) <= max(1, workers) * NUM_CHUNKS


def test_persistent_workers_store_what_they_hold_once_idle(store_path: Path) -> None:
    """With the loader (and its workers) still alive, a second without a batch stores the
    rows they hold: the next epoch's other worker, or another process, reads them."""
    cached = _cached(store_path)
    loader = DataLoader(cached, batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True)
    for _ in loader:
        pass
    deadline = time.monotonic() + 60
    while not _stored(store_path)[0].all() and time.monotonic() < deadline:
        time.sleep(0.2)
    valid, stored = _stored(store_path)
    assert valid.all() and torch.equal(stored, _expected())
    del loader


def test_persistent_workers_store_what_they_hold_when_the_next_epoch_asks_for_it(
    store_path: Path, tmp_path: Path
) -> None:
    """Epochs back to back leave no idle second, and each worker holds about half of every
    chunk: the second epoch's other worker would compute again every row held (about 85 of the
    192 rows did). A worker asked again for a row it holds stores all it holds first."""
    log = tmp_path / "loads"
    log.mkdir()
    cached = _cached(store_path, Samples(N, "tuple", log_dir=str(log)))

    def loads() -> int:
        return sum(len(path.read_text().split()) for path in log.iterdir())

    probed = loads()  # the probe's row, stored when the entry was made
    loader = DataLoader(cached, batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True)
    for _ in loader:
        pass
    first = loads()
    assert first - probed == N - 1
    for _ in loader:
        pass
    # At most the first batches each worker takes before the other's flush lands (prefetch: 2).
    assert loads() - first <= N // 4
    del loader
    valid, stored = _stored(store_path)
    assert valid.all() and torch.equal(stored, _expected())


@pytest.mark.parametrize("batches", [None, 4])
def test_persistent_workers_leave_every_computed_row_stored(store_path: Path, batches: int | None) -> None:
    """Found in review: persistent workers are ended by SIGTERM when the program exits, so rows
    they held were lost (1 of 256 valid afterwards). A SIGTERM now stores them first, whether
    the epoch ended (workers idle) or not (workers computing the next batches); the idle flush
    is kept out of the way, and the program's exit is quiet (no worker reported killed)."""
    received = run_script(
        """
        import json, sys
        from torch.utils.data import DataLoader
        from cachedfeatures import binding
        from tests.test_write_back import BATCH, _cached
        binding.IDLE_FLUSH_SECONDS = 600.0
        batches = json.loads(sys.argv[2])
        cached = _cached(sys.argv[1])
        loader = DataLoader(cached, batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True)
        received = []
        for features, labels in loader:
            received.append(features.tolist())
            if len(received) == batches:
                break  # the program exits with the workers still at work
        print(json.dumps(received))
        """,
        str(store_path),
        json.dumps(batches),
        quiet=True,
    )
    valid, stored = _stored(store_path)
    expected = _expected()
    got = torch.tensor(received).reshape(-1, expected.shape[1])
    rows = [int(np.flatnonzero((expected == f).all(dim=1))[0]) for f in got]
    assert valid[rows].all()  # every row the program received is stored
    assert torch.equal(stored[valid], expected[valid])  # and every valid row is exact
    if batches is None:
        assert valid.all()


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_loses_its_held_rows_and_leaves_no_wrong_row(store_path: Path) -> None:
    """SIGKILL is no exit: the worker's held rows are lost (recomputed later), none is valid
    and wrong; the other worker's rows are stored when it leaves, and a later epoch fills the
    rest exactly."""
    worker_rows = run_script(
        """
        import gc, json, os, signal, sys
        import torch
        from torch.utils.data import DataLoader
        from cachedfeatures import binding
        from tests.test_write_back import BATCH, N, _cached
        binding.IDLE_FLUSH_SECONDS = 600.0
        binding.DEFAULT_MAX_HOLD_SECONDS = 600.0
        order = torch.randperm(N, generator=torch.Generator().manual_seed(1)).tolist()
        cached = _cached(sys.argv[1])
        loader = DataLoader(cached, batch_size=BATCH, sampler=order, num_workers=2)
        batches = iter(loader)
        try:
            for received in range(4):  # batch i comes from worker i % 2
                next(batches)
            os.kill(batches._workers[0].pid, signal.SIGKILL)
            for _ in batches:
                pass
        except Exception:  # the killed worker reported, or the batch it was sending cut short
            pass
        del batches
        gc.collect()  # worker 1 leaves, storing what it holds
        print(json.dumps(order[: 4 * BATCH]))
        """,
        str(store_path),
    )
    order: list[int] = worker_rows  # type: ignore[assignment]
    worker0 = order[:BATCH] + order[2 * BATCH : 3 * BATCH]
    worker1 = order[BATCH : 2 * BATCH] + order[3 * BATCH : 4 * BATCH]
    valid, stored = _stored(store_path)
    expected = _expected()
    assert torch.equal(stored[valid], expected[valid])  # never a wrong valid row
    assert valid[worker1].all()  # the worker that left stored what it computed
    # The killed worker's rows were served but held, not stored (written at once, they were).
    assert not valid[[row for row in worker0 if row != 0]].any()  # row 0: the probe's
    for _ in DataLoader(_cached(store_path), batch_size=BATCH, shuffle=True, num_workers=2):
        pass
    valid, stored = _stored(store_path)
    assert valid.all() and torch.equal(stored, expected)


def test_two_workers_flushing_one_chunk_both_land(
    store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each worker holds half of every chunk; both leave at once and write each chunk at the
    same moment (a barrier before every chunk write). The chunk lock serialises the two
    read-modify-writes, so neither loses the other's rows."""
    cached = _cached(store_path)
    _no_writes_but_coalesced(monkeypatch)
    barrier = multiprocessing.get_context("fork").Barrier(2, timeout=60)
    original = Entry.write

    def together(self: Entry, indices: object, columns: object) -> None:
        barrier.wait()
        original(self, indices, columns)  # type: ignore[arg-type]

    monkeypatch.setattr(Entry, "write", together)
    # Batch k holds row k of every chunk; workers take turns, so worker 0 has the even rows of
    # every chunk and worker 1 the odd ones, and neither completes a chunk before it leaves.
    batches = [[k + CHUNK_ROWS * chunk for chunk in range(NUM_CHUNKS)] for k in range(CHUNK_ROWS)]
    for _ in DataLoader(cached, batch_sampler=batches, num_workers=2, multiprocessing_context="fork"):
        pass
    valid, stored = _stored(store_path)
    assert valid.all() and torch.equal(stored, _expected())


def test_rows_held_by_a_dataset_that_was_garbage_collected_are_stored_at_exit(store_path: Path) -> None:
    """Found in review: the exit hook's set was weak, and a binding sits in a cycle with its
    buffer, so a collected dataset's held rows were never stored."""
    run_script(
        """
        import gc, sys
        from tests.test_write_back import _batch, _cached
        def fill():
            cached = _cached(sys.argv[1])
            _batch(cached, [3, 5, 60, 100])  # incomplete chunks: held
            assert cached.held_bytes > 0
        fill()
        gc.collect()
        print("{}")
        """,
        str(store_path),
    )
    valid = _valid_in_a_fresh_process(store_path)
    assert all(valid[row] for row in (3, 5, 60, 100))


def _batch(cached: CachedFeatureDataset, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` as one batch of a plain DataLoader in this process (``num_workers=0``)."""
    return next(iter(DataLoader(cached, batch_size=len(rows), sampler=rows)))  # type: ignore[no-any-return]


def test_held_rows_are_served_from_the_buffer_and_stored_on_flush(store_path: Path) -> None:
    cached = _cached(store_path)
    backbone, samples = Backbone(), Samples(N, "tuple")
    rows = [1, 2, 17, 40]  # incomplete chunks: held
    features, labels = _batch(cached, rows)
    assert cached.held_bytes > 0
    assert cached.entry is not None and not cached.entry.valid_mask()[rows].any()  # valid only once written
    calls = cached.module_calls
    again, again_labels = _batch(cached, rows)
    assert cached.module_calls == calls  # served from the buffer, not recomputed
    assert torch.equal(features, torch.stack([reference(backbone, samples, row) for row in rows]))
    assert torch.equal(again, features) and torch.equal(again_labels, labels)
    cached.flush()
    assert cached.held_bytes == 0 and cached.entry.valid_mask()[rows].all()


def test_a_direct_call_stores_its_rows_before_it_returns(store_path: Path) -> None:
    cached = _cached(store_path)
    cached.__getitems__([1, 2, 17, 40])  # not a DataLoader's batch: another reader sees it now
    assert cached.held_bytes == 0
    assert cached.entry is not None and cached.entry.valid_mask()[[1, 2, 17, 40]].all()


def test_rows_held_at_exit_are_stored_by_the_exit_hook(store_path: Path) -> None:
    held = run_script(
        """
        import json, sys
        from tests.test_write_back import _batch, _cached
        cached = _cached(sys.argv[1])
        _batch(cached, [3, 5, 60, 100])  # incomplete chunks; no flush()
        print(json.dumps(cached.held_bytes))
        """,
        str(store_path),
    )
    assert held > 0  # type: ignore[operator]
    valid = _valid_in_a_fresh_process(store_path)
    assert all(valid[row] for row in (3, 5, 60, 100))


def test_a_read_only_store_holds_nothing(store_path: Path) -> None:
    _cached(store_path)  # the entry
    with pytest.warns(Warning):
        cached = _cached(store_path, read_only=True)
        _batch(cached, [1, 2, 3])
    assert cached.held_bytes == 0


def test_a_sigterm_runs_the_exit_hooks_even_while_the_main_thread_holds_what_they_need(
    tmp_path: Path,
) -> None:
    """The handler interrupts the main thread anywhere, also inside a held buffer's lock: the
    hooks run in their own thread, wait for the lock, and the process ends with status 0."""
    done = tmp_path / "hook-ran"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import os, signal, sys, threading, time
                from cachedfeatures.store.exit_hooks import at_exit, exit_on_terminate
                lock = threading.Lock()
                def hook():
                    with lock:
                        open(sys.argv[1], "w").write("stored")
                at_exit(hook, priority=110)
                assert exit_on_terminate()
                with lock:  # as write_back holds the buffer's lock
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.5)
                time.sleep(60)  # the hook's thread ends the process long before
                sys.exit(3)
                """
            ),
            str(done),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert done.read_text() == "stored"
