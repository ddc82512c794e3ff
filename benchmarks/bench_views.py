"""Cached augmentation views: what K views buy in test accuracy, and what they cost in time and bytes.

A synthetic task where augmentation matters. Each 1x32x32 image is noise plus one of 10 random
9x9 binary patterns (the class), always at the same place, left of centre, in the training set.
The test set shows the same kind of images under the augmentation: a random horizontal flip and a
random shift of up to ``--shift`` pixels each way. The frozen backbone is a fixed random
convolution stack followed by ``Flatten`` (no global pooling), so its features are not flip- or
shift-invariant: a head trained on one orientation and position does not recognise the others. The
augmentation in the training set's ``__getitem__`` draws the flip and the shift from torch's
global generator, as torchvision's transforms do.

The same linear head (same initialisation, sample order, epochs, batch size and learning rate:
SGD with momentum, cosine decay) is trained on the features of:

- ``no augmentation``: the un-augmented training set, cached (``views=None``);
- ``K views``: the augmented training set, cached with ``views=K`` (K = 1, 2, 4, 8 by default),
  one view per sample per epoch through ``set_epoch`` and a plain ``DataLoader``;
- ``on the fly``: the augmented training set without a cache, the backbone run on every batch:
  a fresh draw every epoch, the upper reference.

Reported for each: test accuracy (mean, min and max over ``--seeds``; each seed draws new
training images, a new head initialisation, sample order and view seed), the seconds of the
epochs that fill the store (with the default ``view_schedule="permutation"``, the first K epochs
each compute one view of every sample) apart from the seconds of the hit epochs, the whole run's
seconds, and the bytes stored. Timings are medians over the seeds.

Run from the repository root::

    python benchmarks/bench_views.py            # 1,024 training rows, 32 epochs, 3 seeds
    python benchmarks/bench_views.py --quick    # 512 rows, 24 epochs, 1 seed (under 2 minutes)

Writes JSON to benchmarks/results/views.json (gitignored) and prints a table.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reporting import machine, write_json  # noqa: E402

from cachedfeatures import CachedFeatureDataset  # noqa: E402

CLASSES = 10
SIZE = 32  # image side
PATTERN = 9  # pattern side
ROW, COL = 11, 5  # where the pattern sits in every training image: left of centre
TEST_SEED = 10_000


def patterns() -> torch.Tensor:
    """The 10 class patterns: fixed random 9x9 binary masks, none of them symmetric in practice."""
    generator = torch.Generator().manual_seed(1234)
    return (torch.rand(CLASSES, PATTERN, PATTERN, generator=generator) < 0.35).float()


def base_images(n: int, seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` un-augmented images and their labels: noise plus the class pattern at (ROW, COL)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    images = noise * torch.randn(n, 1, SIZE, SIZE, generator=generator)
    amplitude = 2.0 + torch.rand(n, generator=generator)  # 2 to 3 times the pattern's unit
    images[:, 0, ROW : ROW + PATTERN, COL : COL + PATTERN] += amplitude[:, None, None] * patterns()[labels]
    return images, labels


def augment(image: torch.Tensor, shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random horizontal flip, then a random shift of up to ``shift`` pixels each way (wrapping)."""
    if torch.rand((), generator=generator) < 0.5:
        image = image.flip(-1)
    dy, dx = torch.randint(-shift, shift + 1, (2,), generator=generator).tolist()
    return torch.roll(image, (dy, dx), dims=(-2, -1))


class Patterns(Dataset[tuple[torch.Tensor, int]]):
    """The training set; with ``shift`` set, ``__getitem__`` augments from torch's global generator."""

    def __init__(self, n: int, seed: int, noise: float, shift: int | None) -> None:
        self.images, self.labels = base_images(n, seed, noise)
        self.shift = shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.shift is not None:
            image = augment(image, self.shift)
        return image, int(self.labels[index])


