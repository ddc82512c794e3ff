"""``prefill()`` on 1 and 2 ``torch.distributed`` ranks (torchrun, gloo, CPU), same local store.

Runs ``tests/prefill_ranks.py`` under ``torchrun --standalone --nproc_per_node=N`` on a fresh
store for each N and prints the prefill time (slowest rank, barrier included) and the whole
torchrun wall time, with the ratio of 2 ranks to 1. ``--delay`` adds seconds per sample load,
standing in for decoding (I/O-bound); ``--delay 0`` leaves the small test backbone (CPU-bound).

    python benchmarks/bench_prefill_ranks.py --rows 1024 --delay 0.002
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, rows: int, delay: float, root: Path) -> tuple[float, float]:
    """(prefill seconds of the slowest rank, torchrun wall seconds) for ``nproc`` ranks."""
    store, log_dir = root / f"features-{nproc}.zarr", root / f"log-{nproc}"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.setdefault("CACHEDFEATURES_LOCK_DIR", str(root / "locks"))
    started = time.perf_counter()
    script = str(ROOT / "tests" / "prefill_ranks.py")
    subprocess.run(
        [
            torchrun,
            "--standalone",
            f"--nproc_per_node={nproc}",
            script,
            str(store),
            str(log_dir),
            str(rows),
            str(delay),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - started
    results = [json.loads((log_dir / f"result-rank{rank}.json").read_text()) for rank in range(nproc)]
    return max(float(result["seconds"]) for result in results), wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--delay", type=float, default=0.002, help="seconds per sample load (default 0.002)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ranks-"))
    try:
        one = run(1, args.rows, args.delay, root)
        two = run(2, args.rows, args.delay, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"rows={args.rows} delay={args.delay}s/sample cpus={os.cpu_count()}")
    print(f"1 rank : prefill {one[0]:6.2f} s, torchrun wall {one[1]:6.2f} s")
    print(f"2 ranks: prefill {two[0]:6.2f} s, torchrun wall {two[1]:6.2f} s")
    print(f"2 ranks / 1 rank: prefill {two[0] / one[0]:.2f}x, wall {two[1] / one[1]:.2f}x")


if __name__ == "__main__":
    main()
