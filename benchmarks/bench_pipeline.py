"""The miss pipeline against no cache: the filling epoch and the epochs after it.

Baseline: a plain ``DataLoader`` (workers load and collate raw samples) and the module on
every batch, as a training loop does without a cache. Cached: ``cached.loader(...)`` over a
fresh store; its first epoch fills the cache while serving (workers do I/O, the module runs in
this process, a background thread writes), later epochs are all hits. Prints seconds per epoch
and the ratios against the baseline measured in the same run. Spot checks: hit epochs of the
same store with ``spot_check=8`` (the default) and ``spot_check=0``, taken in turns.

    python benchmarks/bench_pipeline.py                     # defaults below
    python benchmarks/bench_pipeline.py --rows 8192 --workers 4 --method process
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cachedfeatures import CachedFeatureDataset


class Images(Dataset[tuple[torch.Tensor, int]]):
    """Deterministic 'decoded' images: a seeded tensor plus a normalisation, like a transform."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(index)
        image = torch.rand(3, self.size, self.size, generator=generator)
        image = (image - 0.5) / 0.25
        return image, index % 10


def backbone(width: int, out: int) -> nn.Module:
    """A small frozen conv net; the cost that the cache saves."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, out),
    ).eval()


def epoch(batches: Iterable[Any], module: nn.Module | None) -> float:
    """Seconds to consume one epoch (running the module on raw batches when given)."""
    started = time.perf_counter()
    total = 0.0
    for inputs, labels in batches:
        if module is not None:
            with torch.inference_mode():
                inputs = module(inputs)
        total += float(inputs[:, 0].sum()) + float(labels.sum())  # a stand-in for the head
    return time.perf_counter() - started


def in_thread(batches: Iterable[Any], module: nn.Module) -> float:
    """``epoch`` run in a fresh thread (the pipeline runs the module in its prefetch thread;
    on a loaded machine torch's intra-op threads can behave very differently there)."""
    result: list[float] = []
    thread = threading.Thread(target=lambda: result.append(epoch(batches, module)))
    thread.start()
    thread.join()
    return result[0]


Setup = tuple[int, str]  # (DataLoader workers, "main" or "thread")


def no_cache_epoch(args: argparse.Namespace, module: nn.Module, dataset: Images, setup: Setup) -> float:
    """One epoch of a plain DataLoader with the module on every batch, in the given setup."""
    workers, where = setup
    plain = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers)
    return epoch(plain, module) if where == "main" else in_thread(plain, module)


def fastest_setup(args: argparse.Namespace, module: nn.Module, dataset: Images) -> Setup:
    """The fastest plain setup on this machine: 0 or ``--workers`` DataLoader workers, the
    loop in the main thread or in another one. Chosen once, then measured in every round, so
    the baseline is not the minimum of several noisy runs (which would favour it)."""
    setups: list[Setup] = [
        (workers, where) for workers in sorted({0, args.workers}) for where in ("main", "thread")
    ]
    times = {setup: min(no_cache_epoch(args, module, dataset, setup) for _ in range(2)) for setup in setups}
    return min(times, key=lambda setup: times[setup])


