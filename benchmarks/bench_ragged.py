"""Ragged (variable-length) features: a hit epoch against a NumPy memmap, and the bytes stored.

Run from the repository root::

    python benchmarks/bench_ragged.py                 # 4,096 rows, lengths 8..128 of 384 float32
    python benchmarks/bench_ragged.py --rows 16384    # the issue's setting (about 1.7 GB twice)

The cache is filled once with ``prefill()`` (a module returning one ``(L_i, 384)`` tensor per
sample, so the entry is ragged). Then hit epochs (batch 256, shuffled, ``DataLoader`` with
``num_workers=0`` and ``cached.pad_collate``: padded values plus lengths) are taken in turns
with epochs of a NumPy baseline that holds the same values as one flat memmap plus an
offsets array, slices rows out of it (no copy) and pads them with the same collate, in the
same order. A second baseline pads the memmap's rows with NumPy instead (``np.zeros`` then one
copy per row: the fastest simple padding, and what the cache's reader does), so the figure does
not hinge on ``pad_sequence``. Printed: each epoch's throughput, the ratios (cache / baseline)
in wall-clock time and in this process's CPU time (steadier on a shared machine), their
ranges, and the entry's stored bytes over the real values' bytes (``sum(L_i) * 384 * 4``).
torch runs with one intra-op thread (``--threads``): spinning OpenMP threads make
``pad_sequence`` erratic on a loaded machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cachedfeatures import CachedFeatureDataset, PadCollate, RaggedBatch  # noqa: E402

BATCH = 256
DIM = 384


def row_values(index: int, length: int) -> torch.Tensor:
    """The features of row ``index``: deterministic, the same for the cache and the baseline."""
    generator = torch.Generator().manual_seed(index)
    return torch.randn(length, DIM, generator=generator)


class Indices(Dataset[Any]):
    """Raw samples: the row index (the module's input) and a label."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        return torch.tensor(index), index % 10


class TokenFeatures(nn.Module):
    """One ``(L_i, 384)`` tensor per sample: a ragged output."""

    def __init__(self, lengths: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("lengths", torch.from_numpy(lengths))

    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        return [row_values(int(i), int(self.lengths[int(i)])) for i in batch]


class Memmap(Dataset[Any]):
    """The baseline: the same values in one flat memmap plus offsets; rows are views of it."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        self.values = values
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitems__(self, indices: list[int]) -> list[Any]:
        offsets, values = self.offsets, self.values
        return [(torch.from_numpy(values[offsets[i] : offsets[i + 1]]), i % 10) for i in indices]

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]


class NumpyPad:
    """The second baseline's collate: features padded with NumPy, labels stacked."""

    def __call__(self, batch: list[Any]) -> tuple[RaggedBatch, torch.Tensor]:
        rows = [row for row, _ in batch]
        lengths = np.array([len(row) for row in rows], dtype=np.int64)
        padded = np.zeros((len(rows), int(lengths.max()), DIM), dtype=np.float32)
        for k, row in enumerate(rows):
            padded[k, : lengths[k]] = row
        labels = torch.tensor([label for _, label in batch])
        return RaggedBatch(torch.from_numpy(padded), torch.from_numpy(lengths)), labels


def epoch(dataset: Dataset[Any], order: list[int], collate: Any) -> tuple[float, float, int]:
    """Wall and CPU seconds for one pass over ``order`` in batches, and the values seen."""
    loader = DataLoader(dataset, batch_size=BATCH, sampler=order, collate_fn=collate, num_workers=0)
    start, cpu = time.perf_counter(), time.process_time()
    seen = 0
    for features, _labels in loader:
        seen += int(features.lengths.sum())
    return time.perf_counter() - start, time.process_time() - cpu, seen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--pairs", type=int, default=5, help="cache/memmap epoch pairs")
    parser.add_argument("--compressor", choices=["none", "default"], default="none")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lengths = np.random.default_rng(0).integers(8, 129, args.rows).astype(np.int64)
    real_bytes = int(lengths.sum()) * DIM * 4
    work = Path(tempfile.mkdtemp(prefix="bench_ragged_"))
    try:
        store = work / "features.zarr"
        cached = CachedFeatureDataset(
            Indices(args.rows),
            TokenFeatures(lengths).eval(),
            store,
            compressor=None if args.compressor == "none" else "default",
            spot_check=0,
        )
        start = time.perf_counter()
        cached.prefill(progress=False)
        fill = time.perf_counter() - start
        entry = cached.entry
        assert entry is not None and entry.valid_mask().all()

        offsets = np.zeros(args.rows + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths)
        values = np.lib.format.open_memmap(
            work / "values.npy", mode="w+", dtype=np.float32, shape=(int(offsets[-1]), DIM)
        )
        for i in range(args.rows):
            values[offsets[i] : offsets[i + 1]] = row_values(i, int(lengths[i])).numpy()
        values.flush()
        values = np.load(work / "values.npy", mmap_mode="r+")  # writable: torch.from_numpy views it
        baseline = Memmap(values, offsets)

        # The same collate for both: pad position 0 (the features) in every batch.
        collate = PadCollate([(0,)])
        check = collate([cached[5], cached[6]])
        assert torch.equal(check[0].values[0, : lengths[5]], row_values(5, int(lengths[5])))

        stored = entry.nbytes_stored()
        print(
            f"rows {args.rows}, lengths 8..128 (mean {lengths.mean():.1f}), {DIM} float32, "
            f"compressor {args.compressor}, chunk_rows {entry.chunk_rows}; fill (prefill) {fill:.1f} s"
        )
        print(
            f"stored bytes {stored / 2**20:.1f} MiB / real values' bytes {real_bytes / 2**20:.1f} MiB "
            f"= {stored / real_bytes:.3f}x (target <= 1.15x)"
        )
        rng = np.random.default_rng(1)
        epoch(cached, rng.permutation(args.rows).tolist(), collate)  # warm: chunk cache, page cache
        epoch(baseline, rng.permutation(args.rows).tolist(), collate)
        baselines = {"memmap + pad_collate": collate, "memmap + NumPy pad": NumpyPad()}
        ratios: dict[str, list[tuple[float, float]]] = {name: [] for name in baselines}
        for turn in range(args.pairs):
            order = rng.permutation(args.rows).tolist()
            ours, ours_cpu, seen = epoch(cached, order, collate)
            assert seen == int(lengths.sum())
            line = [f"turn {turn}: cache {args.rows / ours:,.0f} rows/s"]
            for name, baseline_collate in baselines.items():
                theirs, theirs_cpu, seen = epoch(baseline, order, baseline_collate)
                assert seen == int(lengths.sum())
                ratios[name].append((theirs / ours, theirs_cpu / ours_cpu))
                line.append(f"{name} {args.rows / theirs:,.0f} rows/s ({theirs / ours:.2f}x)")
            print(", ".join(line))
        for name, pairs in ratios.items():
            for what, values_ in (("wall", [p[0] for p in pairs]), ("CPU time", [p[1] for p in pairs])):
                print(
                    f"hit epoch / {name} ({what}): {min(values_):.2f}x .. {max(values_):.2f}x "
                    f"(median {float(np.median(values_)):.2f}x; target >= 0.7x)"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
