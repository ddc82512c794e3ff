"""The stress test of entry creation on S3: 8 processes, 5 rounds (20 with
``CACHEDFEATURES_RACE_ROUNDS=20``), each round all
processes creating one new entry in a fresh store at the same moment, then each writing the
chunk it owns. Every round ends with one entry, every row valid and exact."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cachedfeatures import FeatureStore
from tests.conftest import S3Server
from tests.helpers import Backbone, Samples, reference
from tests.reliability.figures import record
from tests.script_server import SCRIPTS

ROOT = Path(__file__).resolve().parents[2]

# One process per rank, alive for all rounds (a child of a script server: torch is imported
# already). Once every rank has imported what it needs (its ready file), the test writes the
# moment round 0 starts for all (the go file); round r starts half a second after the last rank
# finished round r - 1, read from the done files' modification times, which every rank sees alike.
RACER = """
    import json, os, sys, time
    from pathlib import Path
    import s3fs, torch
    torch.set_num_threads(1)  # eight processes on two cores
    from cachedfeatures import CachedFeatureDataset
    from cachedfeatures.store.ownership import ChunkOwnership
    from tests.helpers import Backbone, Samples

    urls, options = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    n, rank, world, sync = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6])
    (sync / f"ready-{rank}").touch()
    while not (sync / "go").exists():
        time.sleep(0.01)
    start = float((sync / "go").read_text())
    failures = []
    for round_, url in enumerate(urls):
        time.sleep(max(0.0, start - time.time()))
        try:
            cached = CachedFeatureDataset(
                Samples(n, "dict"), Backbone(), url, input_key="image", storage_options=options,
                batch_size=16, chunk_rows=16, spot_check=0, owned_chunks=ChunkOwnership(rank, world))
            cached.compute(list(range(n)))  # stores only the chunk this rank owns
        except Exception as error:
            failures.append(f"round {round_}: {type(error).__name__}: {error}")
        (sync / f"done-{round_}-{rank}").touch()
        done = [sync / f"done-{round_}-{other}" for other in range(world)]
        while not all(path.exists() for path in done):
            time.sleep(0.01)
        start = max(path.stat().st_mtime for path in done) + 0.5
    print(json.dumps(failures))
"""


@pytest.mark.slow
def test_eight_processes_creating_one_entry_at_once_for_twenty_rounds_on_s3(
    s3_server: S3Server, tmp_path: Path
) -> None:
    # 8 chunks of 16 rows: one for each process. CI runs 5 rounds;
    # CACHEDFEATURES_RACE_ROUNDS=20 is the full stress run (179 s, no failure).
    world, n = 8, 128
    rounds = int(os.environ.get("CACHEDFEATURES_RACE_ROUNDS", "5"))
    urls = [s3_server.new_url() for _ in range(rounds)]
    started = time.monotonic()
    options = json.dumps(s3_server.storage_options)
    racers = [
        SCRIPTS.start(RACER, json.dumps(urls), options, str(n), str(rank), str(world), str(tmp_path))
        for rank in range(world)
    ]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready-{rank}").exists() for rank in range(world)):
        assert all(racer.poll() is None for racer in racers), "a racer died before its ready file"
        assert time.monotonic() < deadline, "the racers did not get ready"
        time.sleep(0.05)
    go = tmp_path / "go.partial"
    go.write_text(repr(time.time() + 0.5))
    go.rename(tmp_path / "go")  # every racer reads the whole moment
    failures: list[str] = []
    for racer in racers:
        out, err = racer.communicate(timeout=600)
        assert racer.returncode == 0, err[-3000:]
        failures.extend(json.loads(out.strip().splitlines()[-1]))
    assert not failures, "\n".join(failures)

    data, module = Samples(n, "dict"), Backbone()
    expected = torch.stack([reference(module, data, row) for row in range(n)])
    for url in urls:
        store = FeatureStore.open(url, mode="r", storage_options=s3_server.storage_options)
        (entry,) = store.entries  # one entry, not one per racer
        assert entry.valid_mask().all()  # no row lost to another process's creation
        read = entry.read(np.arange(n))
        assert torch.equal(torch.from_numpy(read.arrays["features"]), expected)
    record(
        "S3 stress: processes x rounds creating one entry at once (failed), seconds",
        f"{world} x {rounds} ({len(failures)}), {time.monotonic() - started:.0f}s",
    )
