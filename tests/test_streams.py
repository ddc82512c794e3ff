"""CachedIterableDataset: caching the features of streams (tar shards, HF streaming) by sample key."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from cachedfeatures import (
    CachedIterableDataset,
    DuplicateKeyError,
    FeatureStore,
    RowsNotCachedError,
    StaleFeaturesError,
)
from cachedfeatures.maintenance import verify_store
from tests.tar_shards import TarShards, write_tar

SHAPE = (3, 8, 8)


def _array_bytes(array: np.ndarray) -> bytes:
    return zlib.compress(array.tobytes())


def write_shards(directory: Path, num_samples: int, per_shard: int, *, seed: int = 0) -> list[Path]:
    """WebDataset-style tar shards: members ``<key>.npz`` (zlib uint8 image) and ``<key>.cls``."""
    rng = np.random.default_rng(seed)

    def records(start: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        for index in range(start, min(start + per_shard, num_samples)):
            image = rng.integers(0, 255, SHAPE, dtype=np.uint8)
            yield f"{index:06d}", {"npz": _array_bytes(image), "cls": str(index % 10).encode()}

    return [
        write_tar(directory / f"shard-{shard:04d}.tar", records(start))
        for shard, start in enumerate(range(0, num_samples, per_shard))
    ]


class Decoder:
    """Decodes a record into ``{"image": float tensor, "label": int, "__key__": str}``; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        image = np.frombuffer(zlib.decompress(record["npz"]), dtype=np.uint8).reshape(SHAPE)
        return {
            "image": torch.from_numpy(image.astype(np.float32) / 255),
            "label": int(record["cls"]),
            "__key__": record["__key__"],
        }


