"""A Hugging Face ``datasets.Dataset`` is fingerprinted the same way in every process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import numpy as np, sys, torch
    from datasets import Dataset
    from cachedfeatures.compute.fingerprint import dataset_fingerprint

    SCALE = float(sys.argv[1])

    def transform(batch):
        return {"x": [torch.tensor(row) * SCALE for row in batch["x"]], "label": batch["label"]}

    ds = Dataset.from_dict({"x": np.ones((8, 3), np.float32), "label": np.arange(8)})
    ds = ds.with_transform(transform)
    print(dataset_fingerprint(ds, ds.__getitem__, lambda sample: sample["x"]).fingerprint.digest)
    """
)


def _digest(tmp_path: Path, scale: str) -> str:
    pytest.importorskip("datasets")
    script = tmp_path / "hf_fingerprint.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), scale],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_dataset_with_a_transform_keeps_its_fingerprint_across_processes(tmp_path: Path) -> None:
    # Before: the format was hashed by its repr, which holds the transform's address, so every
    # process made a new entry and recomputed everything.
    assert _digest(tmp_path, "1.0") == _digest(tmp_path, "1.0")


@pytest.mark.slow
def test_a_changed_transform_changes_the_fingerprint(tmp_path: Path) -> None:
    # SCALE is a global the transform reads; the probes see it too, so this must stay different.
    assert _digest(tmp_path, "1.0") != _digest(tmp_path, "2.0")
