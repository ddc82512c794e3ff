"""Run under ``torchrun``: train a head under DDP on ``cached.loader(...)`` (gloo, CPU).

Every rank reads its share of each epoch through ``cached.loader(sampler=...)`` and takes an
optimizer step on a DDP-wrapped linear head per batch. Per epoch, each rank records the rows it
was served, how many rows the backbone computed, and the epoch's seconds; after the epoch
(a barrier) rank 0 records which rows of the entry are valid. Results go to
``<log_dir>/result-rank<r>.json``. Used by ``tests/reliability/test_ddp_training.py`` and
``benchmarks/bench_ddp_fill.py``.

    torchrun --standalone --nproc_per_node=2 tests/ddp_loader_ranks.py STORE LOG ROWS EPOCHS SAMPLER [DELAY]

``SAMPLER``: ``distributed`` (``DistributedSampler``, shuffled, ``set_epoch`` per epoch),
``owner`` (``ChunkShuffleSampler(split="owner")``) or ``nocache`` (no cache at all: a plain
``DataLoader`` over the dataset with a ``DistributedSampler``, the backbone run on every batch).
``CF_STORAGE_OPTIONS``: JSON fsspec options for a URL store.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from cachedfeatures import CachedFeatureDataset, ChunkShuffleSampler, build_on_ranks
from tests.helpers import Backbone, Samples


class SlowDictSamples(Samples):
    """Dict samples (with their index in ``name``) that take ``delay`` seconds each to load."""

    def __init__(self, n: int, delay: float) -> None:
        super().__init__(n, "dict")
        self.delay = delay

    def __getitem__(self, index: int) -> Any:
        if self.delay:
            time.sleep(self.delay)
        return super().__getitem__(index)


def main() -> None:
    store, log_dir = sys.argv[1], Path(sys.argv[2])
    rows, epochs, kind = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    delay = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    options = json.loads(os.environ.get("CF_STORAGE_OPTIONS", "null"))
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    backbone = Backbone()
    head = DistributedDataParallel(nn.Linear(16, 7))
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01)
    data = SlowDictSamples(rows, delay)

    cached: CachedFeatureDataset | None = None
    sampler: Sampler[int]
    if kind == "nocache":
        sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
        batches: Any = DataLoader(data, batch_size=16, sampler=sampler)
    else:
        cached = build_on_ranks(
            lambda: CachedFeatureDataset(
                data,
                backbone,
                store,
                input_key="image",
                batch_size=16,
                chunk_rows=16,
                spot_check=0,
                storage_options=options,
            )
        )
        if kind == "distributed":
            sampler = DistributedSampler(cached, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
        else:
            sampler = ChunkShuffleSampler(cached, split="owner")
        batches = cached.loader(batch_size=16, sampler=sampler)

    results: list[dict[str, Any]] = []
    for epoch in range(epochs):
        if kind == "nocache":
            sampler.set_epoch(epoch)  # type: ignore[attr-defined]  # the loader does this itself
        dist.barrier()
        started = time.perf_counter()
        computed_before = sum(backbone.batch_sizes)
        served: list[int] = []
        for batch in batches:
            if kind == "nocache":
                with torch.inference_mode():
                    features = backbone(batch["image"])
                features = features.clone()
            else:
                features = batch["image"]
            loss = nn.functional.cross_entropy(head(features), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            served.extend(int(name.split("-")[1]) for name in batch["name"])
        if kind != "nocache":
            batches.flush()  # this epoch's computed rows are stored before the others look
        seconds = time.perf_counter() - started
        dist.barrier()
        epoch_seconds = time.perf_counter() - started
        record: dict[str, Any] = {
            "epoch": epoch,
            "served": served,
            "computed": sum(backbone.batch_sizes) - computed_before,
            "seconds": seconds,
            "epoch_seconds": epoch_seconds,
        }
        if rank == 0 and cached is not None and cached.entry is not None:
            record["valid"] = cached.entry.valid_mask().nonzero()[0].tolist()
        results.append(record)
    (log_dir / f"result-rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
