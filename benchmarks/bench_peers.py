"""Hit epochs of cached features against Hugging Face ``datasets`` and litdata, on the same rows.

Run from the repository root::

    python benchmarks/bench_peers.py            # 65,536 rows of 384 float32 + an int label
    python benchmarks/bench_peers.py --quick    # 32,768 rows, 2 repeats (about a minute)

Each library holds the features that ``bench_read.py``'s frozen backbone computes for the same
65,536 rows, and serves them shuffled through a torch ``DataLoader`` (batch 256) at
``num_workers`` 0 and 2, from a warm page cache:

- cachedfeatures: ``DataLoader(CachedFeatureDataset(...), shuffle=True)`` on a filled store (raw
  float32 chunks of ``--chunk-rows`` rows); also its faster idioms, ``cached.loader(shuffle=True,
  num_workers=...)`` (thread workers) and the batch recipe ``DataLoader(cached, batch_size=None,
  sampler=cached.batch_sampler(256, shuffle=True))``.
- Hugging Face ``datasets``: ``Dataset.from_dict`` + ``map`` (the backbone run in the ``map``, a
  fixed-size float32 list column) into an Arrow cache file on disk, then ``with_format("torch")``
  and ``DataLoader(shuffle=True)``; also its fastest shuffled idiom found here
  (``with_format("numpy")``, a ``BatchSampler`` handing it one batch of indices per call).
- litdata: ``litdata.optimize`` to a local directory (chunks of ``--chunk-rows`` items, as ours),
  then ``StreamingDataset(shuffle=True)`` through its ``StreamingDataLoader``. litdata's shuffle
  permutes chunks and serves each chunk's items in shuffled aligned blocks of
  ``item_shuffle_window`` items (256 by default, ``litdata/streaming/shuffle.py``): at batch 256,
  every batch is one block of 256 consecutive rows. Also measured: ``item_shuffle_window=0``
  (the whole chunk permuted, so a batch still comes from one chunk), with
  ``batch_decode="all"`` (about 80x faster at workers 2 in one run than its default window,
  which decodes 256 items for every item asked for out of order); and a real per-item
  shuffle, a map-style wrapper over ``StreamingDataset.__getitem__`` in a
  ``DataLoader(shuffle=True)`` (``batch_decode=0``, its fastest for random items; the first
  ``--per-item-batches`` batches, as its rate does not depend on N).

What each loader served is checked in an untimed epoch: every row exactly once with the right
features, and how many ``--chunk-rows`` blocks of rows a batch spans (about 60 for a real shuffle
of 65,536 rows, 1 for a block). Hit epochs are taken in turns (one epoch of each loader per
round, ``--repeats`` rounds) and the best of each is kept; ratios are ours / peer. The table is
printed and written as JSON under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # litdata asks PyPI for a newer version

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_read import BATCH, OUT_DIM, ROOT, Backbone, RawImages, cached_dataset, epoch_rate, write_report

from cachedfeatures import CachedFeatureDataset

# Filled by main() before litdata.optimize forks its worker: the rows it writes.
_ROWS: dict[str, np.ndarray] = {}
_OPTIMIZE_BLOCK = 4096


def litdata_rows(start: int) -> Iterator[dict[str, Any]]:
    """litdata.optimize's function: yields the items of rows ``start`` to ``start + 4096``."""
    features, labels = _ROWS["features"], _ROWS["labels"]
    for row in range(start, min(start + _OPTIMIZE_BLOCK, len(labels))):
        yield {"features": features[row].copy(), "label": int(labels[row])}


class ByIndex(Dataset[Any]):
    """A map-style view of a litdata ``StreamingDataset`` (``dataset[i]``), for a real shuffle."""

    def __init__(self, streaming: Any) -> None:
        self.streaming = streaming

    def __len__(self) -> int:
        return len(self.streaming)

    def __getitem__(self, index: int) -> Any:
        return self.streaming[index]


def batch_features(batch: Any) -> torch.Tensor:
    """The feature tensor of a batch: ours is a ``(features, labels)`` pair, the peers' a dict."""
    features = batch["features"] if isinstance(batch, dict) else batch[0]
    return torch.as_tensor(features)


class Mode(NamedTuple):
    """How the DataLoader runs: worker processes, kept between epochs or not."""

    workers: int
    persistent: bool

    def __str__(self) -> str:
        return f"workers {self.workers}{' persistent' if self.persistent else ''}"


Factory = Callable[[Mode, int], Iterable[Any]]  # (mode, seed) -> the batches of an epoch


