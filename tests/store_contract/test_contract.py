"""The store contract, run over every store kind (as zarr's ``StoreTests`` are): a local path,
a ``WrapperStore`` around a local store, a ``MemoryStore``, and S3 on a loopback moto server.

Everything goes through the public API: a dataset over a small module fills an entry, and
what is served, reopened, pruned, verified and explored must be the same on every kind.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from cachedfeatures import CachedFeatureDataset, FeatureStore
from cachedfeatures.maintenance import verify_store
from cachedfeatures.pruning import prune
from tests.helpers import Backbone, Samples, reference, run_script
from tests.store_contract.kinds import KINDS, StoreKind

N, CHUNK_ROWS = 40, 8
CHUNKS = N // CHUNK_ROWS


@pytest.fixture(
    params=["local", "wrapped", "memory", pytest.param("s3", marks=pytest.mark.slow)],
)
def kind(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StoreKind:
    """A new, empty store of each kind."""
    monkeypatch.setenv("CACHEDFEATURES_LOCK_DIR", str(tmp_path / "locks"))
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_server")
        return KINDS["s3"](s3.new_url(), s3.storage_options)
    return KINDS[request.param](str(tmp_path / "features.zarr"))


def _dataset(kind: StoreKind, data: Samples | None = None, **kwargs: Any) -> CachedFeatureDataset:
    """A dataset over ``kind``'s store; spot checks off, so module calls count misses exactly."""
    return CachedFeatureDataset(
        data if data is not None else Samples(N, "dict"),
        Backbone(),
        kind.store(),
        input_key="image",
        chunk_rows=CHUNK_ROWS,
        spot_check=0,
        storage_options=kind.storage_options,
        **kwargs,
    )


def _open(kind: StoreKind, mode: str = "a") -> FeatureStore:
    return FeatureStore.open(kind.store(), mode=mode, storage_options=kind.storage_options)  # type: ignore[arg-type]


def _assert_exact(samples: list[Any], module: Backbone, data: Samples, rows: list[int]) -> None:
    """Every sample holds the module's output for its row, bit for bit, and the row's fields."""
    assert len(samples) == len(rows)
    for sample, row in zip(samples, rows, strict=True):
        assert torch.equal(sample["image"], reference(module, data, row))
        assert sample["label"] == row % 7 and sample["name"] == f"sample-{row}"


def _filled(kind: StoreKind, rows: list[int] | None = None) -> CachedFeatureDataset:
    cached = _dataset(kind)
    cached.__getitems__(list(range(N)) if rows is None else rows)
    return cached


def test_hits_equal_misses_bit_for_bit(kind: StoreKind) -> None:
    cached = _dataset(kind)
    everything = list(range(N))
    misses = cached.__getitems__(everything)
    calls = cached.module_calls
    assert calls >= 1
    hits = cached.__getitems__(everything[::-1])[::-1]
    assert cached.module_calls == calls  # all hits
    for miss, hit in zip(misses, hits, strict=True):
        assert torch.equal(miss["image"], hit["image"]) and miss["image"].dtype == hit["image"].dtype
        assert miss["label"] == hit["label"] and miss["name"] == hit["name"]
    module = cached.module
    assert isinstance(module, Backbone) and isinstance(cached.dataset, Samples)
    _assert_exact(hits, module, cached.dataset, everything)


def test_a_fresh_open_serves_without_computing(kind: StoreKind) -> None:
    _filled(kind)
    data = Samples(N, "dict")
    again = _dataset(kind, data)
    loads = data.loads  # the dataset fingerprint's probes
    served = again.__getitems__(list(range(N)))
    assert again.module_calls == 0 and data.loads == loads  # no module call, no raw sample loaded
    module = again.module
    assert isinstance(module, Backbone)
    _assert_exact(served, module, data, list(range(N)))


FRESH_PROCESS = """
    import json, sys
    import torch
    from cachedfeatures import CachedFeatureDataset
    from tests.helpers import Backbone, Samples, reference
    from tests.store_contract.kinds import kind_from_args

    kind = kind_from_args(*sys.argv[1:4])
    data, module = Samples(int(sys.argv[4]), "dict"), Backbone()
    cached = CachedFeatureDataset(data, module, kind.store(), input_key="image", chunk_rows=int(sys.argv[5]),
                                  spot_check=0, storage_options=kind.storage_options)
    served = cached.__getitems__(list(range(len(data))))
    exact = all(torch.equal(s["image"], reference(module, data, i)) for i, s in enumerate(served))
    print(json.dumps({"calls": cached.module_calls, "exact": exact, "rows": len(served)}))
"""


@pytest.mark.slow  # a fresh interpreter imports torch: seconds
def test_a_fresh_process_serves_without_computing(kind: StoreKind) -> None:
    if not kind.on_disk:
        pytest.skip(f"a {kind.name} store lives in one process")
    _filled(kind)
    result = run_script(FRESH_PROCESS, *kind.args(), str(N), str(CHUNK_ROWS))
    assert result == {"calls": 0, "exact": True, "rows": N}


