"""The store is plain Zarr v3: zarr and xarray open it without cachedfeatures."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, WrapperStore

from cachedfeatures import CachedFeatureDataset, FeatureStore, FieldNameError
from cachedfeatures.compute.fingerprint import probe_indices
from tests.helpers import Backbone, Listed, Samples, reference


def test_zarr_opens_the_store_without_cachedfeatures(store_path) -> None:
    data = Samples(40, "dict")
    module = Backbone()
    cached = CachedFeatureDataset(data, module, store_path, input_key="image", chunk_rows=16)
    cached.__getitems__(list(range(40)))
    expected = reference(module, data, 5).numpy()
    script = f"""
import json, sys, zarr
root = zarr.open_group({str(store_path)!r}, mode="r")
entry = root[{cached.entry_name!r}]
out = {{
    "root": dict(root.attrs),
    "attrs": dict(entry.attrs),
    "arrays": sorted(entry.array_keys()),
    "dims": {{name: list(entry[name].metadata.dimension_names) for name in entry.array_keys()}},
    "row5": entry["features"][5].tolist(),
    "label5": int(entry["label"][5]),
    "name5": str(entry["name"][5]),
    "valid": int(entry["valid"][:].sum()),
}}
import xarray
ds = xarray.open_zarr({str(store_path)!r}, group={cached.entry_name!r}, consolidated=False)
out.update({{
    "xr_dims": list(ds["features"].dims),
    "xr_row5": ds["features"][5].values.tolist(),
    "xr_label5": int(ds["label"][5]),
    "imported": "cachedfeatures" in sys.modules,
}})
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    out = json.loads(result.stdout)
    assert out["imported"] is False
    assert out["root"]["cachedfeatures"]["format_version"] == 1
    assert out["arrays"] == ["chunk_crc", "features", "label", "name", "valid"]
    assert out["dims"]["chunk_crc"] == ["chunk", "array", "slot"]  # checksums bound to each chunk
    assert out["dims"]["features"] == ["sample", "features_dim1"]
    assert out["dims"]["valid"] == ["sample"]
    assert np.array_equal(np.array(out["row5"], dtype=np.float32), expected)
    assert out["label5"] == 5 and out["name5"] == "sample-5"
    assert out["valid"] == 40
    assert out["xr_dims"] == ["sample", "features_dim1"]
    assert np.array_equal(np.array(out["xr_row5"], dtype=np.float32), expected)
    assert out["xr_label5"] == 5
    meta = out["attrs"]["cachedfeatures"]
    assert "Backbone" in meta["module"]["description"]
    assert "Samples of 40 samples" in meta["dataset"]["description"]
    assert meta["options"]["input_key"] == "'image'"
    assert meta["num_rows"] == 40 and meta["chunk_rows"] == 16


def test_xarray_opens_an_entry_with_named_dimensions(store_path) -> None:
    xarray = pytest.importorskip("xarray")
    data = Samples(30, "dict")
    module = Backbone()
    cached = CachedFeatureDataset(data, module, store_path, input_key="image")
    cached.__getitems__(list(range(30)))
    ds = xarray.open_zarr(store_path, group=cached.entry_name, consolidated=False)
    assert ds["features"].dims == ("sample", "features_dim1")
    assert ds.sizes["sample"] == 30
    assert bool(ds["valid"].all())
    np.testing.assert_array_equal(ds["features"][9].values, reference(module, data, 9).numpy())
    assert int(ds["label"][9]) == 2


class RecordingStore(WrapperStore[LocalStore]):
    """A LocalStore that records the order of the keys written."""

    def __init__(self, store: LocalStore, log: list[str]) -> None:
        super().__init__(store)
        self.log = log

    async def set(self, key: str, value: Buffer) -> None:
        self.log.append(key)
        await self._store.set(key, value)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return await self._store.get(key, prototype, byte_range)


def _chunk_writes(log: Iterable[str], array: str) -> list[int]:
    return [i for i, key in enumerate(log) if f"/{array}/c/" in key]


def test_valid_is_written_after_the_feature_bytes(tmp_path) -> None:
    log: list[str] = []
    store = RecordingStore(LocalStore(tmp_path / "s.zarr"), log)
    cached = CachedFeatureDataset(Samples(64), Backbone(), store, chunk_rows=16, batch_size=64)
    log.clear()
    cached.__getitems__(list(range(1, 64)))
    for chunk in range(4):
        features = [i for i in _chunk_writes(log, "features") if log[i].endswith(f"/c/{chunk}/0")]
        labels = [i for i in _chunk_writes(log, "field_1") if log[i].endswith(f"/c/{chunk}")]
        valid = [i for i in _chunk_writes(log, "valid") if log[i].endswith(f"/c/{chunk}")]
        assert features and labels and valid
        assert max(features + labels) < min(valid)


