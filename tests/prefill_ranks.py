"""Run under ``torchrun``: prefill one local store across ranks (gloo, CPU).

Each rank logs every chunk its writer stores to ``<log_dir>/writes-rank<r>.log`` and its
result to ``<log_dir>/result-rank<r>.json``, so a test can check that no chunk had two
writers. Used by ``tests/test_distributed.py`` and ``benchmarks/bench_prefill_ranks.py``.

    torchrun --standalone --nproc_per_node=2 tests/prefill_ranks.py STORE LOG_DIR [ROWS] [DELAY]
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch.distributed as dist

from cachedfeatures import CachedFeatureDataset
from tests.helpers import Backbone
from tests.test_prefill import SlowSamples


def main() -> None:
    store, log_dir = sys.argv[1], Path(sys.argv[2])
    rows = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    handler = logging.FileHandler(log_dir / f"writes-rank{rank}.log")
    writer_log = logging.getLogger("cachedfeatures.store.writer")
    writer_log.setLevel(logging.DEBUG)
    writer_log.addHandler(handler)

    def make() -> CachedFeatureDataset:
        return CachedFeatureDataset(
            SlowSamples(rows, delay=delay),
            Backbone(),
            store,
            batch_size=16,
            chunk_rows=16,
            dataset_version="v",
        )

    if rank == 0:
        cached = make()  # creates the entry once; the other ranks open it
    dist.barrier()
    if rank != 0:
        cached = make()
    dist.barrier()
    started = time.perf_counter()
    result = cached.prefill(progress=False)
    seconds = time.perf_counter() - started
    entry = cached.entry
    assert entry is not None
    summary = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "computed": result.computed,
        "skipped": result.skipped,
        "seconds": seconds,
        "all_valid_after_barrier": bool(entry.valid_mask().all()),
    }
    (log_dir / f"result-rank{rank}.json").write_text(json.dumps(summary))
    handler.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
