"""The first epoch of a new process: raw chunks mapped instead of copied, and chunk file versions
verified once per machine (``cachedfeatures/reader/verified.py``), never vouching for bytes that
changed since. Each read runs in a new process, as a training run does (and a SIGBUS would kill
only it)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cachedfeatures import CachedFeatureDataset
from cachedfeatures.reader.chunk_reader import MIN_MAPPED_CHUNK_BYTES
from cachedfeatures.reader.verified import VerifiedLog
from cachedfeatures.store.locks import FileLocks
from tests.helpers import Backbone, Samples, run_script

N, CHUNK, OUT = 64, 16, 1024  # 16 rows of 1024 float32: 64 KiB raw chunks, mapped

_READ = """
import json, logging, sys
import torch
from cachedfeatures import CachedFeatureDataset
from cachedfeatures.format import chunk_identity
from tests.helpers import Backbone, Samples, reference

path, compressor, changes = sys.argv[1], sys.argv[2], sys.argv[3]
n, out, chunk_rows = (int(value) for value in sys.argv[4:7])
compressor = None if compressor == "none" else compressor
records = []
logging.getLogger("cachedfeatures").addHandler(logging.Handler())
logging.getLogger("cachedfeatures").handlers[-1].emit = lambda record: records.append(record.getMessage())
verified = 0
content_crc = chunk_identity.content_crc
def counting(*args, **kwargs):
    global verified
    verified += 1
    return content_crc(*args, **kwargs)
chunk_identity.content_crc = counting
data, module = Samples(n), Backbone(out=out)
cached = CachedFeatureDataset(data, module, path, chunk_rows=chunk_rows, batch_size=32, compressor=compressor,
                              spot_check=0)
rows = list(range(n))
samples = cached.__getitems__(rows)
wrong = sum(not torch.equal(f, reference(module, data, i)) for i, (f, _) in enumerate(samples))
first = {"verified": verified, "calls": module.calls}
for change in filter(None, changes.split(",")):  # changed in place under this process, after it mapped them
    chunk, how = change.split(":")
    with open(f"{path}/{cached.entry_name}/features/c/{chunk}/0", "r+b") as file:
        if how == "truncate":
            file.truncate(chunk_rows * out * 2)  # half the bytes
        else:
            file.seek(100)
            byte = file.read(1)
            file.seek(100)
            file.write(bytes([byte[0] ^ 0x10]))
for _ in range(2):
    samples = cached.__getitems__(rows)
    wrong += sum(not torch.equal(f, reference(module, data, i)) for i, (f, _) in enumerate(samples))
print(json.dumps({"wrong": wrong, "first": first, "calls": module.calls, "warnings": records}))
"""


def _fill(store_path: Path, compressor: str | None) -> CachedFeatureDataset:
    cached = CachedFeatureDataset(
        Samples(N), Backbone(out=OUT), store_path, chunk_rows=CHUNK, batch_size=32, compressor=compressor
    )
    cached.__getitems__(list(range(N)))
    time.sleep(0.15)  # the chunk files' times must be quiet before a version is recorded
    return cached


def _read(store_path: Path, compressor: str | None, changes: str = "") -> dict:
    return run_script(_READ, str(store_path), compressor or "none", changes, str(N), str(OUT), str(CHUNK))


def _chunk_file(store_path: Path, cached: CachedFeatureDataset, chunk: int) -> Path:
    return store_path / cached.entry_name / "features" / "c" / str(chunk) / "0"


def _about(warnings: list[str], chunk: int) -> list[str]:
    return [m for m in warnings if f"chunk {chunk} " in m or f"/c/{chunk}/" in m]


def test_the_benchmark_shape_maps_chunks() -> None:
    assert CHUNK * OUT * 4 >= MIN_MAPPED_CHUNK_BYTES  # these tests exercise the mapped route


@pytest.mark.slow
def test_chunks_verified_once_per_machine_and_never_vouched_for_after_a_change(store_path) -> None:
    """A new process does not verify raw chunk files verified before; chunk files changed in place
    after they were recorded (times restored where they can be) are verified again and recomputed:
    a flipped byte, another chunk's bytes (fine by their own crc32c), a truncation."""
    cached = _fill(store_path, None)
    first = _read(store_path, None)
    assert first["wrong"] == 0 and first["calls"] == 0, first  # all hits
    assert first["first"]["verified"] >= 2 * N // CHUNK, first  # features and labels, once per chunk
    assert (FileLocks(store_path).directory / f"{cached.entry_name}.verified").exists()
    again = _read(store_path, None)
    assert again["wrong"] == 0 and again["calls"] == 0, again
    assert again["first"]["verified"] == 0, again  # vouched for by the log: nothing verified again

    flipped, moved, torn = (_chunk_file(store_path, cached, chunk) for chunk in (1, 2, 3))
    times = {path: path.stat() for path in (flipped, moved)}
    with open(flipped, "r+b") as file:  # the same inode, the same size
        file.seek(100)
        byte = file.read(1)
        file.seek(100)
        file.write(bytes([byte[0] ^ 0x10]))
    with open(moved, "r+b") as file:
        file.write(_chunk_file(store_path, cached, 0).read_bytes())
    for path, stat in times.items():
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the old mtime back
    os.truncate(torn, torn.stat().st_size // 2)
    result = _read(store_path, None)
    assert result["wrong"] == 0, result
    assert result["first"]["calls"] >= 1, result  # the three chunks' rows were recomputed
    for chunk in (1, 2, 3):
        assert len(_about(result["warnings"], chunk)) == 1, (chunk, result)


@pytest.mark.slow
def test_compressed_chunks_verified_before_are_not_verified_again(store_path) -> None:
    _fill(store_path, "default")
    assert _read(store_path, "default")["first"]["verified"] >= 2 * N // CHUNK
    again = _read(store_path, "default")
    assert again["wrong"] == 0 and again["calls"] == 0 and again["first"]["verified"] == 0, again


@pytest.mark.slow
def test_a_mapped_chunk_changed_in_place_under_a_reader_is_a_miss(store_path) -> None:
    """Raw chunk files this process has mapped are changed where they are: never served (a
    flipped byte), never a SIGBUS (a truncation), one warning each, recomputed."""
    _fill(store_path, None)
    result = _read(store_path, None, "1:flip,2:truncate")
    assert result["first"]["calls"] == 0, result  # all hits before the change
    assert result["wrong"] == 0, result
    assert result["calls"] >= 1, result
    for chunk in (1, 2):
        assert len(_about(result["warnings"], chunk)) == 1, (chunk, result)


def test_the_log_keeps_only_quiet_versions_and_ignores_a_damaged_file(tmp_path) -> None:
    path = tmp_path / "entry.verified"
    old = time.time_ns() - 10**10
    quiet, recent = (1, 2, 3, old, old), (1, 4, 3, time.time_ns(), time.time_ns())
    log = VerifiedLog(path)
    log.record("a/c/0/0", quiet, 7)
    log.record("a/c/1/0", recent, 8)  # might still change within the clock's resolution
    log.flush()
    assert log.vouched("a/c/1/0", recent) is None
    again = VerifiedLog(path)
    assert again.vouched("a/c/0/0", quiet) == 7
    assert again.vouched("a/c/0/0", (1, 2, 3, old, old + 1)) is None  # another version
    assert again.vouched("a/c/1/0", recent) is None
    data = bytearray(path.read_bytes())
    data[20] ^= 1
    path.write_bytes(bytes(data))
    assert VerifiedLog(path).vouched("a/c/0/0", quiet) is None  # its own crc32c fails: ignored