def test_default_compression_and_raw_chunks(store_path) -> None:
    compressed = CachedFeatureDataset(Samples(20), Backbone(), store_path)
    raw = CachedFeatureDataset(Samples(20), Backbone(seed=3), store_path, compressor=None, chunk_rows=8)
    assert compressed.entry is not None and raw.entry is not None
    codecs = compressed.entry.arrays["features"].metadata.to_dict()["codecs"]
    assert [c["name"] for c in codecs] == ["bytes", "blosc", "crc32c"]
    assert codecs[1]["configuration"]["cname"] == "lz4"
    assert codecs[1]["configuration"]["shuffle"] == "bitshuffle"
    raw_codecs = raw.entry.arrays["features"].metadata.to_dict()["codecs"]
    assert [c["name"] for c in raw_codecs] == ["bytes", "crc32c"]
    assert raw.entry.arrays["features"].chunks == (8, 16)


def test_default_chunking_targets_megabyte_chunks(store_path) -> None:
    from cachedfeatures.store.feature_store import default_chunk_rows

    assert default_chunk_rows(384 * 4, 65536) == 1024  # 1.5 MiB chunks of ViT-S features
    assert default_chunk_rows(384 * 4, 100) == 128  # a small dataset is not one huge chunk
    assert default_chunk_rows(10**7, 10**6) == 16  # at least 16 rows per chunk
    assert default_chunk_rows(10**8, 10**6) == 2  # ...unless that passes 256 MiB (issue 13)
    cached = CachedFeatureDataset(Samples(20), Backbone(), store_path)
    assert cached.entry is not None and cached.entry.chunk_rows == 32


def test_attrs_are_json_with_fingerprints_in_words(store_path) -> None:
    cached = CachedFeatureDataset(Samples(10), Backbone(), store_path, dtype=torch.float16)
    meta = json.loads((store_path / cached.entry_name / "zarr.json").read_text())["attributes"]
    meta = meta["cachedfeatures"]
    assert meta["module"]["weights"] and meta["module"]["class"] == "tests.helpers.Backbone"
    assert meta["dataset"]["probes"] == probe_indices(10) == [0, 1, 3, 4, 5, 6, 8, 9]
    assert meta["options"]["dtype"] == "torch.float16"
    assert meta["arrays"][0]["torch_dtype"] == "float16"
    assert meta["library_version"]


def test_tuple_fields_are_stored_under_the_names_given(store_path) -> None:
    """Not ``field_1``: the name given is the array's, in zarr, xarray and the sample's fields."""
    xarray = pytest.importorskip("xarray")
    data = Samples(30, "tuple")
    cached = CachedFeatureDataset(data, Backbone(), store_path, field_names={1: "label"}, spot_check=0)
    cached.__getitems__(list(range(30)))
    assert cached.entry is not None
    assert [spec.name for spec in cached.entry.specs] == ["features", "label"]
    ds = xarray.open_zarr(store_path, group=cached.entry_name, consolidated=False)
    assert "field_1" not in ds and [int(ds["label"][i]) for i in (3, 9)] == [3, 2]
    features, label = cached[9]  # the sample keeps its structure
    assert label == 2 and features.shape == (16,)
    # A sequence naming every item (the input's name is not used) is the same entry.
    again = CachedFeatureDataset(data, Backbone(), store_path, field_names=("image", "label"))
    assert again.entry_name == cached.entry_name
    assert [entry.name for entry in FeatureStore.open(store_path).entries] == [cached.entry_name]


def test_field_names_are_part_of_the_key_only_when_they_change_the_arrays(store_path) -> None:
    data = Samples(20, "dict")
    plain = CachedFeatureDataset(data, Backbone(), store_path, input_key="image")
    same = CachedFeatureDataset(
        data, Backbone(), store_path, input_key="image", field_names={"label": "label"}
    )
    assert same.entry_name == plain.entry_name  # named what it is called anyway: the same cache
    renamed = CachedFeatureDataset(
        data, Backbone(), store_path, input_key="image", field_names={"label": "y"}
    )
    assert renamed.entry_name != plain.entry_name
    assert renamed.entry is not None and [s.name for s in renamed.entry.specs] == ["features", "y", "name"]


@pytest.mark.parametrize(
    ("field_names", "match"),
    [
        ({2: "label"}, "not one"),  # no such field
        ({0: "image"}, "the module's input"),
        ({1: "valid"}, "reserved|nor one of"),
        ({1: "features_label"}, "starting with 'features'"),
        ({1: "a/b"}, "Got 'a/b'"),
        ({(1, 0): "x"}, "not one"),
        ("label", "Expected field_names to be a mapping"),
    ],
)
def test_bad_field_names_are_clear_errors(store_path, field_names, match: str) -> None:
    with pytest.raises(FieldNameError, match=match):
        CachedFeatureDataset(Samples(10, "tuple"), Backbone(), store_path, field_names=field_names)


def test_two_fields_cannot_share_a_name(store_path) -> None:
    samples = Listed([(torch.zeros(3, 8, 8), 1, 2.0)] * 4)
    with pytest.raises(FieldNameError, match="distinct"):
        CachedFeatureDataset(samples, Backbone(), store_path, field_names={1: "y", 2: "y"})
    # A given name wins over a default one that would have been the same.
    cached = CachedFeatureDataset(samples, Backbone(), store_path, field_names={1: "field_2"})
    assert cached.entry is not None and [s.name for s in cached.entry.specs][1:] == ["field_2", "field_2_2"]
