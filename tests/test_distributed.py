"""``prefill()`` under torch.distributed: each rank owns whole chunks and writes only those."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cachedfeatures import FeatureStore
from cachedfeatures.pipeline.prefill import owned_chunks
from tests.helpers import Backbone, Samples, reference

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def run_ranks(
    nproc: int, store: Path, log_dir: Path, rows: int, delay: float = 0.0
) -> list[dict[str, object]]:
    """Run ``tests/prefill_ranks.py`` under torchrun; the per-rank results."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        TORCHRUN,
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "tests" / "prefill_ranks.py"),
    ]
    done = subprocess.run(
        [*command, str(store), str(log_dir), str(rows), str(delay)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads((log_dir / f"result-rank{rank}.json").read_text()) for rank in range(nproc)]


def chunks_written(log: Path) -> list[int]:
    return [int(match) for match in re.findall(r"of chunk (\d+)", log.read_text())]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_ranks_write_disjoint_whole_chunks_and_every_row_is_correct(
    store_path: Path, tmp_path: Path
) -> None:
    rows, chunk_rows = 200, 16
    results = run_ranks(2, store_path, tmp_path / "log", rows)

    num_chunks = -(-rows // chunk_rows)
    written = {rank: chunks_written(tmp_path / "log" / f"writes-rank{rank}.log") for rank in range(2)}
    for rank in range(2):
        assert set(written[rank]) == set(owned_chunks(num_chunks, rank, 2).tolist())
        assert len(written[rank]) == len(set(written[rank]))  # each chunk stored once, whole
    assert not set(written[0]) & set(written[1])  # no chunk written by two ranks
    assert sum(result["computed"] for result in results) == rows - 1  # row 0: the creation probe
    assert all(result["all_valid_after_barrier"] for result in results)  # every rank sees every row

    entry = FeatureStore.open(store_path).entries[0]
    dataset, backbone = Samples(rows, "tuple"), Backbone()
    read = entry.read(np.arange(rows))
    assert read.hit.all()
    expected = torch.stack([reference(backbone, dataset, i) for i in range(rows)])
    assert torch.equal(torch.from_numpy(read.arrays["features"]), expected)
