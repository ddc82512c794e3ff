"""The store format's one home: names, versions and chunk keys, checked against real stores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import zarr
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from cachedfeatures import CachedFeatureDataset, FeatureStore, cached_module
from cachedfeatures.format.chunk_keys import ChunkKey, chunk_key, parse_chunk_key
from cachedfeatures.format.names import (
    ATTRS_KEY,
    CHUNK_CRC,
    ENTRY_META_KEYS,
    FORMAT_VERSION_KEY,
    KEY,
    NEXT_ROW,
    NOT_ROW_CHUNKED,
    STORE_FORMAT_VERSION,
    VALID,
    is_entry_meta,
)
from cachedfeatures.pruning import measure
from cachedfeatures.store.chunk_bytes import array_chunk_sizes
from tests.helpers import Backbone, Samples


@pytest.mark.parametrize(
    "path,chunk,ndim,key",
    [
        ("Tile-0123/features", 3, 2, "Tile-0123/features/c/3/0"),
        ("Tile-0123/valid", 0, 1, "Tile-0123/valid/c/0"),
        ("Tile-0123/chunk_crc", 12, 3, "Tile-0123/chunk_crc/c/12/0/0"),
        ("features", 7, 4, "features/c/7/0/0/0"),
        ("", 5, 1, "c/5"),  # relative to the array
        ("e/c", 1, 2, "e/c/c/1/0"),  # a field named "c"
    ],
)
def test_chunk_key_is_built_and_parsed_back(path: str, chunk: int, ndim: int, key: str) -> None:
    assert chunk_key(path, chunk, ndim) == key
    parsed = parse_chunk_key(key)
    assert parsed == ChunkKey(path, (chunk, *(0,) * (ndim - 1)))
    assert parsed is not None and parsed.chunk == chunk


@given(
    path=st.lists(st.from_regex(r"[A-Za-z0-9_.\-]{1,12}", fullmatch=True), min_size=0, max_size=3),
    chunk=st.integers(0, 10**9),
    ndim=st.integers(1, 5),
)
def test_chunk_key_round_trip(path: list[str], chunk: int, ndim: int) -> None:
    joined = "/".join(path)
    assert parse_chunk_key(chunk_key(joined, chunk, ndim)) == ChunkKey(joined, (chunk, *(0,) * (ndim - 1)))


@pytest.mark.parametrize(
    "key",
    [
        "zarr.json",
        "e/features/zarr.json",
        "e/features/c/3/0.0123abcd.partial",  # a killed writer's temporary file
        "e/features/c/x",
        "e/features/c/",
        "e/features/3/0",
    ],
)
def test_what_is_no_chunk_key_does_not_parse(key: str) -> None:
    assert parse_chunk_key(key) is None


def _assert_keys_are_zarrs(group: zarr.Group, names: set[str]) -> None:
    """Every array's chunk key, as built here, is the one zarr itself uses; every file under
    the entry that is a chunk parses back to an array of it."""
    arrays = {name: array for name, array in group.arrays()}
    assert names <= set(arrays)
    for name, array in arrays.items():
        for chunk in range(3):
            zeros = (0,) * (array.ndim - 1)
            assert chunk_key(array.path, chunk, array.ndim) == (
                f"{array.path}/{array.metadata.encode_chunk_key((chunk, *zeros))}"
            ), name
    root = Path(str(group.store.root)) / group.path  # type: ignore[attr-defined]
    chunk_files = [path for path in root.rglob("*") if path.is_file() and path.name != "zarr.json"]
    assert chunk_files
    for path in chunk_files:
        key = path.relative_to(root).as_posix()
        parsed = parse_chunk_key(key)
        assert parsed is not None and parsed.path in arrays, path
        assert chunk_key(parsed.path, parsed.chunk, arrays[parsed.path].ndim) == key


class Grid(nn.Module):
    """Features of shape (2, 3) per row: chunk keys with three coordinates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :6].reshape(len(x), 2, 3)


def test_chunk_keys_of_a_dataset_entry_are_zarrs(store_path: Path) -> None:
    cached = CachedFeatureDataset(
        Samples(40, "dict"), Grid().eval(), store_path, input_key="image", chunk_rows=8, spot_check=0
    )
    cached.__getitems__(list(range(20)))
    cached.flush_access()
    entry = FeatureStore.open(store_path)[0]
    assert entry.arrays["features"].ndim == 3
    _assert_keys_are_zarrs(entry.group, {"features", VALID, CHUNK_CRC, "access"})
    sizes = array_chunk_sizes(entry)
    assert {chunk for _, chunk in sizes} == {0, 1, 2}  # rows 0-19 in chunks of 8
    assert {name for name, _ in sizes} == {*entry.arrays, VALID, CHUNK_CRC}  # not the access stats


def test_chunk_keys_of_a_keyed_entry_are_zarrs(store_path: Path) -> None:
    module = cached_module(store=store_path, chunk_rows=4)(Backbone)().requires_grad_(False)
    module(torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    (entry,) = FeatureStore.open(store_path).entries
    _assert_keys_are_zarrs(entry.group, {KEY, NEXT_ROW, VALID, "features"})
    sizes = array_chunk_sizes(entry)
    assert {chunk for _, chunk in sizes} == {0, 1, 2}  # 10 rows in chunks of 4
    assert not {name for name, _ in sizes} & NOT_ROW_CHUNKED  # next_row holds no rows
    # The store-wide listing of the pruner parses the same keys to the same chunks.
    usage = measure(FeatureStore.open(store_path), per_array=True)
    assert usage.array_chunks[entry.name] == sizes
    assert usage.chunks[entry.name] == {
        chunk: sum(size for (_, c), size in sizes.items() if c == chunk) for chunk in (0, 1, 2)
    }


def test_store_and_entry_attrs_name_the_store_format_version(store_path: Path) -> None:
    cached = CachedFeatureDataset(Samples(8, "dict"), Backbone(), store_path, input_key="image")
    cached.__getitems__([0, 1])
    root: Any = json.loads((store_path / "zarr.json").read_text())["attributes"][ATTRS_KEY]
    entry: Any = json.loads((store_path / cached.entry_name / "zarr.json").read_text())["attributes"]
    assert root[FORMAT_VERSION_KEY] == entry[ATTRS_KEY][FORMAT_VERSION_KEY] == STORE_FORMAT_VERSION == 1


def test_entry_metadata_holds_only_the_keys_names_lists(store_path: Path) -> None:
    """names.ENTRY_META_KEYS is the list of what an entry's metadata may hold: kept true here."""
    cached = CachedFeatureDataset(Samples(8, "dict"), Backbone(), store_path, input_key="image")
    cached.__getitems__([0, 1])
    module = cached_module(store=store_path)(Backbone)().requires_grad_(False)
    module(torch.randn(2, 3, 8, 8))
    entries = FeatureStore.open(store_path).entries
    assert len(entries) == 2
    for entry in entries:
        assert set(entry.meta) <= set(ENTRY_META_KEYS), set(entry.meta) - set(ENTRY_META_KEYS)
        assert is_entry_meta(entry.group.attrs)
    assert not is_entry_meta(zarr.open_group(store_path, mode="r").attrs)  # the root is no entry
