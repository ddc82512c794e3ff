"""How long fingerprinting takes: a 100M-parameter model on one core, and a dataset's probes.

The module fingerprint hashes every weight and buffer and every other value reachable from each
submodule; the target is under about a second for 100M float32 parameters (400 MB) on one core.
Baseline in the same run: one plain copy of every weight (``torch.cat`` of the flattened
parameters), which any hash must at least read. Also timed: the dataset fingerprint of a
16,384-sample in-memory dataset (state hash, 8 probes, 12 seeded reloads).

Run:  python benchmarks/bench_fingerprint.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import Dataset

from cachedfeatures.compute.fingerprint import dataset_fingerprint, module_fingerprint


class Table(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, n: int) -> None:
        self.values = torch.randn(n, 3, 32, 32)
        self.labels = torch.randint(0, 10, (n,))

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.values[index], int(self.labels[index])


def best_of(repeat: int, run: object) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 25M-parameter model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    layers = 6 if args.quick else 24
    with torch.no_grad():
        model = nn.Sequential(*(nn.Linear(2048, 2048) for _ in range(layers))).eval()
    params = sum(p.numel() for p in model.parameters())
    copy = best_of(3, lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    fingerprint = best_of(3, lambda: module_fingerprint(model))
    print(f"module: {params / 1e6:.0f}M parameters ({params * 4 / 1e9:.2f} GB), one core")
    print(f"  fingerprint {fingerprint:.3f} s ({params * 4 / fingerprint / 1e9:.1f} GB/s)")
    print(f"  one copy of the weights {copy:.3f} s; fingerprint / copy = {fingerprint / copy:.2f}x")

    data = Table(16_384)
    taken = best_of(3, lambda: dataset_fingerprint(data, data.__getitem__, lambda sample: sample[0]))
    probe = dataset_fingerprint(data, data.__getitem__, lambda sample: sample[0])
    print(f"dataset: 16,384 samples ({data.values.nbytes / 1e6:.0f} MB in memory), {probe.loads} loads")
    print(f"  fingerprint {taken:.3f} s")


if __name__ == "__main__":
    main()
