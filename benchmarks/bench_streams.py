"""Streams: a second pass over cached keys against the first; a cache-only pass against a map-style hit epoch.

Run from the repository root::

    python benchmarks/bench_streams.py                       # N=16384 128x128 PNG images, 16 tar shards
    python benchmarks/bench_streams.py --n 2048 --part passes  # scaled down for a busy machine
    python benchmarks/bench_streams.py --part cache-only       # the cache-only part alone

The source is WebDataset-style tar shards written with ``tarfile`` (``<key>.png``, ``<key>.cls``),
read as cheap records (streamed, ``tarfile`` mode ``r|``); ``decode`` turns the PNG into a float
tensor (Pillow; zlib-compressed arrays where Pillow is missing). A small frozen conv backbone makes
256 features per image, on one CPU thread.

Passes, for ``--workers`` 0 and 2 (each on a fresh store, ``split="source"``: each worker reads its
own shards): the first pass (stream, decode, compute, store) and the second (stream, look up by
key, read hits; ``cache_only=False``), ``--repeats`` times; every row of each second pass is
compared with the first. Ratio: first / second, best and range.

Cache-only: ``--cache-n`` samples (default 16384) of 32x32 images (hit epochs read the same 256
features whatever the image size, so they fill fast). A cache-only pass (``cache_only=True``: the
source is not opened, chunk-aware shuffle) against a map-style ``CachedFeatureDataset`` hit epoch
over the same decoded samples and module, read by a DataLoader with ``ChunkShuffleSampler``, both
batch 64 with ``default_collate``; epochs taken in turns after one warm-up epoch each. Ratios are
printed per epoch and as a range.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cachedfeatures import CachedFeatureDataset, CachedIterableDataset, ChunkShuffleSampler  # noqa: E402
from tests.tar_shards import TarShards, write_tar  # noqa: E402  (the tests' shards)

try:
    from PIL import Image
except ImportError:  # pragma: no cover - Pillow is optional
    Image = None

SIZE = 128
BATCH = 64


def encode(image: np.ndarray) -> tuple[str, bytes]:
    if Image is None:
        return "npz", zlib.compress(image.tobytes())
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return "png", buffer.getvalue()


def decode_image(suffix: str, data: bytes) -> np.ndarray:
    if suffix == "png" and Image is not None:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    flat = np.frombuffer(zlib.decompress(data), dtype=np.uint8)
    side = round((len(flat) // 3) ** 0.5)
    return flat.reshape(side, side, 3)


def write_shards(directory: Path, n: int, shards: int, size: int = SIZE) -> list[Path]:
    """Smooth images with some noise (they compress like photos do, a little)."""
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, size, dtype=np.float32)
    per_shard = -(-n // shards)
    paths = []
    for shard in range(shards):
        records = []
        for index in range(shard * per_shard, min((shard + 1) * per_shard, n)):
            a, b, c = rng.random(3)
            base = np.stack(
                [
                    grid[None, :] * a + grid[:, None] * b,
                    np.outer(grid, grid) * c,
                    grid[None, :] * b + 0 * grid[:, None],
                ],
                -1,
            )
            noise = rng.integers(0, 6, (size, size, 3))
            image = np.clip(np.broadcast_to(base, (size, size, 3)) * 230 + noise, 0, 255).astype(np.uint8)
            suffix, data = encode(image)
            records.append((f"{index:06d}", {suffix: data, "cls": str(index % 10).encode()}))
        paths.append(write_tar(directory / f"shard-{shard:04d}.tar", records))
    return paths


def decode(record: dict[str, Any]) -> tuple[torch.Tensor, int]:
    suffix = "png" if "png" in record else "npz"
    image = decode_image(suffix, record[suffix])
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(255), int(record["cls"])


class Backbone(nn.Module):
    """A small frozen conv net: 3x128x128 -> 256 features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128, 256),
        )
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoded(Dataset[Any]):
    """The same samples, map-style (decoded up front): the map-style path's dataset."""

    def __init__(self, paths: list[Path]) -> None:
        records = sorted(TarShards(paths, split_by_worker=True, stream=True), key=lambda r: r["__key__"])
        self.samples = [decode(record) for record in records]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.samples[index]


def stream(paths: list[Path], store: Path, **options: Any) -> CachedIterableDataset:
    return CachedIterableDataset(
        TarShards(paths, split_by_worker=True, stream=True),
        Backbone(),
        store,
        key="__key__",
        decode=decode,
        input_key=0,
        batch_size=BATCH,
        split="source",
        spot_check=0,
        module_version="bench",
        **options,
    )


