"""Training under DDP (torchrun, gloo, CPU, 2 ranks) through ``cached.loader(...)`` on S3 (the
loopback moto server), where there are no locks: each rank stores only the chunks it owns, so
no row a rank stored is lost to another rank's write of the same chunk, and every row is exact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from cachedfeatures import FeatureStore
from tests.conftest import S3Server
from tests.helpers import Backbone, Samples, reference
from tests.reliability.figures import record

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
ROWS, CHUNK_ROWS = 160, 16


def _train(s3: S3Server, url: str, log_dir: Path, epochs: int, sampler: str) -> list[list[dict[str, Any]]]:
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "CF_STORAGE_OPTIONS": json.dumps(s3.storage_options),
    }
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "ddp_loader_ranks.py")]
    done = subprocess.run(
        [*command, url, str(log_dir), str(ROWS), str(epochs), sampler],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads((log_dir / f"result-rank{rank}.json").read_text()) for rank in range(2)]


def _assert_stored_rows_exact(s3: S3Server, url: str) -> np.ndarray:
    (entry,) = FeatureStore.open(url, mode="r", storage_options=s3.storage_options).entries
    valid = entry.valid_mask()
    rows = np.flatnonzero(valid)
    read = entry.read(rows)
    assert read.hit.all()
    data, module = Samples(ROWS, "dict"), Backbone()
    expected = torch.stack([reference(module, data, int(i)) for i in rows])
    assert torch.equal(torch.from_numpy(read.arrays["features"]), expected)
    return valid


def test_a_distributed_sampler_fills_each_chunk_from_its_owner_and_loses_no_row(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """With a plain ``DistributedSampler`` a rank is served rows of both ranks' chunks; it stores
    only its own. After every epoch the valid rows are exactly the rows some owner was served so
    far (row 0: stored when the entry was created): none lost, none stored by a non-owner. The
    epoch after the last one a row was missing in serves every row as a hit."""
    epochs = 9
    url = s3_server.new_url()
    results = _train(s3_server, url, tmp_path / "log", epochs, "distributed")

    expected = np.zeros(ROWS, dtype=bool)
    expected[0] = True
    filled_at = None
    for epoch in range(epochs):
        for rank in range(2):
            sampler = DistributedSampler(range(ROWS), num_replicas=2, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            share = np.fromiter(sampler, dtype=np.int64)
            assert sorted(results[rank][epoch]["served"]) == sorted(share.tolist())
            expected[share[(share // CHUNK_ROWS) % 2 == rank]] = True
        valid = np.zeros(ROWS, dtype=bool)
        valid[results[0][epoch]["valid"]] = True
        assert np.array_equal(valid, expected), f"epoch {epoch}: {np.flatnonzero(valid != expected)}"
        if filled_at is None and expected.all():
            filled_at = epoch
    assert filled_at is not None and filled_at < epochs - 1, "the store never filled: raise epochs"
    assert all(results[rank][filled_at + 1]["computed"] == 0 for rank in range(2))  # all hits
    assert _assert_stored_rows_exact(s3_server, url).all()
    computed = [sum(r[e]["computed"] for r in results) for e in range(epochs)]
    record("DDP on S3, DistributedSampler: rows computed per epoch (2 ranks, 160 rows)", computed)


def test_the_owner_split_fills_every_row_in_one_epoch(s3_server: S3Server, tmp_path: Path) -> None:
    url = s3_server.new_url()
    results = _train(s3_server, url, tmp_path / "log", 2, "owner")
    assert results[0][0]["valid"] == list(range(ROWS))  # one epoch filled the store
    assert sum(r[0]["computed"] for r in results) == ROWS - 1  # row 0: stored at creation
    assert all(r[1]["computed"] == 0 for r in results)  # the second epoch: hits only
    for rank in range(2):
        served = np.asarray(results[rank][0]["served"])
        assert set(((served // CHUNK_ROWS) % 2).tolist()) == {rank}
    assert _assert_stored_rows_exact(s3_server, url).all()
