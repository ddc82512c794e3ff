"""Damaged chunks: torn, garbage, deleted, and a damaged ``valid`` mask. Reading serves
correct features (recomputing what was lost), warns once per chunk, and ``verify`` reports
every problem."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cachedfeatures import CachedFeatureDataset
from tests.helpers import Backbone, Samples, reference

ROOT = Path(__file__).resolve().parents[2]
N, CHUNK = 128, 16


def _fill(store_path: Path, compressor: str | None) -> CachedFeatureDataset:
    cached = CachedFeatureDataset(
        Samples(N), Backbone(), store_path, chunk_rows=CHUNK, batch_size=32, compressor=compressor
    )
    cached.__getitems__(list(range(N)))
    return cached


def _damage(store_path: Path, entry: str) -> dict[str, Path]:
    """Four kinds of damage, each to its own chunk; returns what was damaged where."""
    features = store_path / entry / "features" / "c"
    valid = store_path / entry / "valid" / "c"
    torn, garbage, deleted = features / "1" / "0", features / "2" / "0", features / "3" / "0"
    torn.write_bytes(torn.read_bytes()[: len(torn.read_bytes()) // 3])
    rng = np.random.default_rng(0)
    garbage.write_bytes(rng.integers(0, 256, garbage.stat().st_size, dtype=np.uint8).tobytes())
    deleted.unlink()
    mask = valid / "4"
    mask.write_bytes(rng.integers(0, 256, max(8, mask.stat().st_size), dtype=np.uint8).tobytes())
    return {"torn": torn, "garbage": garbage, "deleted": deleted, "valid": mask}


def _verify(store_path: Path, *extra: str) -> tuple[int, dict[str, object]]:
    result = subprocess.run(
        [sys.executable, "-m", "cachedfeatures", "verify", str(store_path), "--json", *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    return result.returncode, json.loads(result.stdout)


@pytest.mark.parametrize("compressor", ["default", None], ids=["blosc", "raw"])
def test_damaged_chunks_are_recomputed_and_reported(store_path, compressor, caplog) -> None:
    filled = _fill(store_path, compressor)
    damaged = _damage(store_path, filled.entry_name)

    code, report = _verify(store_path)
    assert code == 1
    text = json.dumps(report)
    for chunk in (1, 2, 3, 4):
        assert f'"chunk": {chunk}' in text, (chunk, text)

    data, module = Samples(N), Backbone()
    cached = CachedFeatureDataset(data, module, store_path, chunk_rows=CHUNK, batch_size=32)
    with caplog.at_level(logging.WARNING, logger="cachedfeatures"):
        for _ in range(3):  # damage is handled once; later passes are plain hits
            samples = cached.__getitems__(list(range(N)))
            for index, (features, label) in enumerate(samples):
                assert label == index % 7
                assert torch.equal(features, reference(module, data, index)), index
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for chunk in (1, 2, 3):
        about = [
            m for m in warnings if f"chunk {chunk} " in m or f"chunk {chunk}," in m or f"/c/{chunk}" in m
        ]
        assert len(about) == 1, (chunk, warnings)
    recomputed = data.loads - cached.probe_loads - len(cached.spot_checked_rows)  # probes, spot checks
    assert recomputed <= 4 * CHUNK, recomputed  # only the damaged chunks' rows
    assert cached.entry is not None and cached.entry.valid_mask().all()
    assert all(path.exists() for path in damaged.values())

    code, report = _verify(store_path)
    assert code == 0, report


_CHANGED_IN_PLACE = """
import json, logging, os, sys, time
import torch
from cachedfeatures import CachedFeatureDataset
from tests.helpers import Backbone, Samples, reference

path, how, checksum = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
n, chunk = 128, 16
records = []
logging.getLogger("cachedfeatures").addHandler(logging.Handler())
handler = logging.getLogger("cachedfeatures").handlers[-1]
handler.emit = lambda record: records.append(record.getMessage())
def open_cached(data, module):
    return CachedFeatureDataset(data, module, path, chunk_rows=chunk, batch_size=32, compressor=None,
                                checksum=checksum, chunk_cache_bytes=2000)