def test_valid_rows_survive_a_reopen(kind: StoreKind) -> None:
    rows = [0, 1, 2, 3, 17, 18, 39]  # row 0 is also stored by the dataset's probe
    cached = _filled(kind, rows)
    module = cached.module
    assert isinstance(module, Backbone)
    store = _open(kind, mode="r")
    (entry,) = store.entries
    mask = np.zeros(N, dtype=bool)
    mask[rows] = True
    np.testing.assert_array_equal(entry.valid_mask(), mask)
    stored = entry.arrays["features"][:]
    data = Samples(N, "dict")
    for row in rows:
        assert torch.equal(torch.from_numpy(stored[row]), reference(module, data, row))


def test_pruning_to_a_budget_drops_whole_chunks_and_served_rows_stay_exact(kind: StoreKind) -> None:
    _filled(kind)
    store = _open(kind)
    (entry,) = store.entries
    before = store.nbytes_stored()
    budget = before - int(entry.nbytes_per_chunk().sum()) // 2  # room for about half the chunks
    report = prune(store, budget)
    assert report.within_budget and report.dropped and store.nbytes_stored() <= budget
    dropped = sorted(item.chunk for item in report.dropped)
    per_chunk = entry.valid_mask().reshape(CHUNKS, CHUNK_ROWS)
    assert set(np.flatnonzero(~per_chunk.all(axis=1))) == set(dropped)  # whole chunks: no row left
    assert not per_chunk[dropped].any()
    assert (entry.nbytes_per_chunk()[dropped] == 0).all()
    data = Samples(N, "dict")
    again = _dataset(kind, data)
    served = again.__getitems__(list(range(N)))
    module = again.module
    assert isinstance(module, Backbone)
    _assert_exact(served, module, data, list(range(N)))
    assert again.module_calls == 1  # the dropped chunks' rows, recomputed in one batch


def test_verify_finds_a_corrupted_chunk(kind: StoreKind, caplog: pytest.LogCaptureFixture) -> None:
    _filled(kind)
    store = _open(kind)
    (entry,) = store.entries
    zarr_store = store.root.store
    if not zarr_store.supports_writes:
        pytest.skip(f"a {kind.name} store does not take raw bytes")
    assert verify_store(store)["ok"]
    features = entry.arrays["features"]
    key = f"{features.path}/{features.metadata.encode_chunk_key((2, *(0,) * (features.ndim - 1)))}"
    sync(zarr_store.set(key, default_buffer_prototype().buffer.from_bytes(b"not a chunk")))
    report = verify_store(store)
    assert not report["ok"]
    assert [(p["kind"], p["chunk"]) for p in report["problems"]] == [("unreadable", 2)]
    assert verify_store(store, repair=True)["problems"][0]["repaired"]
    assert verify_store(store)["ok"]
    data = Samples(N, "dict")
    again = _dataset(kind, data)
    with caplog.at_level(logging.WARNING, logger="cachedfeatures"):
        served = again.__getitems__(list(range(N)))
    module = again.module
    assert isinstance(module, Backbone)
    _assert_exact(served, module, data, list(range(N)))
    assert again.module_calls == 1  # the repaired chunk's rows


def test_the_explore_api_describes_the_entry(kind: StoreKind) -> None:
    rows = list(range(3 * CHUNK_ROWS))
    _filled(kind, rows)
    store = _open(kind, mode="r")
    (entry,) = store.entries
    info = entry.info()
    shape = (info.num_rows, info.valid_rows, info.chunk_rows, info.num_chunks)
    assert shape == (N, len(rows), CHUNK_ROWS, CHUNKS)
    assert {array.name for array in info.arrays} >= {"features", "label", "name"}
    assert 0 < info.nbytes_stored == entry.nbytes_stored()
    assert store.location in repr(store) and entry.name in repr(entry)
    assert entry.name in store._repr_html_()
    np.testing.assert_array_equal(entry.valid_rows(), rows)
    pytest.importorskip("xarray")
    dataset = entry.to_xarray()
    assert dataset.sizes["sample"] == len(rows)
    np.testing.assert_array_equal(dataset["features"].values, entry.arrays["features"][: len(rows)])
    np.testing.assert_array_equal(dataset["label"].values, np.arange(len(rows)) % 7)


def test_a_read_only_open_serves_hits(kind: StoreKind) -> None:
    _filled(kind)
    before = _open(kind, mode="r").nbytes_stored()
    data = Samples(N, "dict")
    reader = _dataset(kind, data, read_only=True)
    served = reader.__getitems__(list(range(N)))
    module = reader.module
    assert isinstance(module, Backbone)
    assert reader.module_calls == 0
    _assert_exact(served, module, data, list(range(N)))
    reader.flush_access()
    assert _open(kind, mode="r").nbytes_stored() == before  # nothing written, not even statistics
