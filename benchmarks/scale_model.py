"""A 100M-row entry on an object store, on paper, with what can be measured at small scale.

Part 1 (the model) is arithmetic from the store format: a 100M-row entry of 768 float16
features and one int64 label, chunked as the library would chunk it: how many chunks and
objects, how big, how big ``valid`` / ``access`` / ``chunk_crc`` are and how often they are
written, and how many requests per second a rank makes in prefill and in a training epoch,
given a compute rate per rank.

Part 2 (measured) fills an entry with the same number of rows per chunk but ``--scale`` times
fewer chunks (default 1/100: 977 chunks), with 16 float16 features instead of 768 so that the
loopback moto server holds it in memory: the number of objects and requests is that of the real
entry at that scale, the bytes are not. It counts the S3 requests (s3fs calls, by operation) of
entry creation, prefill (one process), opening the entry and reading ``valid`` in another
process's way, a budget's measurement of the store (``max_bytes``), and one epoch of reads, and
times each. Then it scales those counts up to 100M rows.

    python benchmarks/scale_model.py                 # model + measurement at 1/100
    python benchmarks/scale_model.py --scale 1000    # faster: 1/1000 (98 chunks)
    python benchmarks/scale_model.py --no-measure    # the model only
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from cachedfeatures import CachedFeatureDataset, FeatureStore
from cachedfeatures.pruning import measure
from cachedfeatures.store.access import DEFAULT_FLUSH_EVERY
from cachedfeatures.store.feature_store import default_chunk_rows

ROWS, FEATURES, FEATURE_BYTES, LABEL_BYTES = 100_000_000, 768, 2, 8
MiB = 1024 * 1024


def model(ranks: int, rows_per_second: float, read_rows_per_second: float) -> dict[str, float]:
    """The 100M-row entry by arithmetic; prints it and returns the figures part 2 scales."""
    row_bytes = FEATURES * FEATURE_BYTES
    chunk_rows = default_chunk_rows(row_bytes, ROWS)
    chunks = -(-ROWS // chunk_rows)
    arrays = 2  # features, label
    objects_per_chunk = arrays + 2  # + valid, chunk_crc (one object per chunk each)
    access_objects = -(-chunks // 65536)
    print("== Model: 100M rows x 768 float16 (+ an int64 label), default chunking ==")
    print(f"rows per chunk (default_chunk_rows): {chunk_rows}")
    print(f"feature chunk: {chunk_rows * row_bytes / MiB:.2f} MiB uncompressed; chunks per array: {chunks:,}")
    print(f"features: {ROWS * row_bytes / 1e9:.0f} GB; label: {ROWS * LABEL_BYTES / 1e9:.1f} GB")
    print(
        f"objects: {objects_per_chunk} per chunk -> {chunks * objects_per_chunk:,} "
        f"(+ {access_objects} access)"
    )
    print(f"valid: {ROWS / 1e6:.0f} MB as bool, {chunks:,} objects of {chunk_rows} B (compressed: less)")
    print(
        f"chunk_crc: {chunks:,} objects of {arrays * 2 * 4} B; "
        f"access: {chunks * 16 / MiB:.2f} MiB in {access_objects}"
    )
    print(f"  access is flushed by every process every {DEFAULT_FLUSH_EVERY:g} s (read-merge-write)")
    listing = chunks * objects_per_chunk
    print(f"listing the entry: {listing / 1000:,.0f} LIST pages of 1000 keys (s3fs: sizes come with them)")
    chunks_per_s = rows_per_second / chunk_rows
    # per chunk written: PUT features, PUT label, GET+PUT valid, GET+PUT chunk_crc (measured below)
    print(f"prefill at {rows_per_second:,.0f} rows/s per rank: {chunks_per_s:.2f} chunks/s per rank")
    print(
        f"  {ranks} ranks: {ranks * chunks_per_s:.0f} chunks/s, "
        f"{ranks * rows_per_second * row_bytes / 1e9:.2f} GB/s"
    )
    read_chunks_per_s = read_rows_per_second / chunk_rows
    print(
        f"training at {read_rows_per_second:,.0f} rows/s per rank: {read_chunks_per_s:.1f} chunks/s per rank"
    )
    print(f"  whole epoch: {ROWS / (ranks * read_rows_per_second) / 60:.1f} min on {ranks} ranks")
    return {
        "chunk_rows": chunk_rows,
        "chunks": chunks,
        "chunks_per_s": chunks_per_s,
        "read_chunks_per_s": read_chunks_per_s,
    }


class Vectors(Dataset[Any]):
    """``n`` rows of ``(16 float16 values, label)``, made from the index."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        return torch.full((16,), float(index % 1000), dtype=torch.float16), index % 10