open_cached(Samples(n), Backbone()).__getitems__(list(range(n)))
data, module = Samples(n), Backbone()
cached = open_cached(data, module)
cached.__getitems__(list(range(n)))  # every chunk read (mapped, where the reader maps)
assert module.calls == cached.spot_check_calls, module.calls  # all hits: only the spot check ran
time.sleep(0.05)  # a later mtime than the write's, even on a coarse clock
target = os.path.join(path, cached.entry_name, "features", "c", "2", "0")
if how == "flip":
    with open(target, "r+b") as file:  # the same inode, changed where it is
        file.seek(100)
        byte = file.read(1)
        file.seek(100)
        file.write(bytes([byte[0] ^ 0x10]))
else:
    os.truncate(target, os.path.getsize(target) // 2)
wrong = 0
for _ in range(2):
    for index, (features, label) in enumerate(cached.__getitems__(list(range(n)))):
        wrong += not torch.equal(features, reference(module, data, index))
calls = module.calls - cached.spot_check_calls  # the recomputations, less the spot checks
print(json.dumps({"wrong": wrong, "calls": calls, "warnings": [m for m in records if "chunk 2" in m]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("how", "checksum"), [("flip", True), ("truncate", True), ("truncate", False)])
def test_a_chunk_changed_in_place_under_a_reader_is_recomputed(store_path, how, checksum) -> None:
    """A raw chunk this process already read (and may hold mapped) is changed where it is: a
    flipped byte must not be served, and a truncated file must be a miss, not a SIGBUS."""
    from tests.helpers import run_script

    result = run_script(_CHANGED_IN_PLACE, str(store_path), how, "1" if checksum else "0")
    assert result["wrong"] == 0, result
    assert result["calls"] >= 1, result  # the changed chunk's rows were recomputed
    assert len(result["warnings"]) == 1, result


@pytest.mark.parametrize("compressor", ["default", None], ids=["blosc", "raw"])
def test_a_chunk_file_replaced_by_another_chunks_file_is_not_served(store_path, compressor, caplog) -> None:
    """Chunk 5's file copied over chunk 2's checks fine by its own crc32c; it must still be a miss."""
    filled = _fill(store_path, compressor)
    features = store_path / filled.entry_name / "features" / "c"
    (features / "2" / "0").write_bytes((features / "5" / "0").read_bytes())

    code, report = _verify(store_path)
    assert code == 1 and [p["chunk"] for p in report["problems"]] == [2], report  # type: ignore[index]

    data, module = Samples(N), Backbone()
    cached = CachedFeatureDataset(data, module, store_path, chunk_rows=CHUNK, batch_size=32)
    with caplog.at_level(logging.WARNING, logger="cachedfeatures"):
        for _ in range(2):
            for index, (features_row, _label) in enumerate(cached.__getitems__(list(range(N)))):
                assert torch.equal(features_row, reference(module, data, index)), index
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "chunk 2 " in warnings[0], warnings
    # Only chunk 2's rows were recomputed, besides the construction probes and the spot checks.
    assert data.loads - cached.probe_loads - len(cached.spot_checked_rows) == CHUNK
    code, report = _verify(store_path)
    assert code == 0, report


def test_entries_written_before_bound_checksums_are_still_read(store_path) -> None:
    """An entry without per-chunk identity checksums (written by earlier versions) is served as
    it was: its chunk files' own crc32c is checked, and its rows are hits."""
    import zarr

    filled = _fill(store_path, None)
    group = zarr.open_group(store_path / filled.entry_name, mode="a")
    attrs = dict(group.attrs["cachedfeatures"])  # type: ignore[arg-type]
    del attrs["chunk_checksums"]
    group.attrs["cachedfeatures"] = attrs
    del group["chunk_crc"]
    data, module = Samples(N), Backbone()
    cached = CachedFeatureDataset(data, module, store_path, chunk_rows=CHUNK, batch_size=32)
    for index, (features_row, _label) in enumerate(cached.__getitems__(list(range(N)))):
        assert torch.equal(features_row, reference(module, data, index)), index
    assert data.loads == cached.probe_loads + len(cached.spot_checked_rows)  # all hits
    assert module.calls == cached.spot_check_calls
    cached.write(np.arange(N), cached.compute(np.arange(N)))  # and written as before
    assert _verify(store_path)[0] == 0