def test_set(n: int, noise: float, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh images, each under one fixed draw of the augmentation: flipped half the time, shifted."""
    images, labels = base_images(n, TEST_SEED, noise)
    generator = torch.Generator().manual_seed(TEST_SEED + 1)
    return torch.stack([augment(image, shift, generator) for image in images]), labels


def backbone() -> nn.Module:
    """A frozen random conv stack, flattened (no global pooling): 4,096 position-dependent features."""
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
    )
    return module.eval().requires_grad_(False)


def features(module: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([module(images[i : i + batch]) for i in range(0, len(images), batch)])


Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def train(
    batches: Batches,
    steps_per_epoch: int,
    args: argparse.Namespace,
    seed: int,
    test: tuple[torch.Tensor, torch.Tensor],
    misses: Callable[[], int] = lambda: 0,
) -> dict[str, Any]:
    """Train a fresh linear head on ``batches(epoch)``; its test accuracy and each epoch's seconds."""
    torch.manual_seed(seed)
    head = nn.Linear(test[0].shape[1], CLASSES)
    optimizer = torch.optim.SGD(head.parameters(), lr=args.lr, momentum=0.9)
    total = args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
    )
    seconds: list[float] = []
    filled: list[bool] = []
    for epoch in range(args.epochs):
        before = misses()
        start = time.perf_counter()
        for x, y in batches(epoch):
            loss = nn.functional.cross_entropy(head(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        seconds.append(time.perf_counter() - start)
        filled.append(misses() > before)
    with torch.no_grad():
        accuracy = (head(test[0]).argmax(1) == test[1]).float().mean().item()
    return {"accuracy": accuracy, "epoch_seconds": seconds, "fill_epochs": filled}


def run_cached(
    dataset: Dataset[Any],
    module: nn.Module,
    store: str,
    views: int | None,
    args: argparse.Namespace,
    seed: int,
    test: Any,
) -> dict[str, Any]:
    """Train on the features served by a fresh ``CachedFeatureDataset`` (one view per sample per epoch)."""
    start = time.perf_counter()
    extra: dict[str, Any] = {} if views is None else {"views": views, "view_seed": seed}
    cached = CachedFeatureDataset(dataset, module, store=store, batch_size=args.batch, **extra)
    setup = time.perf_counter() - start
    order = torch.Generator()

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order.manual_seed(seed * 1000 + epoch)  # the same sample order in every run
        if views is not None:
            cached.set_epoch(epoch)
        yield from DataLoader(cached, batch_size=args.batch, shuffle=True, generator=order)

    result = train(
        batches,
        math.ceil(len(cached) / args.batch),
        args,
        seed,
        test,
        misses=lambda: cached.module_calls - cached.spot_check_calls,
    )
    assert cached.entry is not None
    result["backbone_passes"] = int(cached.entry.valid_mask().sum()) / len(cached)  # rows computed, in passes
    cached.close()
    result["setup_seconds"] = setup
    result["store_bytes"] = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file())
    return result


def run_on_the_fly(
    dataset: Dataset[Any], module: nn.Module, args: argparse.Namespace, seed: int, test: Any
) -> dict[str, Any]:
    """Train on the backbone's output for a fresh augmentation of every sample in every epoch."""
    order = torch.Generator()

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order.manual_seed(seed * 1000 + epoch)
        for images, labels in DataLoader(dataset, batch_size=args.batch, shuffle=True, generator=order):
            with torch.inference_mode():
                out = module(images)
            yield out.clone(), labels  # an inference tensor cannot enter autograd

    # the augmentation draws from torch's global generator, seeded with the head in train()
    result = train(batches, math.ceil(len(dataset) / args.batch), args, seed, test)  # type: ignore[arg-type]
    result.update(setup_seconds=0.0, store_bytes=0, backbone_passes=float(args.epochs))
    return result


def summarise(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    accuracies = [run["accuracy"] for run in runs]
    fill = [
        sum(s for s, f in zip(run["epoch_seconds"], run["fill_epochs"], strict=True) if f) for run in runs
    ]
    fill_epochs = [sum(run["fill_epochs"]) for run in runs]
    with_backbone = [  # the epochs that ran the backbone: the fill epochs, or every epoch on the fly
        statistics.fmean(
            [s for s, f in zip(run["epoch_seconds"], run["fill_epochs"], strict=True) if f] or [math.nan]
        )
        if any(run["fill_epochs"])
        else statistics.fmean(run["epoch_seconds"])
        for run in runs
    ]
    hits = [
        statistics.median(
            [s for s, f in zip(run["epoch_seconds"], run["fill_epochs"], strict=True) if not f] or [math.nan]
        )
        if any(run["fill_epochs"])
        else math.nan  # on the fly: no hits, every epoch runs the backbone
        for run in runs
    ]
    return {
        "name": name,
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_min": min(accuracies),
        "accuracy_max": max(accuracies),
        "accuracies": accuracies,
        "fill_epochs": statistics.median(fill_epochs),
        "fill_seconds": statistics.median(fill),
        "backbone_passes": statistics.median(run["backbone_passes"] for run in runs),
        "backbone_epoch_seconds": statistics.median(with_backbone),
        "epoch_seconds": statistics.median(statistics.median(run["epoch_seconds"]) for run in runs),
        "hit_epoch_seconds": None if math.isnan(statistics.median(hits)) else statistics.median(hits),
        "total_seconds": statistics.median(run["setup_seconds"] + sum(run["epoch_seconds"]) for run in runs),
        "store_bytes": statistics.median(run["store_bytes"] for run in runs),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="512 rows, 24 epochs, 1 seed unless --seeds (under 2 minutes)"
    )
    parser.add_argument("--rows", type=int, default=1024, help="training images (default 1024)")
    parser.add_argument("--test-rows", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=32)
    parser.add_argument(
        "--seeds", type=int, default=None, help="runs with new data and head (default 3; 1 --quick)"
    )
    parser.add_argument("--views", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument(
        "--noise", type=float, default=0.5, help="pixel noise, in pattern units (default 0.5)"
    )
    parser.add_argument("--shift", type=int, default=2, help="largest shift of the augmentation (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier timings)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "views.json")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.epochs = min(args.rows, 512), min(args.epochs, 24)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    torch.set_num_threads(args.threads)

    module = backbone()
    test_images, test_labels = test_set(args.test_rows, args.noise, args.shift)
    test = (features(module, test_images), test_labels)
    names = ["no augmentation", *(f"views={k}" for k in args.views), "on the fly"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-views-") as tmp:
        os.environ.setdefault("CACHEDFEATURES_LOCK_DIR", str(Path(tmp) / "locks"))
        for seed in range(args.seeds):
            plain = Patterns(args.rows, seed, args.noise, shift=None)
            augmented = Patterns(args.rows, seed, args.noise, shift=args.shift)
            for name in names:
                store = str(Path(tmp) / f"{seed}-{name.replace(' ', '-').replace('=', '')}.zarr")
                if name == "no augmentation":
                    result = run_cached(plain, module, store, None, args, seed, test)
                elif name == "on the fly":
                    result = run_on_the_fly(augmented, module, args, seed, test)
                else:
                    result = run_cached(augmented, module, store, int(name.split("=")[1]), args, seed, test)
                runs[name].append(result)
                shutil.rmtree(store, ignore_errors=True)
                print(f"seed {seed} {name:<16} accuracy {result['accuracy']:.3f}", flush=True)
    table = [summarise(name, runs[name]) for name in names]

    print(
        f"\nrows={args.rows} test rows={args.test_rows} epochs={args.epochs} batch={args.batch} lr={args.lr} "
        f"noise={args.noise} shift={args.shift} seeds={args.seeds} threads={torch.get_num_threads()} "
        f"({time.perf_counter() - started:.0f} s in all)"
    )
    fly = table[-1]
    print(
        f"{'':<17}{'accuracy':>9}{'(min-max)':>13}{'backbone':>10}{'fill s':>8}{'epoch s with':>14}"
        f"{'hit':>8}{'total s':>9}{'vs on':>8}{'store':>8}"
    )
    print(
        f"{'':<17}{'':>9}{'':>13}{'passes':>10}{'':>8}{'the backbone':>14}{'epoch s':>8}{'':>9}"
        f"{'the fly':>8}{'MB':>8}"
    )
    for line in table:
        spread = f"{line['accuracy_min']:.3f}-{line['accuracy_max']:.3f}"
        hit = "-" if line["hit_epoch_seconds"] is None else f"{line['hit_epoch_seconds']:.3f}"
        print(
            f"{line['name']:<17}{line['accuracy_mean']:>9.3f}{spread:>13}{line['backbone_passes']:>10.0f}"
            f"{line['fill_seconds']:>8.2f}{line['backbone_epoch_seconds']:>14.3f}{hit:>8}"
            f"{line['total_seconds']:>9.2f}{line['total_seconds'] / fly['total_seconds']:>7.2f}x"
            f"{line['store_bytes'] / 1e6:>8.1f}"
        )
    print(
        "fill s: the epochs that filled the store (views=K: the first K); epoch s with the backbone: one\n"
        "of those (on the fly: every epoch); hit epoch s: the median of the rest; total s: construction\n"
        "and all epochs"
    )

    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "table": table,
        "machine": machine(),
    }
    write_json(report, args.out)


if __name__ == "__main__":
    main()
