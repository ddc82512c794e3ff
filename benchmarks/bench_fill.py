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
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_pipeline import Images, backbone

from cachedfeatures import CachedFeatureDataset, binding


def no_cache_epoch(dataset: Images, module: nn.Module, args: argparse.Namespace, workers: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for images, _ in DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers):
            module(images)
    return time.perf_counter() - start


def fill_epoch(
    dataset: Images, module: nn.Module, args: argparse.Namespace, workers: int, store: str, write_back: bool
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
    for _ in DataLoader(cached, batch_size=args.batch_size, shuffle=True, num_workers=workers):
        pass
    cached.flush()
    seconds = time.perf_counter() - start
    entry = cached.entry
    assert entry is not None and entry.valid_mask().all(), "the fill epoch left rows unstored"
    binding.WRITE_BACK_BYTES = default_budget
    return seconds, start - built


default_budget = binding.WRITE_BACK_BYTES


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16384)
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

    dataset = Images(args.rows, args.size)
    module = backbone(args.width, args.out).eval()
    root = args.store or tempfile.mkdtemp(prefix="bench-fill-")
    store = os.path.join(root, "features.zarr")
    print(
        f"rows {args.rows}, batch {args.batch_size}, {torch.get_num_threads()} torch threads, store {store}"
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
