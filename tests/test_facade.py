"""The dataset as a facade: options validated once into a frozen dataclass, the entry held by a
binding that always has one, and the hit path's integrity check in a reader of its own."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cachedfeatures import CachedFeatureDataset, DatasetOptions, FeatureStore
from cachedfeatures.errors import CacheError
from cachedfeatures.reader.chunk_reader import ChunkReader
from cachedfeatures.store.integrity import CheckedReader
from tests.helpers import Backbone, Samples


def test_options_match_the_keyword_api() -> None:
    """Every keyword option of the dataset is a field of DatasetOptions, with the same default."""
    dataset_keywords = {
        name: parameter.default
        for name, parameter in inspect.signature(CachedFeatureDataset.__init__).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "write_guard"
    }
    option_defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(DatasetOptions.__init__).parameters.items()
    }
    option_defaults.pop("self")
    assert option_defaults == dataset_keywords
    assert {field.name for field in dataclasses.fields(DatasetOptions)} == set(dataset_keywords)


def test_options_are_frozen_parsed_and_travel_by_pickle(store_path: Path) -> None:
    cached = CachedFeatureDataset(Samples(8), Backbone(), store_path, device="cpu", max_bytes="10MB")
    settings = cached.settings
    assert settings.device == torch.device("cpu") and settings.max_bytes == 10_000_000
    assert (cached.device, cached.max_bytes, cached.batch_size) == (settings.device, 10_000_000, 256)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.batch_size = 1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(settings)) == settings
    assert settings == DatasetOptions(device=torch.device("cpu"), max_bytes=10_000_000)
    given = {"endpoint_url": "http://localhost:1"}
    options = DatasetOptions(storage_options=given)
    given["endpoint_url"] = "changed"
    assert options.storage_options == {"endpoint_url": "http://localhost:1"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"read_route": "fast"}, "Expected read_route to be one of 'auto', 'zarr'. Got 'fast'."),
        (
            {"chunk_cache_bytes": -1},
            r"Expected chunk_cache_bytes to be an int >= 0 \(0 disables the cache\) or None",
        ),
        ({"storage_options": 5}, "Expected storage_options to be a dict or None. Got 5."),
        ({"spot_check": -1}, "Expected spot_check to be an int >= 0"),
    ],
)
def test_bad_options_are_refused_before_any_sample_is_loaded(
    store_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    data = Samples(8)
    with pytest.raises((ValueError, TypeError), match=match):
        CachedFeatureDataset(data, Backbone(), store_path, **kwargs)
    assert data.loads == 0 and not store_path.exists()
    with pytest.raises((ValueError, TypeError), match=match):  # also where there is no entry
        CachedFeatureDataset(Samples(0), Backbone(), store_path, **kwargs)


def test_empty_dataset_has_nothing_to_read_or_write(store_path: Path) -> None:
    cached = CachedFeatureDataset(Samples(0), Backbone(), store_path)
    assert cached.entry is None and len(cached) == 0 and cached.__getitems__([]) == []
    assert cached.spot_check() == 0 and cached.prefill(progress=False).computed == 0
    assert "0/0 rows cached" in repr(cached)
    cached.flush_access()
    cached.record_hits(np.zeros(0, dtype=np.int64))
    for call in (
        cached.row_loader,
        cached.hit_reader,
        lambda: cached.compute([0]),
        lambda: cached.write([0], {}),
        lambda: cached.assemble_all({}),
        lambda: cached.loader(4),
    ):
        with pytest.raises(CacheError, match="empty"):
            call()


def test_checked_reader_keeps_its_own_view_of_which_chunks_are_backed(
    store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader that saw a chunk's bytes trusts them (a vanished chunk reads as fill values: a
    miss, left valid); a reader that has not seen them yet looks, clears the rows, warns once."""
    # Without checksums (with them, a chunk that reads as fill values fails its checksum first).
    cached = CachedFeatureDataset(
        Samples(64), Backbone(), store_path, chunk_rows=16, spot_check=0, checksum=False
    )
    cached.prefill(progress=False)
    entry = FeatureStore.open(store_path, mode="a").entry(cached.entry_name)
    assert entry is not None
    entry.reader = ChunkReader(entry, cache_bytes=0, route="zarr")  # every read from the files
    rows = np.arange(16, 32)
    seen = CheckedReader(entry)
    assert seen.read(rows).all_hit and seen.backed == {1}
    (store_path / cached.entry_name / "features" / "c" / "1" / "0").unlink()

    read = seen.read(rows)  # trusted as backed: the fill values give the misses away
    assert read.hits == 0 and entry.valid_mask()[rows].all()
    with caplog.at_level(logging.WARNING, logger="cachedfeatures"):
        fresh = CheckedReader(entry)
        assert fresh.read(rows).hits == 0 and fresh.read(rows).hits == 0
    assert not entry.valid_mask()[rows].any() and entry.valid_mask()[32:].all()
    assert caplog.text.count("bytes are missing") == 1
    assert seen.backed == {1} and fresh.backed == set()
