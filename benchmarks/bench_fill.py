"""The fill epoch of a plain ``DataLoader(cached, shuffle=True)`` against the same epoch without a cache.

Baseline: ``DataLoader(dataset, shuffle=True)`` and the module on every batch, as a training loop
does without a cache. Fill: ``DataLoader(cached, shuffle=True)`` over a fresh store (misses
computed in ``__getitems__``, in this process or the DataLoader's workers), timed until every
computed row is stored (the workers' exit, or ``cached.flush()`` at workers 0). "At once":
the same fill with the write-back buffer off (``binding.WRITE_BACK_BYTES = 0``), every batch
written as it comes: what the map-style path did before. The three are taken in turns,
``--rounds`` times per worker count, on the same machine state; medians and ratios printed.

    python benchmarks/bench_fill.py                       # 16,384 rows, workers 0 and 2
    python benchmarks/bench_fill.py --rows 4096 --rounds 2 --workers 2

At many chunks (``--rows 262144``: 256 chunks of 1,024 rows, a shuffled batch of 256 rows touching
~160 of them) an epoch of the conv backbone takes about two minutes on 2 cores, where the store's
work is a small share; ``--source vectors`` swaps in rows of 64 float32 read from an array and a
frozen ``Linear(64, 384)``, so that what the store does per batch, not the module, is what is
measured. ``--max-batches`` times only an epoch's first batches
(fill and baseline alike; with workers, each batch of a fill is written at once, about 160 chunks
rewritten per batch)::

    python benchmarks/bench_fill.py --source vectors --rows 262144 --workers 0 --rounds 2 --no-at-once
    python benchmarks/bench_fill.py --source vectors --rows 262144 --workers 2 --rounds 2 --no-at-once \
        --max-batches 32
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_pipeline import Images, backbone

from cachedfeatures import CachedFeatureDataset, binding


class Vectors(Dataset[tuple[torch.Tensor, int]]):
    """Cheap raw rows: ``dim`` seeded float32 values each, copied out of one array, and a label."""

    def __init__(self, n: int, dim: int) -> None:
        self.inputs = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.inputs[index].copy()), index % 10


def linear(dim: int, out: int) -> nn.Module:
    """A frozen linear layer: a module that costs next to nothing per row."""
    torch.manual_seed(0)
    return nn.Linear(dim, out).requires_grad_(False).eval()


def no_cache_epoch(dataset: Dataset[Any], module: nn.Module, args: argparse.Namespace, workers: int) -> float:
    start = time.perf_counter()
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers)
    with torch.inference_mode():
        for batches, (images, _) in enumerate(loader, start=1):
            module(images)
            if args.max_batches is not None and batches >= args.max_batches:
                break
    del loader  # its workers stop here, inside the timing, as the fill's do
    return time.perf_counter() - start


def fill_epoch(
    dataset: Dataset[Any],
    module: nn.Module,
    args: argparse.Namespace,
    workers: int,
    store: str,
    write_back: bool,
) -> tuple[float, float]:
    """Seconds of one fill epoch (until stored) and of building the dataset before it."""
    shutil.rmtree(store, ignore_errors=True)
    binding.WRITE_BACK_BYTES = default_budget if write_back else 0
    built = time.perf_counter()
    cached = CachedFeatureDataset(
        dataset,
        module,
        store,
        batch_size=args.batch_size,
        chunk_rows=args.chunk_rows,
        dataset_version="bench",
    )
    start = time.perf_counter()
    loader = DataLoader(cached, batch_size=args.batch_size, shuffle=True, num_workers=workers)
    served = 0
    for batches, (features, _) in enumerate(loader, start=1):
        served += len(features)
        if args.max_batches is not None and batches >= args.max_batches:
            break
    del loader  # its workers stop (and store what they computed) here
    cached.flush()
    seconds = time.perf_counter() - start
    entry = cached.entry
    assert entry is not None, "the fill epoch opened no entry"
    stored = int(entry.valid_mask().sum())
    # A prefix: the workers may have computed (and stored) a few batches ahead of the last served.
    assert stored >= served and (args.max_batches is not None or stored == len(dataset)), "rows left unstored"
    binding.WRITE_BACK_BYTES = default_budget
    chunk_rows[0] = entry.chunk_rows
    return seconds, start - built


default_budget = binding.WRITE_BACK_BYTES
chunk_rows = [0]  # the entry's, as the last fill found it


def chunks_per_batch(rows: int, chunk: int, batch: int) -> float:
    """Distinct chunks a shuffled batch touches, on average over one permutation."""
    order = np.random.default_rng(0).permutation(rows)[: rows - rows % batch].reshape(-1, batch)
    return float(np.mean([len(np.unique(b // chunk)) for b in order]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument(
        "--source",
        choices=["images", "vectors"],
        default="images",
        help="images: 3 x size x size and the conv backbone (default); vectors: --in-dim float32, a Linear",
    )
    parser.add_argument("--in-dim", type=int, default=64, help="row size of --source vectors (default 64)")
    parser.add_argument("--max-batches", type=int, default=None, help="time only an epoch's first batches")
    parser.add_argument("--size", type=int, default=64, help="image side (default 64)")
    parser.add_argument("--width", type=int, default=32, help="backbone width (default 32)")
    parser.add_argument("--out", type=int, default=384, help="feature size (default 384)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--chunk-rows", type=int, default=None, help="default: the library's (~2 MiB chunks)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-at-once", action="store_true", help="skip the write-at-once fill")
    parser.add_argument("--store", default=None, help="directory for the store (default: a temporary one)")
    args = parser.parse_args()

    dataset: Dataset[Any]
    if args.source == "vectors":
        dataset, module = Vectors(args.rows, args.in_dim), linear(args.in_dim, args.out)
    else:
        dataset, module = Images(args.rows, args.size), backbone(args.width, args.out).eval()
    root = args.store or tempfile.mkdtemp(prefix="bench-fill-")
    store = os.path.join(root, "features.zarr")
    prefix = f", first {args.max_batches} batches of each epoch" if args.max_batches else ""
    print(
        f"rows {args.rows} ({args.source}), batch {args.batch_size}, "
        f"{torch.get_num_threads()} torch threads, store {store}{prefix}"
    )
    try:
        for workers in args.workers:
            base: list[float] = []
            fill: list[float] = []
            at_once: list[float] = []
            build: list[float] = []
            for _ in range(args.rounds):  # alternating, so that a change in load hits all alike
                base.append(no_cache_epoch(dataset, module, args, workers))
                seconds, built = fill_epoch(dataset, module, args, workers, store, write_back=True)
                fill.append(seconds)
                build.append(built)
                if not args.no_at_once:
                    at_once.append(fill_epoch(dataset, module, args, workers, store, write_back=False)[0])
            if workers == args.workers[0]:
                chunk = chunk_rows[0]
                print(
                    f"entry: {-(-args.rows // chunk)} chunks of {chunk} rows; a shuffled batch touches "
                    f"{chunks_per_batch(args.rows, chunk, args.batch_size):.0f} of them"
                )
            ratios = [f / b for f, b in zip(fill, base, strict=True)]
            line = (
                f"workers {workers}: no cache {statistics.median(base):.2f} s, "
                f"fill {statistics.median(fill):.2f} s = {statistics.median(ratios):.2f}x "
                f"(rounds {', '.join(f'{r:.2f}' for r in ratios)}; building the dataset "
                f"{statistics.median(build):.2f} s, not timed)"
            )
            if at_once:
                once = [a / b for a, b in zip(at_once, base, strict=True)]
                line += (
                    f"; written at once {statistics.median(at_once):.2f} s = {statistics.median(once):.2f}x"
                )
            print(line, flush=True)
    finally:
        if args.store is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