def run_round(
    args: argparse.Namespace, module: nn.Module, dataset: Images, store: str, method: str, setup: Setup
) -> tuple[list[float], tuple[float, float]]:
    """One paired round: the no-cache epoch, then the cached epochs over a fresh store.

    Also the best of two hit epochs with spot checks on (``spot_check=8``) and off, in turns.
    """
    times = [no_cache_epoch(args, module, dataset, setup)]
    cached = CachedFeatureDataset(dataset, module, store, batch_size=args.batch_size, dataset_version="bench")
    loader = cached.loader(
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        worker_method=method,  # type: ignore[arg-type]
    )
    times += [epoch(loader, None) for _ in range(args.epochs)]
    loader.close()
    in_order = cached.loader(batch_size=args.batch_size, num_workers=args.workers, worker_method=method)  # type: ignore[arg-type]
    times.append(epoch(in_order, None))  # hits in row order: one chunk per batch, no read amplification
    unchecked = CachedFeatureDataset(
        dataset, module, store, batch_size=args.batch_size, dataset_version="bench", spot_check=0
    )
    loaders = [
        data.loader(batch_size=args.batch_size, shuffle=True, num_workers=args.workers, worker_method=method)  # type: ignore[arg-type]
        for data in (cached, unchecked)
    ]
    spot: tuple[list[float], list[float]] = ([], [])
    for _ in range(2):
        for seconds, hit_loader in zip(spot, loaders, strict=True):
            seconds.append(epoch(hit_loader, None))
    for hit_loader in loaders:
        hit_loader.close()
    return times, (min(spot[0]), min(spot[1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--size", type=int, default=64, help="image side (default 64)")
    parser.add_argument("--width", type=int, default=32, help="backbone width (default 32)")
    parser.add_argument("--out", type=int, default=512, help="feature size (default 512)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--method", choices=["thread", "process", "both"], default="both")
    parser.add_argument("--epochs", type=int, default=3, help="cached epochs, the first fills (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds; medians reported (default 3)")
    parser.add_argument("--store", default=None, help="directory for the stores (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="2048 rows, thread workers, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.method, args.rounds = min(args.rows, 2048), "thread", min(args.rounds, 2)

    torch.manual_seed(0)
    module = backbone(args.width, args.out)
    dataset = Images(args.rows, args.size)
    root = args.store or tempfile.mkdtemp(prefix="bench-pipeline-")
    methods = ["thread", "process"] if args.method == "both" else [args.method]
    results: dict[str, list[list[float]]] = {method: [] for method in methods}
    spot_checks: dict[str, list[tuple[float, float]]] = {method: [] for method in methods}
    try:
        epoch(DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers), module)  # warm-up
        setup = fastest_setup(args, module, dataset)
        for number in range(args.rounds):
            for method in methods:  # interleaved, so load on a shared machine hits both alike
                store = os.path.join(root, f"features-{method}-{number}.zarr")
                shutil.rmtree(store, ignore_errors=True)
                times, spot = run_round(args, module, dataset, store, method, setup)
                results[method].append(times)
                spot_checks[method].append(spot)
                shutil.rmtree(store, ignore_errors=True)
    finally:
        if args.store is None:
            shutil.rmtree(root, ignore_errors=True)

    print(
        f"rows={args.rows} image=3x{args.size}x{args.size} features={args.out} batch={args.batch_size} "
        f"workers={args.workers} torch threads={torch.get_num_threads()} rounds={args.rounds}"
    )
    where = "the main thread" if setup[1] == "main" else "another thread"
    print(f"no-cache setup: DataLoader(num_workers={setup[0]}), loop in {where} (fastest of 4)")
    for method, rounds in results.items():
        baseline = statistics.median(times[0] for times in rounds)
        print(f"[{method} workers] no cache: {baseline:7.3f} s/epoch (median)")
        for position in range(1, args.epochs + 1):
            seconds = statistics.median(times[position] for times in rounds)
            ratio = statistics.median(times[position] / times[0] for times in rounds)
            what = "filling" if position == 1 else "hits"
            print(
                f"[{method} workers] cached epoch {position} ({what}): {seconds:7.3f} s, "
                f"{ratio:6.3f}x no cache"
            )
        seconds = statistics.median(times[-1] for times in rounds)
        ratio = statistics.median(times[-1] / times[0] for times in rounds)
        print(
            f"[{method} workers] cached, hits in row order (no shuffle): {seconds:7.3f} s, "
            f"{ratio:6.3f}x no cache"
        )
        on = statistics.median(pair[0] for pair in spot_checks[method])
        off = statistics.median(pair[1] for pair in spot_checks[method])
        ratio = statistics.median(pair[0] / pair[1] for pair in spot_checks[method])
        print(
            f"[{method} workers] hit epoch with spot_check=8: {on:7.3f} s, spot_check=0: {off:7.3f} s, "
            f"{ratio:6.3f}x (best of 2 in turns, median over rounds)"
        )


if __name__ == "__main__":
    main()