@contextmanager
def counting() -> Iterator[collections.Counter[str]]:
    """Count s3fs's S3 calls by operation while the block runs."""
    import s3fs

    counts: collections.Counter[str] = collections.Counter()
    original = s3fs.S3FileSystem._call_s3

    async def counted(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        counts[method] += 1
        return await original(self, method, *args, **kwargs)

    s3fs.S3FileSystem._call_s3 = counted  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        s3fs.S3FileSystem._call_s3 = original  # type: ignore[method-assign]


def _show(what: str, counts: collections.Counter[str], seconds: float, per: float, unit: str) -> float:
    total = sum(counts.values())
    ops = ", ".join(f"{name} {count}" for name, count in counts.most_common())
    print(f"{what}: {total} requests in {seconds:.2f} s ({total / per:.2f} per {unit}; {ops})")
    return total / per


def measured(scale: int, figures: dict[str, float]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_ddp_fill import moto_server, new_bucket  # the loopback server, shared with that benchmark

    chunk_rows, chunks = int(figures["chunk_rows"]), int(figures["chunks"])
    n = (chunks // scale) * chunk_rows
    print(f"\n== Measured on loopback moto: {chunks // scale} chunks of {chunk_rows} rows (1/{scale}) ==")
    with moto_server() as options:
        url = new_bucket(options)
        data, module = Vectors(n), nn.Identity()
        make = lambda: CachedFeatureDataset(  # noqa: E731
            data,
            module,
            url,
            chunk_rows=chunk_rows,
            batch_size=chunk_rows,
            storage_options=options,
            spot_check=0,
        )
        with counting() as counts:
            started = time.perf_counter()
            cached = make()
            creation = time.perf_counter() - started
        _show("create the entry", counts, creation, 1, "entry")
        with counting() as counts:
            started = time.perf_counter()
            cached.prefill(progress=False)
            seconds = time.perf_counter() - started
        per_chunk = _show("prefill (1 process)", counts, seconds, chunks // scale, "chunk")
        with counting() as counts:
            started = time.perf_counter()
            store = FeatureStore.open(url, mode="r", storage_options=options)
            entry = store.entry(cached.entry_name)
            assert entry is not None
            valid = entry.valid_mask()
            opening = time.perf_counter() - started
        assert valid.all()
        open_requests = _show("open + read valid", counts, opening, chunks // scale, "chunk")
        with counting() as counts:
            started = time.perf_counter()
            usage = measure(store)
            measuring = time.perf_counter() - started
        _show(f"measure the store ({usage.total / MiB:.1f} MiB)", counts, measuring, chunks // scale, "chunk")
        with counting() as counts:
            started = time.perf_counter()
            for start in range(0, n, 16 * chunk_rows):
                entry.read(np.arange(start, min(n, start + 16 * chunk_rows)))
            reading = time.perf_counter() - started
        read_per_chunk = _show("read every row, in chunk order", counts, reading, chunks // scale, "chunk")

    print(f"\n== Scaled to 100M rows ({chunks:,} chunks) ==")
    print(
        f"prefill: {per_chunk:.1f} requests per chunk -> "
        f"{per_chunk * figures['chunks_per_s']:.1f} req/s per rank"
    )
    print(
        f"open + valid_mask: {open_requests * chunks:,.0f} requests per process "
        "(every rank, at every prefill start)"
    )
    print(f"  at the measured rate: {opening * scale:.0f} s per process on this loopback server")
    print(
        f"budget measure (max_bytes): {measuring * scale:.0f} s per chunk written, per process, at this rate"
    )
    print(
        f"training: {read_per_chunk:.1f} requests per chunk -> "
        f"{read_per_chunk * figures['read_chunks_per_s']:.1f} req/s per rank"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--rows-per-second", type=float, default=2000.0, help="prefill rate per rank (a GPU)")
    parser.add_argument(
        "--read-rows-per-second", type=float, default=50_000.0, help="training reads per rank"
    )
    parser.add_argument("--scale", type=int, default=100)
    parser.add_argument("--no-measure", action="store_true")
    args = parser.parse_args()
    figures = model(args.ranks, args.rows_per_second, args.read_rows_per_second)
    if not args.no_measure:
        measured(args.scale, figures)


if __name__ == "__main__":
    main()
