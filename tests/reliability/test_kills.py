"""Kill test: ``prefill()`` killed with SIGKILL at random moments, 20 times on one store.

After every kill the store opens and reads without error and every row marked valid equals the
module's output; a final ``prefill()`` completes it. Rows loaded by a killed run but not stored
(recomputed later) stay within what the writer could have held unfinished at the kill.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cachedfeatures import FeatureStore
from cachedfeatures.pruning import PARTIAL_SUFFIX
from cachedfeatures.writer import DEFAULT_MAX_PENDING
from tests.helpers import Backbone, reference
from tests.reliability.children import open_cached
from tests.reliability.figures import record

ROOT = Path(__file__).resolve().parents[2]
KILLS = 20
N, CHUNK_ROWS, BATCH_SIZE, DELAY = 2400, 32, 8, 0.002
# What one killed run can have loaded without storing it, given how prefill and the writer work:
# the batch being loaded or computed in the main thread (blocked in submit at worst), the
# batches in the writer's queue, the chunk being written, and the unfinished chunk buffered
# (prefill goes in row order, so the writer holds at most one incomplete chunk).
LOST_PER_KILL = (DEFAULT_MAX_PENDING + 1) * BATCH_SIZE + 2 * CHUNK_ROWS


def loads_of(log_dir: Path, pid: int) -> list[int]:
    path = log_dir / f"loads-{pid}"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def check_valid_rows(store_path: Path, expected: torch.Tensor) -> np.ndarray:
    """Reopen the store read-only; every valid row reads as a hit equal to the module's output."""
    entry = FeatureStore.open(store_path, mode="r").entries[0]
    valid = entry.valid_mask()
    rows = np.flatnonzero(valid)
    read = entry.read(rows)
    assert read.hit.all(), f"rows marked valid but not served: {rows[~read.hit][:10]}"
    assert torch.equal(torch.from_numpy(read.arrays["features"]), expected[rows])
    return valid


@pytest.mark.slow
def test_prefill_survives_twenty_sigkills(store_path: Path, tmp_path: Path) -> None:
    rng = random.Random(6)
    log_dir = tmp_path / "loads"
    log_dir.mkdir()
    _, samples = open_cached(store_path, N, chunk_rows=CHUNK_ROWS, batch_size=BATCH_SIZE)  # the entry
    backbone = Backbone()
    expected = torch.stack([reference(backbone, samples, i) for i in range(N)])
    valid = check_valid_rows(store_path, expected)
    needed = int((~valid).sum())  # construction stores a probe row (the first spot check's row)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tests.reliability.children", str(store_path), str(log_dir)]
    command += [str(N), str(CHUNK_ROWS), str(BATCH_SIZE), str(DELAY)]

    def run(kill_after: float | None) -> tuple[int, int | None, str]:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            assert process.stdout is not None
            first = process.stdout.readline()
            assert first.strip() == "ready", first + process.stdout.read()
            if kill_after is not None:
                process.stdout.close()  # never block on a full pipe while we sleep
                time.sleep(kill_after)
                os.kill(process.pid, signal.SIGKILL)
            output = "" if kill_after is not None else process.communicate(timeout=300)[0]
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=60)
        return process.pid, process.returncode, output

    def spot_checked(loaded: np.ndarray, before: np.ndarray) -> int:
        """How many of a run's first loads are its spot check's: up to 8 rows valid before it.

        prefill() spot-checks rows cached before it ran, before it loads any missing row.
        """
        count = 0
        while count < min(8, len(loaded)) and before[loaded[count]]:
            count += 1
        return count

    kills = lost_total = orphans_seen = spot_total = 0
    for _ in range(KILLS):
        before = valid
        pid, code, _ = run(rng.uniform(0.05, 0.6))
        assert code == -signal.SIGKILL, f"prefill finished before its kill (exit {code}): slow it down"
        kills += 1
        valid = check_valid_rows(store_path, expected)
        assert (valid | ~before).all(), "a kill lost rows that were valid"
        loaded = np.asarray(loads_of(log_dir, pid), dtype=np.int64)
        spot = spot_checked(loaded, before)
        spot_total += spot
        loaded = loaded[spot:]
        assert not before[loaded].any(), "prefill loaded rows that were already valid"
        lost = int((~valid[loaded]).sum())
        assert lost <= LOST_PER_KILL, f"{lost} rows loaded and not stored by one killed run"
        lost_total += lost
        orphans_seen += len(list(store_path.rglob(f"*{PARTIAL_SUFFIX}")))
    assert not valid.all(), "the store filled up before the last kill: kill sooner"

    pid, code, output = run(None)
    assert code == 0 and "finished" in output, output
    loaded = np.asarray(loads_of(log_dir, pid), dtype=np.int64)
    spot = spot_checked(loaded, valid)
    assert spot == 8  # the last run completed its spot check
    spot_total += spot
    assert sorted(loaded[spot:].tolist()) == np.flatnonzero(~valid).tolist()  # only what was missing
    valid = check_valid_rows(store_path, expected)
    assert valid.all()
    total_loads = sum(len(loads_of(log_dir, int(p.name.split("-")[1]))) for p in log_dir.glob("loads-*"))
    recomputed = total_loads - needed - spot_total  # spot checks recompute rows, never store them
    assert recomputed == lost_total  # every extra load is a row a kill caught unstored, no other
    assert recomputed <= kills * LOST_PER_KILL
    record("kills survived (SIGKILL during prefill, 20 on one store)", f"{kills}/{KILLS}")
    record(
        "rows recomputed after kills",
        f"{recomputed} of {N} rows ({recomputed / kills:.1f} per kill; bound {LOST_PER_KILL} per kill)",
    )
    record("*.partial files seen after kills", orphans_seen)
