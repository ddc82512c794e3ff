"""Concurrency under load: 4 readers, 2 writers and a pruner on one local store at once.

Readers iterate shuffled epochs in random batches, writers fill overlapping ranges in row
order, and the pruner keeps the store at half the entry's size, so chunks are dropped and
written again all the time. Every process checks every sample it gets (and every hit of the
raw read path) against the module's output; none may see an error or a wrong value.
"""

from __future__ import annotations

import multiprocessing
import queue
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers import Backbone, reference
from tests.reliability.children import load_role, open_cached
from tests.reliability.figures import record

N, CHUNK_ROWS, BATCH_SIZE, SECONDS = 640, 32, 16, 12.0
ROLES = [("reader", i) for i in range(4)] + [("writer", i) for i in range(2)] + [("pruner", 0)]
STARTUP_TIMEOUT = 180.0  # seven processes importing torch on a loaded 2-core machine


@pytest.mark.slow
def test_readers_writers_and_pruner_never_see_a_wrong_value(store_path: Path, tmp_path: Path) -> None:
    cached, samples = open_cached(store_path, N, chunk_rows=CHUNK_ROWS, batch_size=BATCH_SIZE)
    backbone = Backbone()
    expected = torch.stack([reference(backbone, samples, i) for i in range(N)]).numpy()
    np.save(tmp_path / "expected.npy", expected)
    cached.prefill(progress=False)
    entry = cached.entry
    assert entry is not None
    config: dict[str, Any] = {
        "store": str(store_path),
        "expected": str(tmp_path / "expected.npy"),
        "n": N,
        "chunk_rows": CHUNK_ROWS,
        "batch_size": BATCH_SIZE,
        "seconds": SECONDS,
        "budget": entry.nbytes_stored() // 2,
        "barrier_timeout": STARTUP_TIMEOUT,
    }
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(ROLES))
    results = context.Queue()
    processes = [
        context.Process(
            target=load_role, args=(role, index, config, barrier, results), name=f"{role}-{index}"
        )
        for role, index in ROLES
    ]
    for process in processes:
        process.start()
    reports: list[tuple[str, int, dict[str, Any]]] = []
    try:
        for _ in processes:
            try:
                reports.append(results.get(timeout=STARTUP_TIMEOUT + SECONDS + 120))
            except queue.Empty:
                break
        for process in processes:
            process.join(timeout=60)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=30)
        results.close()
        results.join_thread()

    errors = [f"{role} {index}:\n{counts['error']}" for role, index, counts in reports if "error" in counts]
    assert not errors, "\n".join(errors)
    assert len(reports) == len(ROLES), f"only {len(reports)} of {len(ROLES)} processes reported"
    assert [process.exitcode for process in processes] == [0] * len(ROLES)
    readers = [counts for role, _, counts in reports if role == "reader"]
    reads = sum(counts["reads"] for counts in readers)
    hits = sum(counts["hits"] for role, _, counts in reports if role != "pruner")
    pruned = sum(counts["pruned"] for role, _, counts in reports if role == "pruner")
    computed = sum(counts["computed"] for role, _, counts in reports if role != "pruner")
    assert all(counts["reads"] > 0 for counts in readers)
    assert pruned > 0 and computed > 0 and hits > 0  # the pruner really raced the readers
    record(
        "reads checked under load (4 readers, 2 writers, 1 pruner)",
        f"{reads} samples by readers; {hits} raw-read hits checked by all; "
        f"{pruned} chunks pruned, {computed} rows recomputed in {SECONDS:.0f}s",
    )