class Backbone(torch.nn.Module):
    """A frozen per-row feature function: no cross-row reduction, so rows are exact in any batch."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 2.0, SHAPE[0]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale[None, :, None, None]).amax(dim=(2, 3))


def expected_rows(paths: list[Path]) -> dict[str, tuple[torch.Tensor, int]]:
    decode, module = Decoder(), Backbone()
    out = {}
    for record in TarShards(paths):
        sample = decode(record)
        with torch.inference_mode():
            out[sample["__key__"]] = (module(sample["image"][None])[0], sample["label"])
    return out


def check_exact(samples: list[dict[str, Any]], expected: dict[str, tuple[torch.Tensor, int]]) -> None:
    assert sorted(s["__key__"] for s in samples) == sorted(expected)
    for sample in samples:
        features, label = expected[sample["__key__"]]
        assert torch.equal(sample["image"], features), sample["__key__"]
        assert sample["label"] == label


def make(
    paths: list[Path], store: Path, decode: Decoder, **options: Any
) -> tuple[CachedIterableDataset, TarShards]:
    source = TarShards(paths, split_by_worker=options.pop("split_by_worker", False))
    options.setdefault("spot_check", 0)
    cached = CachedIterableDataset(
        source, Backbone(), store, key="__key__", decode=decode, input_key="image", batch_size=16, **options
    )
    return cached, source


def test_second_pass_serves_every_row_by_key_without_module_or_decode(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, 100, 30)
    expected = expected_rows(paths)
    decode = Decoder()
    cached, source = make(paths, tmp_path / "f.zarr", decode, cache_only=False)

    first = list(cached)
    check_exact(first, expected)
    assert [s["__key__"] for s in first] == sorted(expected)  # the source's order
    assert decode.calls == 100
    assert cached.module_calls == 7  # ceil(100 / 16) batches

    calls = cached.module_calls
    second = list(cached)
    check_exact(second, expected)
    assert [s["__key__"] for s in second] == sorted(expected)
    assert decode.calls == 100  # no decode on the second pass
    assert cached.module_calls == calls  # no module call
    assert source.opened == 2 * len(paths)  # cache_only=False: the source is read, not decoded

    # A fresh object (a new process, say) finds the same rows.
    fresh_decode = Decoder()
    fresh, _ = make(paths, tmp_path / "f.zarr", fresh_decode, cache_only=False)
    check_exact(list(fresh), expected)
    assert fresh.module_calls == 0 and fresh_decode.calls == 0


def test_a_complete_pass_lets_the_cache_serve_alone_with_the_source_gone(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    paths = write_shards(shards, 90, 25)
    expected = expected_rows(paths)
    decode = Decoder()
    cached, source = make(paths, tmp_path / "f.zarr", decode, cache_only=True)
    with pytest.raises(RowsNotCachedError, match="no complete pass"):
        list(cached)
    cached.cache_only = "auto"
    assert cached.completed() is None
    check_exact(list(cached), expected)
    record = cached.completed()
    assert record is not None and record["keys"] == 90
    assert cached.last_pass == "source"

    opened = source.opened
    # auto: the source's files are unchanged, so the cache serves alone.
    shuffled = list(cached)
    assert cached.last_pass == "cache" and source.opened == opened
    check_exact(shuffled, expected)
    assert [s["__key__"] for s in shuffled] != sorted(expected)  # shuffled

    for path in paths:  # the source is gone: no file of it can be opened
        path.unlink()
    shards.rmdir()
    cached.cache_only = True
    again = list(cached)
    check_exact(again, expected)
    assert [s["__key__"] for s in again] != [s["__key__"] for s in shuffled]  # a new epoch, a new order
    assert decode.calls == 90 and cached.module_calls == 6 and source.opened == opened

    # A new object (another process) over the same, now missing, shards finds the record.
    fresh, fresh_source = make(paths, tmp_path / "f.zarr", Decoder(), cache_only=True)
    check_exact(list(fresh), expected)
    assert fresh_source.opened == 0 and fresh.module_calls == 0


def test_auto_streams_again_when_a_shard_changed(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, 40, 20)
    decode = Decoder()
    cached, source = make(paths, tmp_path / "f.zarr", decode)
    list(cached)
    assert cached.completed() is not None
    write_shards(tmp_path, 50, 25, seed=0)  # shards rewritten: 10 new keys
    paths = sorted(tmp_path.glob("shard-*.tar"))
    source.paths = [str(p) for p in paths]
    samples = list(cached)
    assert cached.last_pass == "source"
    assert len(samples) == 50 and decode.calls == 40 + 10
    check_exact(samples, expected_rows(paths))


def test_cache_only_pass_shuffles_chunk_aware_and_is_seeded(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, 64, 64)
    cached, _ = make(paths, tmp_path / "f.zarr", Decoder(), chunk_rows=8, seed=3)
    list(cached)
    orders = []
    for _ in range(2):
        keys = [int(s["__key__"]) for s in cached]
        assert cached.last_pass == "cache"
        orders.append(keys)
        # chunk-aware: each run of 8 served rows comes from a window of 4 chunks (32 rows)
        for start in range(0, 64, 32):
            window = keys[start : start + 32]
            assert len({k // 8 for k in window}) == 4
    assert orders[0] != orders[1]
    again, _ = make(paths, tmp_path / "f.zarr", Decoder(), chunk_rows=8, seed=3)
    again.epoch = 1  # the first epoch of `cached` streamed the source
    assert [int(s["__key__"]) for s in again] == orders[0]


@pytest.mark.slow
@pytest.mark.parametrize("split", ["records", "source"])
def test_loader_with_two_workers_streams_each_split_once(tmp_path: Path, split: str) -> None:
    paths = write_shards(tmp_path, 120, 30)
    expected = expected_rows(paths)
    decode = Decoder()
    cached, _ = make(paths, tmp_path / "f.zarr", decode, split=split, split_by_worker=split == "source")
    cached.cache_only = False
    batches = list(cached.loader(num_workers=2, collate_fn=None))
    first = [s for batch in batches for s in batch]
    check_exact(first, expected)  # every key exactly once: the workers did not both stream it all
    assert cached.decodes == 120 and cached.module_calls >= 8
    assert cached.completed() is not None

    calls = cached.module_calls
    second = [s for batch in cached.loader(num_workers=2, collate_fn=None) for s in batch]
    check_exact(second, expected)
    assert cached.module_calls == calls and cached.decodes == 120

    cached.cache_only = True
    for path in paths:
        path.unlink()
    collated = list(cached.loader(num_workers=2))
    assert sum(len(batch["label"]) for batch in collated) == 120
    served = {
        key: (features, int(label))
        for batch in collated
        for key, features, label in zip(batch["__key__"], batch["image"], batch["label"], strict=True)
    }
    check_exact([{"__key__": k, "image": f, "label": lab} for k, (f, lab) in served.items()], expected)
    assert cached.module_calls == calls and cached.decodes == 120


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, 20, 20)
    cached, _ = make([paths[0], paths[0]], tmp_path / "f.zarr", Decoder())
    with pytest.raises(DuplicateKeyError, match="'000000' twice"):
        list(cached)


def test_a_key_whose_content_changed_fails_the_spot_check(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, 64, 64)
    store = tmp_path / "f.zarr"
    cached, _ = make(paths, store, Decoder(), spot_check=64, cache_only=False)
    list(cached)
    list(cached)  # every hit spot-checked: nothing changed, nothing raised
    assert cached.decodes == 128
    write_shards(tmp_path, 64, 64, seed=1)  # same keys, other images
    with pytest.raises(StaleFeaturesError, match="stale"):
        list(cached)


def test_budget_keeps_a_stable_subset_and_never_records_a_complete_pass(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, 256, 64)
    decode = Decoder()
    cached, _ = make(paths, tmp_path / "f.zarr", decode, chunk_rows=16, max_bytes=14_000, compressor=None)
    list(cached)
    entry = cached.entry
    assert entry is not None and entry.nbytes_stored() <= 14_000
    assert cached.completed() is None
    before = decode.calls
    check_exact(list(cached), expected_rows(paths))
    recomputed = decode.calls - before
    assert 0 < recomputed < 256  # some rows stay cached: MRU keeps a subset, it does not thrash


def test_key_callable_and_tuple_samples(tmp_path: Path) -> None:
    records = [{"id": i, "x": [float(i), 2.0 * i]} for i in range(10)]
    cached = CachedIterableDataset(
        records,
        lambda x: x * 3,
        tmp_path / "f.zarr",
        key=lambda r: f"row-{r['id']}",
        decode=lambda r: (torch.tensor(r["x"]), r["id"]),
        input_key=0,
        batch_size=4,
        spot_check=0,
    )
    first = list(cached)
    assert [label for _, label in first] == list(range(10))
    assert torch.equal(first[3][0], torch.tensor([9.0, 18.0]))
    assert sorted((y, f.tolist()) for f, y in cached) == [(y, f.tolist()) for f, y in first]
    assert cached.last_pass == "cache"


def test_hugging_face_streaming_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"id": f"doc-{i}", "vector": [float(i), float(i % 3), 1.0]} for i in range(30)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(__import__("json").dumps(row) for row in rows))
    stream = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
    decodes = []

    def decode(record: dict[str, Any]) -> dict[str, Any]:
        decodes.append(record["id"])
        return {"vector": torch.tensor(record["vector"]), "id": record["id"]}

    cached = CachedIterableDataset(
        stream,
        torch.nn.Identity(),
        tmp_path / "f.zarr",
        key="id",
        decode=decode,
        input_key="vector",
        batch_size=8,
        spot_check=0,
        cache_only=False,
    )
    first = list(cached)
    assert [s["id"] for s in first] == [r["id"] for r in rows]
    assert all(s["vector"].tolist() == r["vector"] for s, r in zip(first, rows, strict=True))
    assert len(decodes) == 30
    second = list(cached)
    assert len(decodes) == 30 and cached.module_calls == 4
    assert [s["id"] for s in second] == [r["id"] for r in rows]
    iterable = datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=2)
    other = CachedIterableDataset(
        iterable, torch.nn.Identity(), tmp_path / "g.zarr", key="id", input_key="vector", spot_check=0
    )
    assert sorted(s["id"] for s in other) == sorted(r["id"] for r in rows)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize(
    "shape",
    [
        lambda i: (torch.full((2,), float(i)), i),
        lambda i: {"x": torch.full((2,), float(i)), "name": f"s{i}", "w": i / 2, "ok": i % 2 == 0},
        lambda i: [torch.full((2,), float(i)), np.int32(i), np.arange(3) + i],
    ],
    ids=["tuple", "dict", "list"],
)
def test_loader_collates_from_columns_as_default_collate_does(tmp_path: Path, shape: Any) -> None:
    records = [{"__key__": str(i), "i": i} for i in range(20)]
    input_key = "x" if isinstance(shape(0), dict) else 0

    def module(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x.sum(1, keepdim=True)

    cached = CachedIterableDataset(
        records,
        module,
        tmp_path / "f.zarr",
        decode=lambda r: shape(r["i"]),
        input_key=input_key,
        batch_size=8,
        spot_check=0,
        shuffle=False,
    )
    for _ in range(2):  # computed, then served from the cache alone
        fast = list(cached.loader())
        slow = list(cached.loader(collate_fn=lambda samples: default_collate(samples)))
        assert len(fast) == len(slow) == 3
        for a, b in zip(fast, slow, strict=True):
            assert _same(a, b), (a, b)


def test_stream_entry_reads_like_any_entry(tmp_path: Path) -> None:
    """describe, to_xarray (plain xarray over the entry, bookkeeping arrays left out) and verify."""
    records = [{"__key__": str(i), "i": i} for i in range(40)]
    cached = CachedIterableDataset(
        records,
        lambda x: x * 2,
        tmp_path / "f.zarr",
        decode=lambda r: (torch.full((4,), float(r["i"])), r["i"]),
        spot_check=0,
        chunk_rows=16,
    )
    list(cached)
    entry = cached.entry
    assert entry is not None and cached.completed() is not None
    assert "keyed by '__key__'" in repr(entry)
    table = entry.to_xarray()
    assert table.sizes["sample"] == 40
    assert sorted(table["field_1"].values.tolist()) == list(range(40))
    assert np.array_equal(table["features"].values[:, 0], 2.0 * table["field_1"].values)
    report = verify_store(FeatureStore.open(tmp_path / "f.zarr"))
    assert report["ok"], report


def test_an_iterator_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="re-iterable"):
        CachedIterableDataset(iter([{"__key__": "a"}]), torch.nn.Identity(), tmp_path / "f.zarr")


@pytest.mark.slow
def test_plain_dataloader_workers_each_take_their_own_records(tmp_path: Path) -> None:
    """Iterated inside a DataLoader with workers, each worker takes its split (split="records")."""
    paths = write_shards(tmp_path, 60, 30)
    expected = expected_rows(paths)
    cached, _ = make(paths, tmp_path / "f.zarr", Decoder(), cache_only=False)
    loader = torch.utils.data.DataLoader(cached, batch_size=None, num_workers=2)
    check_exact(list(loader), expected)
    assert cached.completed() is None  # a worker sees its split only: no pass is recorded complete
    check_exact(list(cached), expected)  # ... but every row was stored: nothing computed here
    assert cached.module_calls == 0


@pytest.mark.slow
def test_spot_checks_decoded_in_workers_are_compared_in_the_main_process(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, 64, 32)
    cached, _ = make(paths, tmp_path / "f.zarr", Decoder(), spot_check=64, cache_only=False)
    list(cached.loader(num_workers=2))
    list(cached.loader(num_workers=2))  # hits decoded again in the workers: nothing changed
    assert cached.decodes == 128
    write_shards(tmp_path, 64, 32, seed=1)
    with pytest.raises(StaleFeaturesError, match="stale"):
        list(cached.loader(num_workers=2))
