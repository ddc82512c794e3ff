"""Benchmark ``@cached_module`` against torchcache on torchcache's workload.

The workload torchcache is built for: a frozen vision backbone inside a model, called on
batches of images. Here a ViT-style patch embedding (16x16 patches to 768 channels, mean
pooled) on 3x112x112 float32 images, 150,528 bytes per row, batches of 64. Both caches wrap
the same module class and see the same inputs, and their outputs are checked against the
uncached module.

Measured, in rows per second (median of ``--repeat`` runs):
  - hashing 150 KB rows: our XXH3-128 over every byte, BLAKE2b over every byte, and
    torchcache's subsampled weighted sum;
  - for each cache and tier (memory only; persistent on disk): the miss pass (empty cache,
    every row computed and stored) and the hit pass (every row cached). The persistent hit
    passes use a fresh instance with the memory tier off, as a new training run would: once
    in the order the rows were written, once shuffled (a shuffled epoch).
Also reported: bytes held in memory and bytes on disk by each cache.

Run:  python benchmarks/bench_module_cache.py [--quick] [--rows N] [--out FILE]
Writes JSON to benchmarks/results/module_cache.json (gitignored) and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import nn
from torchcache import torchcache  # type: ignore[import-untyped]
from torchcache.torchcache import _TorchCache  # type: ignore[import-untyped]

from cachedfeatures import cached_module
from cachedfeatures.row_keys import gather_inputs, row_keys

SHAPE = (3, 112, 112)  # 150,528 bytes per float32 row
BATCH = 64


class PatchEmbed(nn.Module):
    """A ViT-style stem: 16x16 patches to 768 channels, mean pooled: (B, 768) features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv2d(3, 768, kernel_size=16, stride=16)
        self.norm = nn.LayerNorm(768)
        self.requires_grad_(False)  # torchcache asserts this in __init__
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).mean(dim=2))  # type: ignore[no-any-return]


def fresh_class() -> type[PatchEmbed]:
    """A new subclass per use: torchcache shares one cache per decorated class."""
    return type("PatchEmbed", (PatchEmbed,), {})


def ours(store: Path | None, memory: bool) -> nn.Module:
    options: dict[str, Any] = {"store": store}
    if not memory:
        options["max_memory_bytes"] = 0
    return cached_module(**options)(fresh_class())()  # type: ignore[no-any-return]


def theirs(store: Path | None, memory: bool) -> nn.Module:
    options: dict[str, Any] = {}
    if store is not None:
        options.update(persistent=True, persistent_cache_dir=str(store))
    if not memory:
        options["max_memory_cache_size"] = 0
    return torchcache(**options)(fresh_class())()  # type: ignore[no-any-return]


