"""The demo: train a linear head on a frozen conv backbone, with and without the cache.

Run it with ``python -m cachedfeatures.demo [--store PATH] [--samples N] [--epochs E]``.
The dataset is synthetic but costs what real data costs: each sample is a zlib-compressed
64x64 RGB image decoded and normalised on every access, as a JPEG would be. The backbone is
a small randomly initialised conv net, frozen; the head is a linear classifier.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cachedfeatures import CachedFeatureDataset

NUM_CLASSES = 10


class CompressedImages(Dataset[dict[str, Any]]):
    """Synthetic labelled images, kept zlib-compressed and decoded on every access."""

    def __init__(self, num_samples: int, size: int = 64, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.size = size
        self.labels = rng.integers(0, NUM_CLASSES, num_samples)
        yy, xx = np.mgrid[0:size, 0:size] / size
        self.blobs = []
        for label in self.labels:
            # Each class has its own stripe frequency and colour, plus noise: learnable.
            phase = rng.uniform(0, 2 * np.pi)
            stripes = np.sin((label + 1) * 3 * xx + phase) * np.cos((label % 3 + 1) * 2 * yy)
            colour = np.array([label % 3, (label // 3) % 3, label % 2]) / 2.0
            image = 0.5 + 0.3 * stripes[..., None] * colour + rng.normal(0, 0.1, (size, size, 3))
            self.blobs.append(zlib.compress((np.clip(image, 0, 1) * 255).astype(np.uint8).tobytes()))

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pixels = np.frombuffer(zlib.decompress(self.blobs[index]), dtype=np.uint8)
        image = torch.from_numpy(pixels.reshape(self.size, self.size, 3).copy()).permute(2, 0, 1)
        image = (image.float() / 255 - 0.5) / 0.25
        return {"image": image, "label": int(self.labels[index])}


def backbone() -> nn.Module:
    """A small frozen conv net: 64x64x3 -> 256 features."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    channels = [3, 32, 64, 128, 256]
    for c_in, c_out in itertools.pairwise(channels):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers).eval().requires_grad_(False)


def train_epoch(
    loader: DataLoader[Any], head: nn.Module, features_of: Any, opt: torch.optim.Optimizer
) -> float:
    loss_fn = nn.CrossEntropyLoss()
    total, correct, seen = 0.0, 0, 0
    for batch in loader:
        features = features_of(batch["image"])
        logits = head(features)
        loss = loss_fn(logits, batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(logits)
        correct += int((logits.argmax(1) == batch["label"]).sum())
        seen += len(logits)
    return correct / seen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="Zarr store path (default: a temporary one)")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    tmp = None
    if args.store is None:
        tmp = tempfile.mkdtemp(prefix="cachedfeatures-demo-")
        store = Path(tmp) / "features.zarr"
    else:
        store = Path(args.store)
    data = CompressedImages(args.samples)
    net = backbone()
    print(f"{len(data)} images, backbone of {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M weights")

    # Without the cache: decode + backbone + head, every epoch.
    torch.manual_seed(1)
    head = nn.Linear(256, NUM_CLASSES)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    raw_loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)

    def run_backbone(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features: torch.Tensor = net(images)
        return features

    start = time.perf_counter()
    accuracy = train_epoch(raw_loader, head, run_backbone, opt)
    uncached = time.perf_counter() - start
    print(f"no cache      epoch 1: {uncached:6.2f} s  train acc {accuracy:.2f}")

    # With the cache: the first epoch fills the store, the others read it.
    torch.manual_seed(1)
    head = nn.Linear(256, NUM_CLASSES)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    cached = CachedFeatureDataset(data, net, store=store, input_key="image", batch_size=args.batch_size)
    loader = DataLoader(cached, batch_size=args.batch_size, shuffle=True)
    times = []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        accuracy = train_epoch(loader, head, lambda features: features, opt)
        times.append(time.perf_counter() - start)
        print(f"cachedfeatures epoch {epoch}: {times[-1]:6.2f} s  train acc {accuracy:.2f}")

    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    raw = len(data) * 256 * 4
    hits = times[1:] or times
    print(
        f"store {store}: {size / 1e6:.2f} MB on disk for {len(data)} x 256 float32 features "
        f"({raw / 1e6:.2f} MB raw)"
    )
    print(
        f"fill epoch {times[0] / uncached:.2f}x the uncached epoch; cached epochs "
        f"{uncached / (sum(hits) / len(hits)):.1f}x faster than uncached"
    )
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
