"""Whole chunks written as files of a local store (``store/chunk_files.py``), bypassing zarr:
zarr reads back what they write and they read what zarr writes, for every plain codec; entry
writes take them where the backend allows, and go through zarr where a layer intercepts ``set``."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
import zarr.codecs
from zarr.storage import LocalStore

from cachedfeatures import CachedFeatureDataset
from cachedfeatures.errors import CachingPausedWarning
from cachedfeatures.store.backend import Backend
from cachedfeatures.store.chunk_files import ChunkFiles, ZarrChunks, whole_chunks
from tests.helpers import Backbone, Samples, reference
from tests.reliability.faulty import FaultyStore

CODECS: dict[str, Any] = {
    "raw": None,
    "blosc-zstd": zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    "blosc-lz4-bitshuffle": zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
    "blosc-small-blocks": zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle", blocksize=512),
    "zstd": zarr.codecs.ZstdCodec(level=3, checksum=True),
    "gzip": zarr.codecs.GzipCodec(level=1),
}


def _array(path: Path, dtype: str, codec: Any, checksum: bool) -> zarr.Array[Any]:
    compressors = ([codec] if codec is not None else []) + ([zarr.codecs.Crc32cCodec()] if checksum else [])
    return zarr.create_array(
        LocalStore(path),
        shape=(40, 3, 5),
        chunks=(16, 3, 5),
        dtype=dtype,
        fill_value=7,
        compressors=compressors or None,
        config={"write_empty_chunks": True},
    )


def _values(dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random((40, 3, 5)) < 0.5
    return (rng.standard_normal((40, 3, 5)) * 100).astype(dtype)


@pytest.mark.parametrize("checksum", [True, False], ids=["crc32c", "no-crc"])
@pytest.mark.parametrize("codec", list(CODECS), ids=list(CODECS))
@pytest.mark.parametrize("dtype", ["float32", "int64", "uint16", "bool"])
def test_chunk_files_and_zarr_read_what_the_other_wrote(
    tmp_path: Path, codec: str, checksum: bool, dtype: str
) -> None:
    array = _array(tmp_path / "a.zarr", dtype, CODECS[codec], checksum)
    files = ChunkFiles.maybe(array, Backend.of(array.store))
    assert files is not None
    ours, theirs = _values(dtype, 0), _values(dtype, 1)
    for chunk in range(3):  # the last chunk holds 8 of its 16 rows
        files.write(chunk, ours[chunk * 16 : (chunk + 1) * 16])
    reopened = zarr.open_array(LocalStore(tmp_path / "a.zarr"), mode="r")
    np.testing.assert_array_equal(reopened[:], ours)
    assert not list((tmp_path / "a.zarr").rglob("*.partial"))  # every file renamed into place
    array[:] = theirs  # zarr's own writes, read back as files
    for chunk in range(3):
        np.testing.assert_array_equal(files.read(chunk), theirs[chunk * 16 : (chunk + 1) * 16])


def test_a_chunk_without_a_file_reads_as_the_fill_value(tmp_path: Path) -> None:
    array = _array(tmp_path / "a.zarr", "int64", CODECS["blosc-zstd"], True)
    files = ChunkFiles.maybe(array, Backend.of(array.store))
    assert files is not None
    np.testing.assert_array_equal(files.read(2), np.full((8, 3, 5), 7))
    np.testing.assert_array_equal(files.read(2), array[32:40])


def test_a_garbled_chunk_file_raises_instead_of_reading_garbage(tmp_path: Path) -> None:
    array = _array(tmp_path / "a.zarr", "float32", CODECS["blosc-zstd"], True)
    files = ChunkFiles.maybe(array, Backend.of(array.store))
    assert files is not None
    files.write(0, _values("float32", 0)[:16])
    path = files.path(0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="crc32c"):
        files.read(0)


def test_zarr_writes_where_the_store_is_read_only_or_a_layer_intercepts_set(tmp_path: Path) -> None:
    array = _array(tmp_path / "a.zarr", "float32", None, True)
    assert isinstance(whole_chunks(array, Backend.of(array.store)), ChunkFiles)
    read_only = zarr.open_array(LocalStore(tmp_path / "a.zarr", read_only=True), mode="r")
    assert isinstance(whole_chunks(read_only, Backend.of(read_only.store)), ZarrChunks)
    faulty = zarr.open_array(FaultyStore(tmp_path / "a.zarr"), mode="r+")
    assert isinstance(whole_chunks(faulty, Backend.of(faulty.store)), ZarrChunks)


@pytest.mark.parametrize("compressor", [None, "default"])
def test_an_entry_writes_its_chunks_as_files_and_zarr_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compressor: str | None
) -> None:
    sets: list[str] = []
    plain_set = LocalStore.set

    async def spy(self: LocalStore, key: str, value: Any) -> None:
        sets.append(key)
        await plain_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", spy)
    data, module = Samples(40, "tuple"), Backbone()
    path = tmp_path / "features.zarr"
    cached = CachedFeatureDataset(data, module, path, chunk_rows=16, compressor=compressor, spot_check=0)
    order = np.random.default_rng(0).permutation(40).tolist()
    for start in range(0, 40, 8):
        cached.__getitems__(order[start : start + 8])
    cached.flush()
    entry = cached.entry
    assert entry is not None
    chunk_sets = [key for key in sets if "/c/" in key and "/access/" not in key]  # (access: statistics)
    assert chunk_sets == [], chunk_sets  # no chunk of rows went through zarr
    reopened = zarr.open_group(LocalStore(path), mode="r")[entry.name]
    assert bool(np.all(reopened["valid"][:]))
    for index in range(40):
        assert torch.equal(
            torch.from_numpy(np.asarray(reopened["features"][index])), reference(module, data, index)
        )
    again = CachedFeatureDataset(data, module, path, chunk_rows=16, compressor=compressor, spot_check=0)
    served = again.__getitems__(list(range(40)))
    assert again.module_calls == 0
    for index, (features, _label) in enumerate(served):
        assert torch.equal(features, reference(module, data, index))


def test_a_layer_that_intercepts_set_sees_every_chunk_write(tmp_path: Path) -> None:
    store = FaultyStore(tmp_path / "features.zarr")
    data, module = Samples(32, "tuple"), Backbone()
    cached = CachedFeatureDataset(data, module, store, chunk_rows=16, spot_check=0)
    cached.__getitems__(list(range(32)))
    cached.flush()
    before = store.attempts
    store.failing = True  # every write from now on fails: none may bypass the layer
    with pytest.warns(Warning):
        cached.__getitems__(list(range(32)))  # all hits: nothing to write
        cached.flush()
        other = CachedFeatureDataset(data, module, store, chunk_rows=16, spot_check=0, dataset_version="2")
        other.__getitems__(list(range(32)))
        other.flush()
    assert store.failures > 0 and store.attempts > before
    entry = other.entry
    assert entry is not None and not entry.valid_mask().any()  # refused by the layer: nothing stored


def test_a_full_disk_under_direct_writes_pauses_caching_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, module = Samples(32, "tuple"), Backbone()
    path = tmp_path / "features.zarr"
    cached = CachedFeatureDataset(data, module, path, chunk_rows=16, spot_check=0)
    cached.__getitems__(list(range(8)))
    cached.flush()
    entry = cached.entry
    assert entry is not None and int(entry.valid_mask().sum()) == 8

    def full(source: Any, target: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr("cachedfeatures.store.chunk_files.os.replace", full)
    with pytest.warns(CachingPausedWarning):
        served = cached.__getitems__(list(range(32)))
        cached.flush()
    for index, (features, _label) in enumerate(served):  # served all the same
        assert torch.equal(features, reference(module, data, index))
    assert int(entry.valid_mask().sum()) == 8  # the rows stored before are kept
    assert not list(path.rglob("*.partial"))  # the refused files are removed
    monkeypatch.undo()
    again = CachedFeatureDataset(data, module, path, chunk_rows=16, spot_check=0)
    rows = again.__getitems__(list(range(8)))
    assert again.module_calls == 0
    for index, (features, _label) in enumerate(rows):
        assert torch.equal(features, reference(module, data, index))


@pytest.mark.parametrize("codec", ["raw", "blosc-zstd", "zstd"])
def test_rows_of_no_values_store_no_file_as_zarr_does(tmp_path: Path, codec: str) -> None:
    compressors = [CODECS[codec]] if CODECS[codec] is not None else []
    array = zarr.create_array(
        LocalStore(tmp_path / "a.zarr"),
        shape=(40, 0),
        chunks=(16, 0),
        dtype="float32",
        compressors=[*compressors, zarr.codecs.Crc32cCodec()],
    )
    files = ChunkFiles.maybe(array, Backend.of(array.store))
    assert files is not None
    files.write(1, np.empty((16, 0), dtype=np.float32))  # Blosc cannot decode an empty frame
    assert not files.path(1).exists()
    assert files.read(1).shape == (16, 0) and array[16:32].shape == (16, 0)
