"""``prefill()``: only missing rows, a progress bar, and resume after Ctrl-C or SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cachedfeatures import CachedFeatureDataset, FeatureStore
from tests.helpers import Backbone, Samples, SlowSamples, reference

ROOT = Path(__file__).resolve().parents[1]


def loaded_rows(log_dir: Path) -> list[int]:
    return sorted(int(line) for path in log_dir.glob("loads-*") for line in path.read_text().split())


def assert_all_rows_correct(cached: CachedFeatureDataset, backbone: Backbone, dataset: Samples) -> None:
    entry = cached.entry
    assert entry is not None and entry.valid_mask().all()
    read = entry.read(np.arange(len(dataset)))
    expected = torch.stack([reference(backbone, dataset, i) for i in range(len(dataset))])
    assert torch.equal(torch.from_numpy(read.arrays["features"]), expected)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_prefill_computes_only_missing_rows_with_a_progress_bar(
    store_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], num_workers: int
) -> None:
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    dataset, backbone = Samples(100, "tuple", log_dir=str(log_dir)), Backbone()
    cached = CachedFeatureDataset(
        dataset, backbone, store_path, batch_size=16, chunk_rows=16, dataset_version="v"
    )
    cached.compute(np.arange(0, 30))
    for path in log_dir.glob("loads-*"):
        path.unlink()

    result = cached.prefill(num_workers=num_workers)

    assert (result.computed, result.skipped) == (70, 30)
    # Besides the misses, only the spot check's rows were loaded: 8 of those cached before.
    checked = cached.spot_checked_rows
    assert len(checked) == 8 and set(checked) <= set(range(30))
    assert loaded_rows(log_dir) == sorted([*range(30, 100), *checked])
    assert max(backbone.batch_sizes) <= 16
    bar = capsys.readouterr().err
    assert "70/70" in bar and "rows/s" in bar and "cached=30" in bar
    assert_all_rows_correct(cached, backbone, dataset)
    again = cached.prefill(progress=False)
    assert (again.computed, again.skipped) == (0, 100)
    assert capsys.readouterr().err == ""


class InterruptedSamples(Samples):
    """Raises KeyboardInterrupt (as Ctrl-C would) when row ``at`` is first loaded."""

    def __init__(self, n: int, at: int, log_dir: str) -> None:
        super().__init__(n, "tuple", log_dir=log_dir)
        self.at = at
        self.armed = True

    def __getitem__(self, index: int) -> Any:
        if index == self.at and self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return super().__getitem__(index)


def test_prefill_after_ctrl_c_continues_where_it_stopped(store_path: Path, tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    dataset, backbone = InterruptedSamples(96, at=53, log_dir=str(log_dir)), Backbone()
    cached = CachedFeatureDataset(
        dataset, backbone, store_path, batch_size=8, chunk_rows=16, dataset_version="v"
    )
    with pytest.raises(KeyboardInterrupt):
        cached.prefill(progress=False)
    assert cached.entry is not None
    valid = cached.entry.valid_mask()
    # Row 0 was stored at construction; rows 1..48 are the 6 batches of 8 computed before
    # Ctrl-C, all stored (row 48 sits in an unfinished chunk: flushed on the way out).
    assert valid[:49].all()
    assert not valid[49:].any()
    for path in log_dir.glob("loads-*"):
        path.unlink()
    checked_before = len(cached.spot_checked_rows)

    result = cached.prefill(progress=False)
    assert (result.computed, result.skipped) == (47, 49)
    checked = cached.spot_checked_rows[checked_before:]  # the spot check's loads, of cached rows
    assert len(checked) == 8 and set(checked) <= set(range(49))
    assert loaded_rows(log_dir) == sorted([*range(49, 96), *checked])
    assert_all_rows_correct(cached, backbone, dataset)


KILLED_SCRIPT = """
import sys
from cachedfeatures import CachedFeatureDataset
from tests.helpers import Backbone, SlowSamples

cached = CachedFeatureDataset(SlowSamples({n}, delay=0.01), Backbone(), sys.argv[1], batch_size=8,
                              chunk_rows=16, dataset_version="v")
print("ready", flush=True)
cached.prefill(num_workers=2, progress=False)
print("finished", flush=True)
"""


@pytest.mark.slow
def test_prefill_after_sigkill_recomputes_only_unfinished_chunks(store_path: Path, tmp_path: Path) -> None:
    n, chunk_rows = 320, 16
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_SCRIPT.format(n=n)), str(store_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        entry = FeatureStore.open(store_path).entries[0]
        deadline = time.monotonic() + 60
        while entry.valid_mask().sum() < 4 * chunk_rows and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        output, _ = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, output

    valid = entry.valid_mask()
    per_chunk = valid.reshape(-1, chunk_rows).sum(axis=1)
    if per_chunk[0] == 1:  # only the probe row that construction stored
        per_chunk[0] = 0
    assert 4 <= (per_chunk == chunk_rows).sum() < n // chunk_rows  # killed mid-way, progress kept
    assert set(per_chunk.tolist()) <= {0, chunk_rows}  # chunks are stored whole, valid last
    missing = np.flatnonzero(~valid)

    log_dir = tmp_path / "log"
    log_dir.mkdir()
    dataset, backbone = SlowSamples(n, log_dir=str(log_dir)), Backbone()
    cached = CachedFeatureDataset(
        dataset, backbone, store_path, batch_size=8, chunk_rows=16, dataset_version="v"
    )
    assert cached.entry_name == entry.name
    result = cached.prefill(num_workers=2, progress=False)
    assert result.computed == len(missing)
    checked = cached.spot_checked_rows  # the spot check's loads, of rows cached before the kill
    assert len(checked) == 8 and not set(checked) & set(missing.tolist())
    # only rows of chunks unfinished at the kill
    assert loaded_rows(log_dir) == sorted([*missing.tolist(), *checked])
    assert_all_rows_correct(cached, backbone, dataset)