class Contestant:
    """One way of serving the rows: a factory of loaders, and the rates of its epochs per mode."""

    def __init__(self, name: str, loader: Factory, max_batches: int | None) -> None:
        self.name = name
        self.loader = loader
        self.max_batches = max_batches
        self.rates: dict[Mode, list[float]] = {}
        self._kept: dict[Mode, Iterable[Any]] = {}

    def epoch(self, mode: Mode, seed: int) -> float:
        """Rows per second (wall clock) of one epoch, or of its first ``max_batches`` batches.

        Persistent workers: one loader for every epoch of the mode, so its workers (and what
        they hold) live on; otherwise a new loader, whose workers start (forked) every epoch.
        """
        if mode.persistent:
            loader = self._kept.setdefault(mode, self.loader(mode, 0))
        else:
            loader = self.loader(mode, seed)
        rows = 0
        start = time.perf_counter()
        for batches, batch in enumerate(loader, start=1):
            rows += len(batch_features(batch))
            if self.max_batches is not None and batches >= self.max_batches:
                break
        rate = rows / (time.perf_counter() - start)
        self.rates.setdefault(mode, []).append(rate)
        return rate

    def close(self) -> None:
        """Stop the persistent workers."""
        self._kept.clear()


def check_order(contestant: Contestant, workers: int, features: np.ndarray, block: int) -> dict[str, Any]:
    """One untimed epoch: were the right rows served, once each, and how far apart were a batch's rows?"""
    head = np.ascontiguousarray(features[:, :4])
    index = {row.tobytes(): i for i, row in enumerate(head)}
    if len(index) != len(features):
        raise RuntimeError("the first 4 features do not tell the rows apart; pick another seed")
    seen: list[np.ndarray] = []
    for batches, batch in enumerate(contestant.loader(Mode(workers, False), 0), start=1):
        served = batch_features(batch).numpy()
        served_head = np.ascontiguousarray(served[:, :4])
        rows = np.array([index.get(row.tobytes(), -1) for row in served_head])
        for at in np.flatnonzero(rows < 0):  # computed in another batch (the probe's row): other last bits
            rows[at] = int(np.abs(features - served[at]).max(axis=1).argmin())
        if not np.allclose(features[rows], served, rtol=0, atol=1e-5):
            raise RuntimeError(f"{contestant.name} served rows that are not the features")
        seen.append(rows)
        if contestant.max_batches is not None and batches >= contestant.max_batches:
            break
    every = np.concatenate(seen)
    complete = contestant.max_batches is None
    if complete and not np.array_equal(np.sort(every), np.arange(len(features))):
        raise RuntimeError(f"{contestant.name} did not serve every row exactly once in an epoch")
    full = [rows for rows in seen if len(rows) == BATCH]
    return {
        "batches_checked": len(seen),
        "every_row_once": complete,
        "blocks_per_batch": float(np.mean([len(np.unique(rows // block)) for rows in full])),
        "consecutive_batches": float(np.mean([rows.max() - rows.min() + 1 == len(rows) for rows in full])),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    import litdata

    datasets.disable_progress_bars()
    n, chunk_rows = args.rows, args.chunk_rows
    workdir = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    opened: list[CachedFeatureDataset] = []
    os.environ.setdefault("CACHEDFEATURES_LOCK_DIR", str(workdir / "locks"))
    builds: dict[str, float] = {}
    try:
        data = RawImages(n)
        module = Backbone()
        # In the fill's batches (a chunk each, in order), so that every library holds the same bits.
        with torch.inference_mode():
            blocks = [
                module(torch.from_numpy(data.inputs[i : i + chunk_rows])) for i in range(0, n, chunk_rows)
            ]
        features = torch.cat(blocks).numpy()

        # cachedfeatures: filled in order a chunk per batch, as a prefill would.
        store = workdir / "features.zarr"
        start = time.perf_counter()
        filling = cached_dataset(data, store, chunk_rows=chunk_rows)
        opened.append(filling)
        epoch_rate(filling, batch_size=chunk_rows)
        builds["cachedfeatures"] = time.perf_counter() - start
        # Spot checks off, as the peers check nothing: with them, a forked DataLoader worker runs the
        # module, and after cached.loader() ran it in a thread of this process, MKL was seen to spin
        # forever in such a worker (docs/limitations.md).
        cached = cached_dataset(data, store, chunk_rows=chunk_rows, spot_check=0)
        opened.append(cached)
        epoch_rate(cached, shuffle=True)  # the first hit epoch decodes every chunk once

        # Hugging Face datasets: the backbone run in a batched map, into an Arrow file on disk.
        def compute(batch: dict[str, list[int]]) -> dict[str, np.ndarray]:
            rows = np.asarray(batch["index"])
            with torch.inference_mode():
                out = module(torch.from_numpy(data.inputs[rows])).numpy()
            return {"features": out, "label": data.labels[rows]}

        schema = datasets.Features(
            {
                "features": datasets.List(datasets.Value("float32"), length=OUT_DIM),
                "label": datasets.Value("int64"),
            }
        )
        start = time.perf_counter()
        arrow = datasets.Dataset.from_dict({"index": np.arange(n)}).map(
            compute,
            batched=True,
            batch_size=chunk_rows,
            remove_columns=["index"],
            features=schema,
            cache_file_name=str(workdir / "hf" / "features.arrow"),
        )
        builds["datasets"] = time.perf_counter() - start
        assert arrow.cache_files, "the map's output is not an Arrow file on disk"
        hf_torch = arrow.with_format("torch")
        hf_numpy = arrow.with_format("numpy")

        # litdata: optimize to a local directory, chunks of chunk_rows items as ours.
        _ROWS.update(features=features, labels=data.labels)
        start = time.perf_counter()
        litdata.optimize(
            fn=litdata_rows,
            inputs=list(range(0, n, _OPTIMIZE_BLOCK)),
            output_dir=str(workdir / "litdata"),
            chunk_size=chunk_rows,
            num_workers=1,
            start_method="fork",
            verbose=False,
        )
        builds["litdata"] = time.perf_counter() - start
        lit_dir = str(workdir / "litdata")

        def generator(seed: int) -> torch.Generator:
            return torch.Generator().manual_seed(seed)

        def plain(dataset: Dataset[Any]) -> Factory:
            """``DataLoader(dataset, shuffle=True)``."""

            def loader(mode: Mode, seed: int) -> Iterable[Any]:
                return DataLoader(
                    dataset,
                    batch_size=BATCH,
                    shuffle=True,
                    num_workers=mode.workers,
                    persistent_workers=mode.persistent,
                    generator=generator(seed),
                )

            return loader

        def batched(dataset: Dataset[Any], batches: Callable[[int], Iterable[Any]]) -> Factory:
            """``DataLoader(dataset, batch_size=None, sampler=batches(seed))``: indices a batch per call."""

            def loader(mode: Mode, seed: int) -> Iterable[Any]:
                return DataLoader(
                    dataset,
                    sampler=batches(seed),  # type: ignore[arg-type]
                    batch_size=None,
                    num_workers=mode.workers,
                    persistent_workers=mode.persistent,
                )

            return loader

        def hf_batches(seed: int) -> BatchSampler:
            return BatchSampler(RandomSampler(hf_numpy, generator=generator(seed)), BATCH, drop_last=False)

        hf_batched = batched(hf_numpy, hf_batches)

        def lit(window: int | None, decode: int | str) -> Factory:
            def loader(mode: Mode, seed: int) -> Iterable[Any]:
                streaming = litdata.StreamingDataset(
                    lit_dir, shuffle=True, seed=seed, item_shuffle_window=window, batch_decode=decode
                )
                return litdata.StreamingDataLoader(
                    streaming, batch_size=BATCH, num_workers=mode.workers, persistent_workers=mode.persistent
                )

            return loader

        def ours_loader(mode: Mode, seed: int) -> Iterable[Any]:
            # Thread workers (the loader's default); a loader kept between epochs keeps its threads.
            return cached.loader(BATCH, shuffle=True, seed=seed, num_workers=mode.workers)

        def ours_batches(seed: int) -> Iterable[Any]:
            return cached.batch_sampler(BATCH, shuffle=True, generator=generator(seed))

        ours_recipe = batched(cached, ours_batches)

        per_item = args.per_item_batches
        contestants = [
            Contestant("cachedfeatures, shuffle=True", plain(cached), None),
            Contestant('datasets, with_format("torch"), shuffle=True', plain(hf_torch), None),
            Contestant('datasets, with_format("numpy"), a batch of indices per call', hf_batched, None),
            Contestant("litdata, shuffle=True (blocks of 256 consecutive rows)", lit(None, "auto"), None),
            Contestant(
                'litdata, shuffle=True, item_shuffle_window=0, batch_decode="all" (one chunk per batch)',
                lit(0, "all"),
                None,
            ),
            Contestant(
                f"litdata, per-item shuffle via dataset[i] (first {per_item} batches)",
                plain(ByIndex(litdata.StreamingDataset(lit_dir, batch_decode=0))),
                per_item,
            ),
            # Our own faster idioms, as datasets' batch of indices per call is its own (after the
            # peers, so the indices above stay as they are).
            Contestant("cachedfeatures, cached.loader(shuffle=True) (thread workers)", ours_loader, None),
            Contestant("cachedfeatures, batch_sampler recipe (a batch per call)", ours_recipe, None),
        ]
        checks: dict[str, dict[str, Any]] = {}
        for contestant in contestants:
            checks[contestant.name] = check_order(contestant, 0, features, chunk_rows)
        # litdata splits chunks between workers: check that its batches are still blocks there.
        checks[contestants[3].name + ", workers 2"] = check_order(contestants[3], 2, features, chunk_rows)

        print(
            f"rows {n} x {OUT_DIM} float32 + int label, batch {BATCH}, chunks of {chunk_rows} rows, "
            "warm page cache"
        )
        print("build (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in builds.items()))
        modes = [Mode(w, False) for w in args.workers] + [Mode(w, True) for w in args.workers if w > 0]
        for mode in modes:
            if mode.workers == 0 or mode.persistent:  # warm what lives on between epochs
                for contestant in contestants:
                    contestant.epoch(mode, 0)
                    contestant.rates[mode] = []
            for repeat in range(args.repeats):  # in turns, so drift hits all alike
                for contestant in contestants:
                    rate = contestant.epoch(mode, repeat + 1)
                    print(
                        f"  {mode!s:20s} round {repeat + 1}: {rate:10,.0f} rows/s  {contestant.name}",
                        flush=True,
                    )
            for contestant in contestants:
                contestant.close()

        ours_best = {mode: max(contestants[0].rates[mode]) for mode in modes}
        print(f"\nhit epochs, best of {args.repeats}, rows/s and ours / it:")
        print(f"{'':84s}" + "".join(f" {mode!s:>29s}" for mode in modes) + f" {'blocks/batch':>12s}")
        results = []
        for contestant in contestants:
            best = {mode: max(contestant.rates[mode]) for mode in modes}
            check = checks[contestant.name]
            cells = "".join(f" {best[m]:20,.0f} {ours_best[m] / best[m]:7.1f}x" for m in modes)
            print(f"{contestant.name:84s}{cells} {check['blocks_per_batch']:12.1f}")
            results.append(
                {
                    "name": contestant.name,
                    "max_batches": contestant.max_batches,
                    "rows_per_s": {str(m): contestant.rates[m] for m in modes},
                    "best_rows_per_s": {str(m): best[m] for m in modes},
                    "ours_over_it": {str(m): ours_best[m] / best[m] for m in modes},
                    "order_check": check,
                }
            )
        lit_check = checks[contestants[3].name]
        lit_check2 = checks[contestants[3].name + ", workers 2"]
        print(
            f"\nlitdata {litdata.__version__} shuffle=True: "
            f"{100 * lit_check['consecutive_batches']:.0f}% of full batches were one run of {BATCH} "
            "consecutive rows at workers 0, "
            f"{100 * lit_check2['consecutive_batches']:.0f}% at workers 2 "
            f"(a real shuffle: {100 * checks[contestants[0].name]['consecutive_batches']:.0f}%)."
        )
        summary: dict[str, float] = {}
        for peer, indices in (("datasets", (1, 2)), ("litdata", (3, 4, 5))):
            for mode in modes:
                fastest_peer = max(max(contestants[i].rates[mode]) for i in indices)
                ours_fastest = max(max(contestants[i].rates[mode]) for i in (0, 6, 7))
                summary[f"{peer}, {mode}"] = ours_best[mode] / fastest_peer
                summary[f"{peer}, {mode}, our fastest"] = ours_fastest / fastest_peer
                print(
                    f"ours / {peer}'s fastest, {mode}: per sample {ours_best[mode] / fastest_peer:.1f}x, "
                    f"our fastest {ours_fastest / fastest_peer:.1f}x (target >= 3x)"
                )
    finally:
        for dataset in opened:  # else the access log, written at exit, makes the store anew
            dataset.flush()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "benchmark": "bench_peers",
        "rows": n,
        "features": OUT_DIM,
        "batch_size": BATCH,
        "chunk_rows": chunk_rows,
        "workers": args.workers,
        "repeats": args.repeats,
        "quick": args.quick,
        "builds_s": builds,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "versions": {
            "torch": torch.__version__,
            "datasets": datasets.__version__,
            "litdata": litdata.__version__,
        },
        "results": results,
        "ours_over_fastest_peer": summary,
    }


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="32,768 rows, 2 repeats; about a minute")
    parser.add_argument("--rows", type=int, default=None, help="default 65,536 (32,768 with --quick)")
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=None, help="hit epochs per loader (best is kept)")
    parser.add_argument(
        "--per-item-batches", type=int, default=None, help="batches of litdata's per-item shuffle"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.rows is None:
        args.rows = 32768 if args.quick else 65536
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.per_item_batches is None:
        args.per_item_batches = 8 if args.quick else 24
    write_report(run(args), args.output, "bench_peers", args.quick)


if __name__ == "__main__":
    main()
