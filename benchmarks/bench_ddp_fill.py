"""DDP training epochs through the cache against a DDP run without it (torchrun, gloo, CPU, 2 ranks).

Runs ``tests/ddp_loader_ranks.py`` three ways on a fresh store: ``nocache`` (a plain
``DataLoader`` with a ``DistributedSampler``, the backbone run on every batch), ``distributed``
(``cached.loader(sampler=DistributedSampler(...))``: each rank stores only its own chunks, so
the store fills over several epochs) and ``owner`` (``ChunkShuffleSampler(split="owner")``:
each rank reads its own chunks, one epoch fills the store). Prints each epoch's time (slowest
rank, barrier included) as a ratio to the mean epoch without the cache. ``--store s3`` starts a
moto S3 server on loopback (needs ``moto[server]`` and ``s3fs``); ``--delay`` adds seconds per
sample load, standing in for decoding.

    python benchmarks/bench_ddp_fill.py --rows 512 --epochs 3 --delay 0.002 --store s3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.s3_server import moto_server  # noqa: E402  (the s3_server fixture's server)


def run(
    kind: str, store: str, options: dict[str, Any] | None, args: argparse.Namespace, root: Path
) -> list[float]:
    """Each epoch's seconds (slowest rank, barrier included) for one way of loading."""
    log_dir = root / f"log-{kind}"
    log_dir.mkdir(parents=True)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.setdefault("CACHEDFEATURES_LOCK_DIR", str(root / "locks"))
    if options is not None:
        env["CF_STORAGE_OPTIONS"] = json.dumps(options)
    command = [torchrun, "--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "ddp_loader_ranks.py")]
    subprocess.run(
        [*command, store, str(log_dir), str(args.rows), str(args.epochs), kind, str(args.delay)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    results = [json.loads((log_dir / f"result-rank{rank}.json").read_text()) for rank in range(2)]
    return [max(r[epoch]["epoch_seconds"] for r in results) for epoch in range(args.epochs)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.002, help="seconds per sample load (default 0.002)")
    parser.add_argument("--store", choices=("local", "s3"), default="s3")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    times: dict[str, list[float]] = {}
    try:
        with moto_server() if args.store == "s3" else _no_server() as server:
            options = server.storage_options if server is not None else None
            for kind in ("nocache", "distributed", "owner"):
                store = server.new_url() if server is not None else str(root / f"{kind}.zarr")
                times[kind] = run(kind, store, options, args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = sum(times["nocache"]) / len(times["nocache"])
    print(
        f"rows={args.rows} epochs={args.epochs} delay={args.delay}s/sample store={args.store} "
        f"cpus={os.cpu_count()}"
    )
    print(f"epoch without cache (2 ranks, DDP): {base:.2f} s = 1.00x")
    for kind in ("distributed", "owner"):
        ratios = ", ".join(f"{t / base:.2f}x" for t in times[kind])
        print(f"{kind:>11}: epochs {ratios}")


@contextmanager
def _no_server() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
