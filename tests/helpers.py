"""Datasets and modules for tests: they count what they do, so tests can assert on it.

Importable from subprocesses and spawned DataLoader workers (``tests.helpers``), unlike
fixtures defined inside test files.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from cachedfeatures.reader import scratch

SHAPES = ("tensor", "tuple", "dict")


class Samples(Dataset[Any]):
    """Deterministic samples of a 3x8x8 'image' and a label, as a tensor, tuple or dict.

    ``loads`` counts ``__getitem__`` calls in this process; ``load_log``, if given a
    directory, records every load from any process (one file per pid).
    """

    def __init__(
        self, n: int = 100, shape: str = "tuple", offset: float = 0.0, log_dir: str | None = None
    ) -> None:
        self.n = n
        self.shape = shape
        self.offset = offset
        self.log_dir = log_dir
        self.loads = 0

    def __len__(self) -> int:
        return self.n

    def image(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(index)
        return torch.randn(3, 8, 8, generator=generator) + self.offset

    def __getitem__(self, index: int) -> Any:
        self.loads += 1
        if self.log_dir is not None:
            with open(os.path.join(self.log_dir, f"loads-{os.getpid()}"), "a") as log:
                log.write(f"{index}\n")
        image = self.image(index)
        if self.shape == "tensor":
            return image
        if self.shape == "tuple":
            return (image, index % 7)
        return {"image": image, "label": index % 7, "name": f"sample-{index}"}


class Listed(Dataset[Any]):
    """A map-style dataset over a list of samples, as given."""

    def __init__(self, samples: list[Any]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        return self.samples[index]


class SlowSamples(Samples):
    """Samples that take ``delay`` seconds each to load (same entry whatever the delay), so a
    prefill lasts long enough to interrupt."""

    def __init__(self, n: int, delay: float = 0.0, log_dir: str | None = None) -> None:
        super().__init__(n, "tuple", log_dir=log_dir)
        self.delay = delay

    def __getitem__(self, index: int) -> Any:
        time.sleep(self.delay)
        return super().__getitem__(index)


class Backbone(nn.Module):
    """A small conv net whose output is independent of batch composition per row.

    Only per-sample ops (conv, relu, mean-pool, linear applied row by row) so that a row's
    features are bit-identical whatever batch it is computed in: the tests compare exactly.
    ``calls`` counts forward calls; ``seen_devices`` and ``seen_grad_modes`` record the
    device of inputs and whether inference mode was on. These change as it runs and not what it
    computes, so they are left out of its fingerprint (``__cachedfeatures_exclude__``).
    """

    __cachedfeatures_exclude__ = ("calls", "batch_sizes", "inference_modes", "devices", "pids")

    def __init__(self, out: int = 16, seed: int = 0, outputs: str = "tensor") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, out)
        self.outputs = outputs
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.inference_modes: list[bool] = []
        self.devices: list[str] = []
        self.pids: list[int] = []
        self.eval()

    def forward(self, x: torch.Tensor) -> Any:
        self.calls += 1
        self.batch_sizes.append(len(x))
        self.inference_modes.append(torch.is_inference_mode_enabled())
        self.devices.append(str(x.device))
        self.pids.append(os.getpid())
        pooled = torch.stack([torch.relu(self.conv(image[None]))[0].mean(dim=(1, 2)) for image in x])
        features = torch.stack([self.head(row) for row in pooled])
        if self.outputs == "tuple":
            return features, pooled
        if self.outputs == "dict":
            return {"cls": features, "pooled": pooled}
        return features


def scratch_files_work(path: Path) -> bool:
    """Whether the reader may make scratch files under ``path`` (a local disk file system, on
    Linux; see :mod:`cachedfeatures.reader.scratch`)."""
    kind = scratch.file_system_type(str(path))
    return hasattr(os, "posix_fallocate") and kind in scratch.SCRATCH_FILE_SYSTEMS


def reference(module: Backbone, dataset: Samples, index: int) -> Any:
    """``module``'s output for sample ``index``, computed directly, without the cache."""
    with torch.inference_mode():
        out = module.__class__.forward(module, dataset.image(index)[None])
    module.calls -= 1
    if isinstance(out, tuple):
        return tuple(t[0] for t in out)
    if isinstance(out, dict):
        return {k: t[0] for k, t in out.items()}
    return out[0]


def features_of(sample: Any, shape: str) -> Any:
    if shape == "tensor":
        return sample
    if shape == "tuple":
        return sample[0]
    return sample["image"]


def worker_pid_is_main() -> bool:
    return multiprocessing.parent_process() is None


class Tile(nn.Module):
    """A cheap, batch-invariant (element-wise) module: 256 float32 features per 3x8x8 image.

    ``rows_computed`` counts the rows it has seen, so tests can count misses.
    """

    __cachedfeatures_exclude__ = ("rows_computed",)

    def __init__(self) -> None:
        super().__init__()
        self.rows_computed = 0
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows_computed += len(x)
        return torch.tanh(x.flatten(1)).repeat(1, 2)[:, :256]


ROOT = Path(__file__).resolve().parent.parent


def child_pids(pid: int) -> list[int]:
    """The pids of ``pid``'s children, from ``/proc`` (Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


def run_process(
    script: str, *args: str, cwd: Path = ROOT, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a new Python process (repo on the path), as ``python -c`` would; its exit
    status and output. A child of a script server (``tests.script_server``), which has imported
    torch already, where the environment allows."""
    from tests.script_server import SCRIPTS

    return SCRIPTS.run(script, *args, cwd=cwd, timeout=timeout)