def passes(module: nn.Module, data: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One pass over ``data`` in batches; returns (seconds, outputs).

    Each output is cloned: torchcache returns a full hit as a view of an internal buffer
    that its next call overwrites, so keeping its outputs needs a copy (ours are fresh).
    """
    outputs = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(data), BATCH):
            outputs.append(module(data[i : i + BATCH]).clone())
    return time.perf_counter() - start, torch.cat(outputs)


def disk_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.name.endswith(".partial"))


def memory_bytes(module: nn.Module) -> int:
    if hasattr(module, "module_cache"):
        memory = module.module_cache.memory
        return 0 if memory is None else int(memory.nbytes)
    return int(module.cache_instance.memory_cache_size)


def run_cache(
    name: str,
    make: Callable[[Path | None, bool], nn.Module],
    data: torch.Tensor,
    expected: torch.Tensor,
    tmp: Path,
) -> dict[str, Any]:
    """Miss and hit passes, memory-only and persistent, for one cache library."""
    results: dict[str, Any] = {}
    memory_module = make(None, True)
    miss_s, out = passes(memory_module, data)
    hit_s, again = passes(memory_module, data)
    for got in (out, again):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    results["memory"] = {
        "miss_rows_per_s": len(data) / miss_s,
        "hit_rows_per_s": len(data) / hit_s,
        "memory_bytes": memory_bytes(memory_module),
    }
    store = tmp / f"{name}-store"
    writer = make(store, False)
    miss_s, out = passes(writer, data)
    reader = make(store, False)  # a new run: nothing in memory, everything on disk
    hit_s, again = passes(reader, data)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
    shuffled_s, shuffled = passes(make(store, False), data[order])  # a new run, shuffled epoch
    for got, want in ((out, expected), (again, expected), (shuffled, expected[order])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    results["persistent"] = {
        "miss_rows_per_s": len(data) / miss_s,
        "hit_rows_per_s": len(data) / hit_s,
        "shuffled_hit_rows_per_s": len(data) / shuffled_s,
        "disk_bytes": disk_bytes(store),
    }
    return results


def hash_rates(rows: int) -> dict[str, float]:
    data = torch.randn(rows, *SHAPE)
    raw = data.reshape(rows, -1).view(torch.uint8).numpy()
    rates = {}
    start = time.perf_counter()
    row_keys(gather_inputs((data,), {}))
    rates["xxh3_128 (ours)"] = rows / (time.perf_counter() - start)
    start = time.perf_counter()
    for row in raw:
        hashlib.blake2b(row, digest_size=16).digest()
    rates["blake2b"] = rows / (time.perf_counter() - start)
    start = time.perf_counter()
    for row in raw:
        xxhash.xxh3_128_digest(row)
    rates["xxh3_128 raw loop"] = rows / (time.perf_counter() - start)
    tc = _TorchCache(
        memory_cache_device="cpu",
        subsample_count=10000,
        persistent=False,
        persistent_cache_dir=None,
        persistent_module_hash=None,
        max_persistent_cache_size=int(10e9),
        max_memory_cache_size=int(1e9),
        zstd_compression=False,
        zstd_compression_level=3,
        zstd_compression_threads=1,
        cache_dtype=None,
        use_mmap_on_load=False,
    )
    start = time.perf_counter()
    tc.hash_tensor(data.flatten(1))
    rates["torchcache subsampled"] = rows / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="512 rows, one repeat (under a minute)")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier timings)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "module_cache.json")
    args = parser.parse_args()
    rows, repeat = (512, 1) if args.quick else (args.rows, args.repeat)
    torch.set_num_threads(args.threads)

    data = torch.randn(rows, *SHAPE, generator=torch.Generator().manual_seed(0))
    module = PatchEmbed()
    plain_s, expected = passes(module, data)

    runs: dict[str, list[dict[str, Any]]] = {"cachedfeatures": [], "torchcache": []}
    hashes = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        os.environ.setdefault("CACHEDFEATURES_LOCK_DIR", str(Path(tmp_dir) / "locks"))
        for attempt in range(repeat):
            hashes.append(hash_rates(min(rows, 512)))
            for name, make in (("cachedfeatures", ours), ("torchcache", theirs)):
                tmp = Path(tmp_dir) / f"{attempt}"
                tmp.mkdir(exist_ok=True)
                runs[name].append(run_cache(name, make, data, expected, tmp))
                shutil.rmtree(tmp / f"{name}-store", ignore_errors=True)

    def median(name: str, tier: str, metric: str) -> float:
        return statistics.median(run[tier][metric] for run in runs[name])

    table = []
    for tier, metrics in (
        ("memory", ("miss_rows_per_s", "hit_rows_per_s", "memory_bytes")),
        ("persistent", ("miss_rows_per_s", "hit_rows_per_s", "shuffled_hit_rows_per_s", "disk_bytes")),
    ):
        for metric in metrics:
            mine, other = median("cachedfeatures", tier, metric), median("torchcache", tier, metric)
            table.append(
                {
                    "tier": tier,
                    "metric": metric,
                    "cachedfeatures": mine,
                    "torchcache": other,
                    "ratio": mine / other if other else float("inf"),
                }
            )
    hash_table = {name: statistics.median(h[name] for h in hashes) for name in hashes[0]}

    print(
        f"rows={rows} batch={BATCH} row bytes={data[0].numel() * 4:,} repeat={repeat} "
        f"threads={torch.get_num_threads()}; uncached module: {rows / plain_s:,.0f} rows/s"
    )
    print(f"{'tier':<11}{'metric':<24}{'cachedfeatures':>16}{'torchcache':>16}{'ratio':>9}")
    for line in table:
        print(
            f"{line['tier']:<11}{line['metric']:<24}{line['cachedfeatures']:>16,.0f}"
            f"{line['torchcache']:>16,.0f}{line['ratio']:>8.2f}x"
        )
    print("hashing 150 KB rows (rows/s): " + ", ".join(f"{k} {v:,.0f}" for k, v in hash_table.items()))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "rows": rows,
        "batch": BATCH,
        "row_bytes": data[0].numel() * 4,
        "repeat": repeat,
        "uncached_rows_per_s": rows / plain_s,
        "table": table,
        "hash_rows_per_s": hash_table,
        "runs": runs,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
