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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cachedfeatures import CachedFeatureDataset

NUM_CLASSES = 10


class CompressedImages(Dataset[Any]):
    """Synthetic labelled images, kept zlib-compressed and decoded on every access.

    Args:
        num_samples: how many images.
        size: their height and width in pixels. Default 64.
        seed: the seed that draws them. Default 0.
        samples: ``"dict"`` (default) gives ``{"image": tensor, "label": int}``, ``"tuple"``
            gives ``(image, label)``.
    """

    def __init__(
        self, num_samples: int, size: int = 64, seed: int = 0, samples: Literal["dict", "tuple"] = "dict"
    ) -> None:
        if samples not in ("dict", "tuple"):
            raise ValueError(f"Expected samples to be 'dict' or 'tuple'. Got {samples!r}.")
        rng = np.random.default_rng(seed)
        self.size = size
        self.samples = samples
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

    def __getitem__(self, index: int) -> Any:
        pixels = np.frombuffer(zlib.decompress(self.blobs[index]), dtype=np.uint8)
        image = torch.from_numpy(pixels.reshape(self.size, self.size, 3).copy()).permute(2, 0, 1)
        image = (image.float() / 255 - 0.5) / 0.25
        if self.samples == "tuple":
            return image, int(self.labels[index])
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


@dataclass
class EpochTimes:
    """One training epoch, split: getting the features (the loader, plus the backbone when
    uncached) and the head's step (forward, loss, backward, optimizer), which no cache removes."""

    features: float
    head: float
    accuracy: float

    @property
    def total(self) -> float:
        return self.features + self.head


def train_epoch(
    loader: DataLoader[Any], head: nn.Module, features_of: Any, opt: torch.optim.Optimizer
) -> EpochTimes:
    loss_fn = nn.CrossEntropyLoss()
    correct, seen = 0, 0
    serving, stepping = 0.0, 0.0
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            serving += time.perf_counter() - start
            break
        features = features_of(batch["image"])
        served = time.perf_counter()
        logits = head(features)
        loss = loss_fn(logits, batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        correct += int((logits.argmax(1) == batch["label"]).sum())
        seen += len(logits)
        serving += served - start
        stepping += time.perf_counter() - served
    return EpochTimes(serving, stepping, correct / seen)


def _line(label: str, times: EpochTimes, where: str) -> str:
    return (
        f"{label}: {times.total:6.2f} s = features {times.features:6.2f} s ({where}) "
        f"+ head step {times.head:5.2f} s   train acc {times.accuracy:.2f}"
    )


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

    uncached = train_epoch(raw_loader, head, run_backbone, opt)
    print(_line("no cache             epoch 1", uncached, "decode + backbone"))

    # With the cache: the first epoch fills the store, the others read it.
    torch.manual_seed(1)
    head = nn.Linear(256, NUM_CLASSES)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    cached = CachedFeatureDataset(data, net, store=store, input_key="image", batch_size=args.batch_size)
    loader = DataLoader(cached, batch_size=args.batch_size, shuffle=True)
    times = []
    for epoch in range(1, args.epochs + 1):
        times.append(train_epoch(loader, head, lambda features: features, opt))
        where = "computed and stored" if epoch == 1 else "read from the store"
        print(_line(f"cachedfeatures       epoch {epoch}", times[-1], where))

    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    raw = len(data) * 256 * 4
    hits = times[1:] or times
    features = sum(t.features for t in hits) / len(hits)
    total = sum(t.total for t in hits) / len(hits)
    head_share = sum(t.head for t in hits) / sum(t.total for t in hits)
    print(
        f"store {store}: {size / 1e6:.2f} MB on disk for {len(data)} x 256 float32 features "
        f"({raw / 1e6:.2f} MB raw)"
    )
    print(f"fill epoch {times[0].total / uncached.total:.2f}x the uncached epoch")
    print(
        f"features served {uncached.features / features:.0f}x faster from the cache than decoded and "
        f"computed; whole cached epochs {uncached.total / total:.1f}x faster, as {head_share:.0%} of a "
        "cached epoch is the head's own training step (forward, backward, optimizer), which a "
        "feature cache does not touch"
    )
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