def run_script(script: str, *args: str, timeout: float = 300, quiet: bool = False) -> dict[str, Any]:
    """Run ``script`` in a new Python process (:func:`run_process`); it prints one JSON line last.

    ``quiet``: fail on anything written to stderr too (a DataLoader worker reported killed).
    """
    result = run_process(script, *args, timeout=timeout)
    if result.returncode != 0 or (quiet and result.stderr):
        raise AssertionError(f"script failed with exit code {result.returncode}:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


class ScriptProcess:
    """A Python process running ``script`` (repo on the path), started on first use, that reads
    one JSON request a line on stdin and answers with JSON lines: tests that would start many
    processes, each importing torch again, share one."""

    def __init__(self, script: str) -> None:
        self.script = textwrap.dedent(script)
        self.process: subprocess.Popen[str] | None = None

    def send(self, request: Any) -> None:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, "-c", self.script],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def receive(self) -> Any:
        """The next answer line (waits for it)."""
        assert self.process is not None and self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"the script process died (exit {self.process.wait(timeout=60)})"
        return json.loads(line)

    def close(self) -> None:
        """End the process (its stdin closes, so its loop ends) and wait for it."""
        if self.process is not None:
            assert self.process.stdin is not None and self.process.stdout is not None
            self.process.stdin.close()
            self.process.wait(timeout=60)
            self.process.stdout.close()
            self.process = None


class BrokenSampleError(RuntimeError):
    """A user's own exception type, raised by :class:`FailingSamples`."""


class FailingSamples(Samples):
    """Dict samples whose rows from ``fail_from`` on fail once ``failure`` is set after the cache
    is built: ``"key"`` drops the input key (an InputKeyError), ``"user"`` raises
    :class:`BrokenSampleError`."""

    def __init__(self, n: int, fail_from: int) -> None:
        super().__init__(n, "dict")
        self.fail_from = fail_from
        self.failure = ""

    def __getitem__(self, index: int) -> Any:
        sample = super().__getitem__(index)
        if self.failure and index >= self.fail_from:
            if self.failure == "user":
                raise BrokenSampleError(f"sample {index} is broken")
            sample["img"] = sample.pop("image")
        return sample


class Augmented(Samples):
    """``(image, index)`` samples with a random flip (torch), noise (NumPy) and shift (Python's
    ``random``): each load draws from all three global generators, as augmentation pipelines do.

    ``own_generator``: draw the flip from a generator of the dataset's own instead (``generator``),
    which ``views=`` does not seed unless it is passed as ``view_generators``.
    """

    def __init__(self, n: int = 60, log_dir: str | None = None, own_generator: bool = False) -> None:
        super().__init__(n, "tuple", log_dir=log_dir)
        self.generator = torch.Generator().manual_seed(1) if own_generator else None

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        """The random draws of one load, from the generators ``views=`` seeds."""
        if float(torch.rand((), generator=self.generator)) < 0.5:
            image = image.flip(-1)
        noise = torch.from_numpy(np.random.normal(0.0, 0.1, size=tuple(image.shape))).float()
        return (image + noise).roll(random.randint(0, 3), dims=-2)

    def __getitem__(self, index: int) -> Any:
        image, _ = super().__getitem__(index)
        return self.augment(image), index


class DiesInHelpers(Augmented):
    """Augmented samples whose sample ``fatal`` ends any process but the main one (as an
    out-of-memory kill would), or, with ``unpicklable``, raises an exception that does not pickle."""

    def __init__(self, n: int, fatal: int, unpicklable: bool = False) -> None:
        super().__init__(n)
        self.fatal, self.unpicklable = fatal, unpicklable

    def __getitem__(self, index: int) -> Any:
        if index == self.fatal and multiprocessing.parent_process() is not None:
            if self.unpicklable:
                raise TwoArgumentError("s3://bucket/key", 503)
            os._exit(1)
        return super().__getitem__(index)


class TwoArgumentError(Exception):
    """An exception that pickles but does not unpickle (like botocore's ClientError)."""

    def __init__(self, path: str, code: int) -> None:
        super().__init__(f"{path}: {code}")


def assert_same(got: Any, want: Any, where: str = "batch", *, layout: bool = True) -> None:
    """Same types, containers, keys, dtypes, devices, shapes and values (NaN equals NaN) all the way
    down; with ``layout``, tensors also alike in contiguity (a batch as ``default_collate`` makes it)."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype, f"{where}: {got.dtype} != {want.dtype}"
        assert got.device == want.device, where
        if want.is_nested:  # its ragged dimension's size is a symbol of its own: compare the rows
            assert got.is_nested and got.layout == want.layout, where
            for a, b in zip(got.unbind(), want.unbind(), strict=True):
                assert_same(a, b, where, layout=layout)
            return
        assert got.shape == want.shape, f"{where}: {tuple(got.shape)} != {tuple(want.shape)}"
        if layout:
            assert got.is_contiguous() == want.is_contiguous(), where
        if want.is_complex():
            got, want = torch.view_as_real(got), torch.view_as_real(want)
        if want.is_floating_point():
            assert torch.equal(got.isnan(), want.isnan()), where
            got, want = got.nan_to_num(), want.nan_to_num()
        assert torch.equal(got, want), where
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert np.array_equal(got, want), where
    elif isinstance(want, Mapping):
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]", layout=layout)
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want), where
        for k, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same(a, b, f"{where}[{k}]", layout=layout)
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), where
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"
