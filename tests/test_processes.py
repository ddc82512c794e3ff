"""Workers, fresh processes and concurrent writers, all real processes on a real store."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch
from torch.utils.data import DataLoader

from cachedfeatures import CachedFeatureDataset
from cachedfeatures.compute.fingerprint import NUM_PROBES, NUM_RELOADED_PROBES, RELOAD_SEEDS
from tests.helpers import Backbone, Samples, reference, run_script


@pytest.mark.parametrize(
    "num_workers,context", [(0, None), (2, "fork"), (2, "spawn")], ids=["main", "fork", "spawn"]
)
def test_dataloader_epoch_fills_the_store_and_serves_correct_features(
    store_path, num_workers: int, context: str | None
) -> None:
    data = Samples(96, "dict")
    module = Backbone()
    cached = CachedFeatureDataset(data, module, store_path, input_key="image", chunk_rows=16, batch_size=8)
    loader = DataLoader(
        cached,
        batch_size=12,
        shuffle=True,
        num_workers=num_workers,
        multiprocessing_context=context,
        generator=torch.Generator().manual_seed(0),
    )
    seen = []
    for epoch in range(2):
        for batch in loader:
            assert batch["image"].shape == (len(batch["label"]), 16)
            for features, name in zip(batch["image"], batch["name"], strict=True):
                index = int(name.removeprefix("sample-"))
                assert torch.equal(features, reference(module, data, index))
                seen.append(index)
        if epoch == 0:
            assert cached.entry is not None and cached.entry.valid_mask().all()
    assert sorted(seen) == sorted(list(range(96)) * 2)


FILL = """
import json, sys
from cachedfeatures import CachedFeatureDataset
from tests.helpers import Backbone, Samples
data, module = Samples(64, "dict"), Backbone()
cached = CachedFeatureDataset(data, module, sys.argv[1], input_key="image", batch_size=16)
loads, calls = data.loads, module.calls
samples = cached.__getitems__(list(range(64)))
print(json.dumps({"loads": data.loads - loads, "calls": module.calls - calls,
                  "spot_rows": len(cached.spot_checked_rows), "spot_calls": cached.spot_check_calls,
                  "construction_loads": loads, "entry": cached.entry_name,
                  "row3": samples[3]["image"].tolist(), "label3": samples[3]["label"]}))
"""


def test_a_second_process_gets_every_sample_as_a_hit(store_path) -> None:
    first = run_script(FILL, str(store_path))
    # 63 misses in batches of 16 (the probe row came for free), and a spot check of that row
    assert first["calls"] - first["spot_calls"] == 4
    assert first["loads"] - first["spot_rows"] == 63
    second = run_script(FILL, str(store_path))
    assert second["entry"] == first["entry"]
    # Every row a hit: the only module call and raw loads are the spot check's, which passed.
    assert second["calls"] == second["spot_calls"] == 1
    assert second["loads"] == second["spot_rows"] == 8
    # 8 probe samples, and 4 of them reloaded under 3 seeds to catch random augmentation
    assert second["construction_loads"] == NUM_PROBES + NUM_RELOADED_PROBES * len(RELOAD_SEEDS) == 20
    expected = reference(Backbone(), Samples(64, "dict"), 3)
    assert torch.equal(torch.tensor(second["row3"]), expected)
    assert second["label3"] == 3


def _fill_range(store: str, lock_dir: str, start: int, stop: int, seed: int, barrier: object) -> None:
    os.environ["CACHEDFEATURES_LOCK_DIR"] = lock_dir
    cached = CachedFeatureDataset(Samples(400), Backbone(), store, chunk_rows=16, batch_size=2)
    barrier.wait(timeout=240)  # type: ignore[attr-defined]
    # Each writer visits its range in its own random order, two rows at a time, so that the
    # writers keep hitting the same chunks at the same moment.
    order = torch.randperm(stop - start, generator=torch.Generator().manual_seed(seed)) + start
    for batch_start in range(0, len(order), 2):
        cached.__getitems__(order[batch_start : batch_start + 2].tolist())


@pytest.mark.slow
def test_concurrent_writers_on_shared_chunks_lose_no_rows(store_path, tmp_path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    ranges = [(0, 260), (100, 400), (0, 400), (50, 350)]  # overlapping: every chunk has 3-4 writers
    processes = [
        ctx.Process(target=_fill_range, args=(str(store_path), str(tmp_path / "locks"), a, b, seed, barrier))
        for seed, (a, b) in enumerate(ranges)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + 480
    for process in processes:
        process.join(timeout=max(1.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
    data, module = Samples(400), Backbone()
    cached = CachedFeatureDataset(data, module, store_path, chunk_rows=16)
    assert cached.entry is not None
    assert cached.entry.valid_mask().all()
    loads = data.loads
    samples = cached.__getitems__(list(range(400)))
    assert data.loads == loads + len(cached.spot_checked_rows)  # all hits; the spot check loads 8
    for index, (features, label) in enumerate(samples):
        assert label == index % 7
        assert torch.equal(features, reference(module, data, index))
