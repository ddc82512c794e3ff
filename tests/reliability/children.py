"""Code that the kill and load tests run in other processes (subprocesses, spawned workers).

Kept in an importable module: spawned processes import their target by name.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cachedfeatures import CachedFeatureDataset, FeatureStore
from cachedfeatures.pruning import prune
from tests.helpers import Backbone, SlowSamples

VERSION = "reliability"


def open_cached(
    store: str | Path, n: int, *, chunk_rows: int, batch_size: int, delay: float = 0.0, **options: Any
) -> tuple[CachedFeatureDataset, SlowSamples]:
    """The dataset every process of a test builds alike (same entry), and its raw samples."""
    samples = SlowSamples(n, delay)
    cached = CachedFeatureDataset(
        samples,
        Backbone(),
        store,
        batch_size=batch_size,
        chunk_rows=chunk_rows,
        dataset_version=VERSION,
        **options,
    )
    return cached, samples


def prefill_main(argv: list[str]) -> None:
    """``python -m tests.reliability.children STORE LOG_DIR N CHUNK_ROWS BATCH_SIZE DELAY``.

    Prints ``ready`` once the dataset is built, then logs every raw load of ``prefill()`` (not
    the probe of construction) to ``LOG_DIR/loads-PID`` and prints ``finished``.
    """
    store, log_dir, n, chunk_rows, batch_size, delay = argv
    cached, samples = open_cached(
        store, int(n), chunk_rows=int(chunk_rows), batch_size=int(batch_size), delay=float(delay)
    )
    samples.log_dir = log_dir
    print("ready", flush=True)
    cached.prefill(progress=False)
    print("finished", flush=True)


def loader_main(argv: list[str]) -> None:
    """``python -m tests.reliability.children loader STORE LOG_DIR N CHUNK_ROWS BATCH_SIZE DELAY HOLD``.

    One shuffled ``loader()`` epoch (the writer holding rows at most ``HOLD`` seconds), with
    every raw load logged to ``LOG_DIR/loads-PID``; prints ``ready`` first, ``finished`` last.
    """
    import logging

    from cachedfeatures.store import writer

    store, log_dir, n, chunk_rows, batch_size, delay, hold = argv
    writer.DEFAULT_MAX_HOLD_SECONDS = float(hold)
    # Each round of writes of held chunks, with the hold it leaves in force, for the bound.
    rounds = logging.FileHandler(Path(log_dir) / f"rounds-{os.getpid()}")
    writer.logger.addHandler(rounds)
    writer.logger.setLevel(logging.DEBUG)
    cached, samples = open_cached(
        store, int(n), chunk_rows=int(chunk_rows), batch_size=int(batch_size), delay=float(delay)
    )
    samples.log_dir = log_dir
    print("ready", flush=True)
    loader = cached.loader(shuffle=True, seed=int(time.time()))
    try:
        for _ in loader:
            pass
    finally:
        loader.close()
    print("finished", flush=True)


def dataloader_main(argv: list[str]) -> None:
    """``python -m tests.reliability.children dataloader STORE LOG_DIR N CHUNK_ROWS BATCH_SIZE DELAY BUDGET``.

    One shuffled epoch of a plain ``DataLoader(cached, shuffle=True)`` in this process, the
    write-back buffer holding at most ``BUDGET`` bytes; every raw load logged to
    ``LOG_DIR/loads-PID``; prints ``ready`` first, ``finished`` last.
    """
    from torch.utils.data import DataLoader

    from cachedfeatures import binding

    store, log_dir, n, chunk_rows, batch_size, delay, budget = argv
    binding.WRITE_BACK_BYTES = int(budget)
    cached, samples = open_cached(
        store, int(n), chunk_rows=int(chunk_rows), batch_size=int(batch_size), delay=float(delay)
    )
    samples.log_dir = log_dir
    print("ready", flush=True)
    for _ in DataLoader(cached, batch_size=int(batch_size), shuffle=True):
        pass
    print("finished", flush=True)


def _check(samples: list[Any], rows: np.ndarray, expected: np.ndarray) -> None:
    """Each sample is ``(features, label)`` and equals the module's output for its row."""
    for row, (features, label) in zip(rows.tolist(), samples, strict=True):
        if label != row % 7 or not np.array_equal(np.asarray(features), expected[row]):
            raise AssertionError(f"row {row}: wrong value served")


def _load_role(role: str, index: int, config: dict[str, Any], barrier: Any, results: Any) -> None:
    """One process of the load test: a reader, a writer or the pruner, until the deadline.

    Puts ``(role, index, counts)`` on ``results``, or ``(role, index, {"error": traceback})``.
    """
    counts: dict[str, Any] = {"reads": 0, "hits": 0, "computed": 0, "pruned": 0, "rounds": 0}
    try:
        expected = np.load(config["expected"])
        n, chunk_rows = config["n"], config["chunk_rows"]
        rng = np.random.default_rng(1000 + 10 * index + len(role))
        if role == "pruner":
            store = FeatureStore.open(config["store"], mode="a")
        else:
            # Odd processes read through Zarr (a missing chunk reads as fill values there),
            # even ones through the chunk-file route.
            route = "zarr" if index % 2 else "auto"
            cached, _ = open_cached(
                config["store"], n, chunk_rows=chunk_rows, batch_size=config["batch_size"], read_route=route
            )
        barrier.wait(timeout=config["barrier_timeout"])
        deadline = time.monotonic() + config["seconds"]
        while time.monotonic() < deadline:
            counts["rounds"] += 1
            if role == "pruner":
                report = prune(store, config["budget"])
                counts["pruned"] += len(report.dropped)
                time.sleep(rng.uniform(0.0, 0.2))
                continue
            if role == "reader":  # a shuffled epoch in random batches
                order = rng.permutation(n)
            else:  # writers fill overlapping ranges in row order
                start = index * n // 4
                order = np.arange(start, start + 3 * n // 4)
            for begin in range(0, len(order), config["batch_size"]):
                if time.monotonic() >= deadline:
                    break
                rows = order[begin : begin + config["batch_size"]]
                entry = cached.entry
                assert entry is not None
                read = entry.read(rows)  # the raw read path: every hit must be right
                hit_rows = rows[read.hit]
                if len(hit_rows) and not np.array_equal(read.arrays["features"], expected[hit_rows]):
                    raise AssertionError(f"Entry.read served a wrong value among rows {hit_rows}")
                counts["hits"] += len(hit_rows)
                _check(cached.__getitems__(rows.tolist()), rows, expected)
                counts["reads"] += len(rows)
                counts["computed"] += int((~read.hit).sum())
        results.put((role, index, counts))
    except BaseException:
        counts["error"] = traceback.format_exc()
        results.put((role, index, counts))
        raise SystemExit(1) from None


def load_role(role: str, index: int, config: dict[str, Any], barrier: Any, results: Any) -> None:
    """Spawn target: :func:`_load_role` with warnings as errors (as under pytest)."""
    warnings.simplefilter("error")
    _load_role(role, index, config, barrier, results)


if __name__ == "__main__":
    if sys.argv[1] == "loader":
        loader_main(sys.argv[2:])
    elif sys.argv[1] == "dataloader":
        dataloader_main(sys.argv[2:])
    else:
        prefill_main(sys.argv[1:])
