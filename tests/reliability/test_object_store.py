"""The store on S3 through fsspec, against a real S3-protocol server (moto) on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cachedfeatures import CachedFeatureDataset, FeatureStore
from cachedfeatures.errors import StorePathError
from cachedfeatures.store.ownership import ChunkOwnership
from tests.conftest import S3Server
from tests.helpers import Backbone, Samples, reference, run_script
from tests.reliability.figures import record
from tests.script_server import SCRIPTS

ROOT = Path(__file__).resolve().parents[2]


def _dataset(s3: S3Server, url: str, n: int, **kwargs: Any) -> tuple[CachedFeatureDataset, Samples, Backbone]:
    data, module = Samples(n, "dict"), Backbone()
    cached = CachedFeatureDataset(
        data, module, url, input_key="image", storage_options=s3.storage_options, **kwargs
    )
    return cached, data, module


READER = """
    import json, sys, time
    import numpy as np, torch
    from cachedfeatures import CachedFeatureDataset, FeatureStore
    from tests.helpers import Backbone, Samples, reference

    url, options, n, local = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    store = FeatureStore.open(url, mode="r", storage_options=options)
    (entry,) = store.entries
    data, module = Samples(n, "dict"), Backbone()
    cached = CachedFeatureDataset(data, module, url, input_key="image", storage_options=options,
                                  read_only=True)
    loads = data.loads  # the dataset fingerprint's probes
    checked = 0
    for start in range(0, n, 64):
        for offset, sample in enumerate(cached.__getitems__(list(range(start, min(start + 64, n))))):
            assert torch.equal(sample["image"], reference(module, data, start + offset))
            assert sample["name"] == f"sample-{start + offset}"
            checked += 1
    loads = data.loads - loads  # raw samples loaded while reading: only the spot check's
    spot_loads = len(cached.spot_checked_rows)
    # The same chunks copied to a local directory: the baseline, measured in the same run.
    copy = CachedFeatureDataset(data, module, local, input_key="image", read_only=True)
    rates = {}
    for where, dataset in (("s3", cached), ("local", copy)):
        shuffled = np.random.default_rng(0).permutation(n)
        for label, order in (("sequential", np.arange(n)), ("random", shuffled)):
            began = time.perf_counter()
            for start in range(0, n, 256):
                dataset.__getitems__(order[start : start + 256].tolist())
            rates[f"{where} {label}"] = n / (time.perf_counter() - began)
    print(json.dumps({"valid": int(entry.valid_mask().sum()), "calls": module.calls,
                      "spot_calls": cached.spot_check_calls + copy.spot_check_calls,
                      "loads": loads, "spot_loads": spot_loads, "checked": checked, "rates": rates,
                      "chunks": entry.num_chunks}))
"""


@pytest.mark.slow
def test_fill_in_one_process_read_in_another(s3_server: S3Server, tmp_path: Path) -> None:
    url, n = s3_server.new_url(), 1024
    cached, data, module = _dataset(s3_server, url, n, chunk_rows=128, batch_size=128)
    filled = cached.__getitems__(list(range(n)))
    assert all(torch.equal(s["image"], reference(module, data, i)) for i, s in enumerate(filled))
    assert cached.entry is not None and cached.entry.valid_mask().all()

    import s3fs

    local = tmp_path / "copy.zarr"
    s3fs.S3FileSystem(**s3_server.storage_options).get(url.removeprefix("s3://"), str(local), recursive=True)
    result = run_script(READER, url, json.dumps(s3_server.storage_options), str(n), str(local))
    assert result["valid"] == n and result["checked"] == n
    # Every row a hit: the only module calls and raw loads are the spot checks' (which passed).
    assert result["calls"] == result["spot_calls"] > 0
    assert result["loads"] == result["spot_loads"] == 8
    rates = result["rates"]
    record(
        "S3 (moto on loopback) read rows/s, 1024 rows x 16 float32 + 2 fields, chunks of 128, batches of 256",
        f"sequential {rates['s3 sequential']:,.0f}, random {rates['s3 random']:,.0f} "
        f"(same chunks on local disk: {rates['local sequential']:,.0f} and {rates['local random']:,.0f})",
    )


WRITER = """
    import json, sys
    from cachedfeatures import CachedFeatureDataset
    from cachedfeatures.store.ownership import ChunkOwnership
    from tests.helpers import Backbone, Samples

    url, options, n, rank = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    data, module = Samples(n, "dict"), Backbone()
    cached = CachedFeatureDataset(data, module, url, input_key="image", storage_options=options,
                                  batch_size=16, owned_chunks=ChunkOwnership(rank, 2))
    # Every row, cached or not: without ownership both writers would rewrite every chunk.
    for start in range(0, n, 16):
        cached.compute(list(range(start, min(start + 16, n))))
    print(json.dumps({"calls": module.calls}))