def one_pass(cached: CachedIterableDataset, workers: int) -> tuple[float, list[torch.Tensor]]:
    start = time.perf_counter()
    out = []
    for features, labels in cached.loader(num_workers=workers):
        out.append(torch.cat([features, labels[:, None].float()], 1))
    return time.perf_counter() - start, out


def by_rows(batches: list[torch.Tensor]) -> torch.Tensor:
    """The rows in a fixed (lexicographic) order: the passes may serve them in different orders."""
    rows = torch.cat(batches)
    return rows[torch.from_numpy(np.lexsort(rows.numpy().T[::-1]).copy())]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument(
        "--cache-n",
        type=int,
        default=16384,
        help="samples of the cache-only part (32x32 images, same features)",
    )
    parser.add_argument(
        "--part", choices=["all", "passes", "cache-only"], default="all", help="measure only one part"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        if args.part != "cache-only":
            paths = write_shards(directory, args.n, args.shards)
            size = sum(path.stat().st_size for path in paths)
            kind = "PNG" if Image else "zlib"
            print(f"{args.n} samples of {SIZE}x{SIZE}, {args.shards} shards, {size / 1e6:.0f} MB ({kind})")
        for workers in args.workers if args.part != "cache-only" else []:
            store = directory / f"stream-{workers}.zarr"
            cached = stream(paths, store, cache_only=False)
            first, rows_first = one_pass(cached, workers)
            seconds = []
            for _ in range(args.repeats):
                second, rows_second = one_pass(cached, workers)
                seconds.append(second)
                if not torch.equal(by_rows(rows_first), by_rows(rows_second)):
                    raise SystemExit("second pass rows differ from the first")
            best = min(seconds)
            print(
                f"workers={workers}: first pass {first:.2f} s ({args.n / first:,.0f} rows/s), second pass "
                f"best {best:.3f} s ({args.n / best:,.0f} rows/s), ratio {first / best:.1f}x "
                f"(range {first / max(seconds):.1f}-{first / min(seconds):.1f}x over {args.repeats} runs), "
                "rows exact"
            )
            shutil.rmtree(store)

        if args.part == "passes":
            return
        # cache-only against the map-style hit epoch, same features and batch size. Hit epochs do
        # not depend on the image size (the features are 256 floats), so small images fill it fast.
        small = directory / "small"
        small.mkdir()
        paths = write_shards(small, args.cache_n, args.shards, size=32)
        args.n = args.cache_n
        print(f"cache-only part: {args.n} samples of 32x32, 256 features each, batch {BATCH}")
        store = directory / "stream.zarr"
        cached = stream(paths, store)
        one_pass(cached, 0)  # fills and records the complete pass
        cached.cache_only = True
        mapped = CachedFeatureDataset(
            Decoded(paths),
            Backbone(),
            directory / "map.zarr",
            module_version="bench",
            dataset_version="bench",
            spot_check=0,
            batch_size=BATCH,
        )
        mapped.prefill(progress=False)
        assert mapped.entry is not None
        chunk_rows = mapped.entry.chunk_rows

        def map_epoch(epoch: int) -> float:
            sampler = ChunkShuffleSampler(len(mapped), chunk_rows, seed=0)
            sampler.set_epoch(epoch)
            start = time.perf_counter()
            for _features, _labels in DataLoader(mapped, batch_size=BATCH, sampler=sampler):
                pass
            return time.perf_counter() - start

        def cache_epoch() -> float:
            start = time.perf_counter()
            for _features, _labels in cached.loader():
                pass
            assert cached.last_pass == "cache"
            return time.perf_counter() - start

        map_epoch(99), cache_epoch()  # warm: decoded chunks, page cache
        ratios = []
        for epoch in range(args.repeats):
            theirs, ours = map_epoch(epoch), cache_epoch()
            ratios.append(theirs / ours)
            print(
                f"cache-only shuffled pass {args.n / ours:,.0f} rows/s, map-style hit epoch "
                f"{args.n / theirs:,.0f} rows/s: ratio {theirs / ours:.2f}x"
            )
        print(f"cache-only / map-style: {min(ratios):.2f}-{max(ratios):.2f}x over {args.repeats} runs")


if __name__ == "__main__":
    main()