"""


@pytest.mark.slow
def test_two_writers_owning_disjoint_chunks_store_every_row(s3_server: S3Server) -> None:
    url, n = s3_server.new_url(), 192
    cached, data, module = _dataset(s3_server, url, n, chunk_rows=16)  # creates the entry first
    assert cached.entry is not None
    options = json.dumps(s3_server.storage_options)
    writers = [SCRIPTS.start(WRITER, url, options, str(n), str(rank)) for rank in (0, 1)]
    for writer in writers:
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err[-4000:]
        assert json.loads(out.strip().splitlines()[-1])["calls"] == n // 16

    store = FeatureStore.open(url, mode="r", storage_options=s3_server.storage_options)
    (entry,) = store.entries
    assert entry.valid_mask().all()
    stored = entry.arrays["features"][:]
    names = entry.arrays["name"][:]
    for row in range(n):
        assert torch.equal(torch.from_numpy(stored[row]), reference(module, data, row))
        assert names[row] == f"sample-{row}"
    record("S3 two writers with disjoint chunk ownership: rows verified", n)


def test_writer_stores_only_the_chunks_it_owns(s3_server: S3Server) -> None:
    url = s3_server.new_url()
    cached, data, module = _dataset(s3_server, url, 64, chunk_rows=8, owned_chunks=ChunkOwnership(1, 2))
    samples = cached.__getitems__(list(range(64)))
    assert all(torch.equal(s["image"], reference(module, data, i)) for i, s in enumerate(samples))
    assert cached.entry is not None
    coverage = cached.entry.coverage()
    assert coverage[1::2].tolist() == [8] * 4  # owned: stored
    assert coverage[0::2].tolist() == [0] * 4  # not owned (the probe row 0 included): served only


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_workers_read_and_write_an_s3_store(s3_server: S3Server, context: str) -> None:
    """fsspec file systems are not fork-safe: forked workers reopen the store from its URL.

    Workers split the chunks between them (no locks on S3), so they never write one chunk twice.
    """
    url, n = s3_server.new_url(), 96
    cached, data, module = _dataset(s3_server, url, n, chunk_rows=8, batch_size=8)
    cached.__getitems__(list(range(0, n, 2)))  # half the rows cached by the main process
    assert cached.entry is not None
    before = cached.entry.valid_mask()
    loader = DataLoader(
        cached,
        batch_size=8,
        shuffle=True,
        num_workers=2,
        multiprocessing_context=context,
        generator=torch.Generator().manual_seed(0),
    )
    seen = []
    for batch in loader:
        for features, name in zip(batch["image"], batch["name"], strict=True):
            index = int(name.removeprefix("sample-"))
            assert torch.equal(features, reference(module, data, index))
            seen.append(index)
    assert sorted(seen) == list(range(n))
    after = cached.entry.valid_mask()
    assert after.sum() > before.sum()  # workers stored rows of the chunks they own
    stored = cached.entry.arrays["features"][:]
    for row in np.flatnonzero(after):
        assert torch.equal(torch.from_numpy(stored[row]), reference(module, data, int(row)))


def test_missing_s3_store_opened_read_only_is_a_clear_error(s3_server: S3Server) -> None:
    url = s3_server.new_url()
    with pytest.raises(StorePathError, match="no cachedfeatures store"):
        FeatureStore.open(url, mode="r", storage_options=s3_server.storage_options)


def test_storage_options_need_a_url(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="storage_options apply only to URL stores"):
        FeatureStore.open(tmp_path / "features.zarr", mode="a", storage_options={"anon": True})


def test_file_url_is_a_local_store(tmp_path: Path) -> None:
    FeatureStore.open(f"file://{tmp_path / 'features.zarr'}", mode="a")
    assert (tmp_path / "features.zarr" / "zarr.json").is_file()
    assert FeatureStore.open(tmp_path / "features.zarr").entries == []
