"""Variable-length (ragged) module outputs and fields: stored unpadded, served padded.

Real stores on disk, real DataLoader workers. See docs/concepts/variable-length.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cachedfeatures import CachedFeatureDataset, FeatureStore, FieldNotStorableError, RaggedBatch, pad_collate
from cachedfeatures.cli import main as cli_main
from cachedfeatures.maintenance import verify_store

DIM = 8


def length_of(index: int) -> int:
    return 1 + (index * 7) % 13


class Tokens(Dataset[Any]):
    """Samples of ``length_of(i)`` token ids each, with a label; counts raw loads."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.loads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        self.loads += 1
        tokens = (torch.arange(length_of(index)) * 5 + index) % 97
        return {"tokens": tokens, "label": index % 5}


class Embed(nn.Module):
    """Token embeddings, one ``(L_i, DIM)`` tensor per sample (a list: a ragged output)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(torch.randn(97, DIM, generator=generator), requires_grad=False)

    def forward(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.table[tokens] * 1.5 for tokens in batch]


class EmbedNested(Embed):
    """The same, returned as a ``torch.nested`` jagged tensor."""

    def forward(self, batch: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return torch.nested.nested_tensor(super().forward(batch), layout=torch.jagged)


def direct(index: int) -> torch.Tensor:
    return Embed().table[Tokens(index + 1)[index]["tokens"]] * 1.5


def make(store: Path, n: int = 40, module: nn.Module | None = None, **kwargs: Any) -> CachedFeatureDataset:
    kwargs.setdefault("chunk_rows", 8)
    kwargs.setdefault("batch_size", 8)
    return CachedFeatureDataset(
        Tokens(n), (module or Embed()).eval(), store, input_key="tokens", collate_fn=list, **kwargs
    )


def test_ragged_output_served_unpadded_and_hits_equal_misses(store_path: Path) -> None:
    cached = make(store_path, spot_check=0)
    spec = cached.entry.specs[0]
    assert (spec.name, spec.ragged, spec.shape) == ("features", True, (DIM,))
    misses = cached.__getitems__(list(range(40)))
    loads = cached.dataset.loads
    hits = cached.__getitems__(list(range(40)))
    assert cached.dataset.loads == loads  # hits need nothing from the raw dataset
    for index, (miss, hit) in enumerate(zip(misses, hits, strict=True)):
        assert hit["tokens"].shape == (length_of(index), DIM)
        assert torch.equal(miss["tokens"], hit["tokens"])  # bit-identical
        assert torch.equal(hit["tokens"], direct(index))
        assert hit["label"] == miss["label"] == index % 5


def test_store_is_plain_zarr_without_padding(store_path: Path) -> None:
    cached = make(store_path, compressor=None, checksum=False, spot_check=0)
    cached.__getitems__(list(range(40)))
    entry = zarr.open_group(store_path, mode="r")[cached.entry_name]
    chunk_rows = entry["valid"].chunks[0]
    for i in (0, 5, 17, 39):  # the recipe of docs/concepts/variable-length.md
        start, stop = entry["features.offsets"][i]
        row = entry[f"features.values/{i // chunk_rows}"][start:stop]
        assert bool(entry["valid"][i])
        np.testing.assert_array_equal(row, direct(i).numpy())
    # Only the real values are stored: no padding to the longest row.
    real = sum(length_of(i) for i in range(40)) * DIM * 4
    values = sum(
        path.stat().st_size
        for path in (store_path / cached.entry_name / "features.values").rglob("*")
        if path.is_file() and path.name != "zarr.json"
    )
    assert values == real


def test_rows_written_in_random_order_and_batches(store_path: Path) -> None:
    cached = make(store_path, n=48, spot_check=0, batch_size=3)
    order = np.random.default_rng(1).permutation(48)
    for start in range(0, 48, 5):  # every chunk is written several times, rows in any order
        served = cached.__getitems__(order[start : start + 5].tolist())
        for index, sample in zip(order[start : start + 5], served, strict=True):
            assert torch.equal(sample["tokens"], direct(int(index)))
    assert cached.entry.valid_mask().all()
    reopened = make(store_path, n=48, spot_check=0)
    loads = reopened.dataset.loads
    for index, sample in enumerate(reopened.__getitems__(list(range(48)))):
        assert torch.equal(sample["tokens"], direct(index))
    assert reopened.dataset.loads == loads


@pytest.mark.slow  # torch.nested's first use takes seconds
def test_nested_jagged_output_is_detected(store_path: Path) -> None:
    cached = make(store_path, module=EmbedNested(), spot_check=0)
    assert cached.entry.specs[0].ragged
    cached.__getitems__(list(range(40)))
    for index, sample in enumerate(cached.__getitems__(list(range(40)))):
        assert torch.equal(sample["tokens"], direct(index))


def check_batch(batch: dict[str, Any], rows: list[int]) -> None:
    features = batch["tokens"]
    assert isinstance(features, RaggedBatch)
    assert features.lengths.tolist() == [length_of(i) for i in rows]
    assert features.values.shape == (len(rows), max(length_of(i) for i in rows), DIM)
    for k, index in enumerate(rows):
        length = length_of(index)
        assert torch.equal(features.values[k, :length], direct(index))
        assert not features.values[k, length:].any()  # padding
        assert features.mask[k].sum() == length
    assert batch["label"].tolist() == [i % 5 for i in rows]


def test_dataloader_with_two_workers_and_pad_collate(store_path: Path) -> None:
    cached = make(store_path, spot_check=0)
    cached.__getitems__(list(range(40)))  # fill
    loader = DataLoader(cached, batch_size=8, num_workers=2, collate_fn=cached.pad_collate)
    for number, batch in enumerate(loader):
        check_batch(batch, list(range(number * 8, number * 8 + 8)))
    nested = pad_collate([cached[3], cached[4]], nested=True)["tokens"]
    assert nested.is_nested
    assert torch.equal(nested.unbind()[1], direct(4))


def test_pad_collate_pads_a_ragged_position_even_when_lengths_agree(store_path: Path) -> None:
    cached = make(store_path, spot_check=0)
    same = [i for i in range(40) if length_of(i) == length_of(0)][:2]
    assert len(same) == 2
    batch = cached.pad_collate(cached.__getitems__(same))
    assert isinstance(batch["tokens"], RaggedBatch)
    plain = pad_collate(cached.__getitems__(same))["tokens"]
    assert isinstance(plain, torch.Tensor)  # without the dataset's positions: a plain stack


@pytest.mark.slow
def test_loader_and_prefill_serve_padded_batches(store_path: Path) -> None:
    cached = make(store_path, n=64, spot_check=0)
    result = cached.prefill(progress=False)
    assert result.computed == 64 - 1  # the entry's probe row was stored when it was created
    assert cached.entry.valid_mask().all()
    loads = cached.dataset.loads
    seen: list[int] = []
    for batch in cached.loader(batch_size=16, shuffle=True, num_workers=2, worker_method="process"):
        features = batch["tokens"]
        assert isinstance(features, RaggedBatch)
        for k in range(len(features.lengths)):
            values = features.values[k, : features.lengths[k]]
            matches = [i for i in range(64) if length_of(i) == len(values) and torch.equal(values, direct(i))]
            seen.extend(matches)
    assert sorted(seen) == list(range(64))
    assert cached.dataset.loads == loads


def test_budget_prunes_whole_chunks_values_included(store_path: Path) -> None:
    cached = make(store_path, n=64, spot_check=0, compressor=None, max_bytes="16KiB")
    for start in range(0, 64, 8):
        cached.__getitems__(list(range(start, start + 8)))
    entry = cached.entry
    store = FeatureStore.open(store_path)
    assert store.nbytes_stored() <= 16 * 1024
    kept = {chunk for chunk in range(entry.num_chunks) if entry.valid_mask()[chunk * 8 : chunk * 8 + 8].any()}
    assert 0 < len(kept) < entry.num_chunks
    values_dirs = {int(p.name) for p in (store_path / entry.name / "features.values").iterdir() if p.is_dir()}
    assert values_dirs == kept  # dropped chunks lost their values arrays too
    assert entry.nbytes_per_chunk()[sorted(kept)].min() > 0
    for index, sample in enumerate(cached.__getitems__(list(range(64)))):
        assert torch.equal(sample["tokens"], direct(index))


def test_verify_finds_and_repairs_a_damaged_values_chunk(store_path: Path, caplog: Any) -> None:
    cached = make(store_path, spot_check=0, compressor=None)
    cached.__getitems__(list(range(40)))
    store = FeatureStore.open(store_path, mode="a")
    assert verify_store(store)["ok"]
    chunk_file = store_path / cached.entry_name / "features.values" / "2" / "c" / "0" / "0"
    chunk_file.write_bytes(chunk_file.read_bytes()[:-9])  # truncated
    fresh = make(store_path, spot_check=0)
    with caplog.at_level(logging.WARNING):
        served = fresh.__getitems__(list(range(16, 24)))  # chunk 2: a miss, recomputed
    assert "cannot be read" in caplog.text
    for index, sample in zip(range(16, 24), served, strict=True):
        assert torch.equal(sample["tokens"], direct(index))
    chunk_file.write_bytes(b"garbage")
    report = verify_store(store)
    assert not report["ok"]
    assert [p["chunk"] for p in report["problems"]] == [2]
    assert verify_store(store, repair=True)["problems"][0]["repaired"]
    assert verify_store(store)["ok"]
    assert not fresh.entry.valid_mask()[16:24].any()


def test_explore_api_xarray_and_cli_info(store_path: Path, capsys: Any) -> None:
    cached = make(store_path, spot_check=0)
    cached.__getitems__(list(range(0, 40, 2)))
    entry = FeatureStore.open(store_path)[cached.entry_name]
    info = entry.info()
    features = next(a for a in info.arrays if a.name == "features")
    assert features.shape == ("L", DIM) and features.chunks == (8,)
    assert "features float32(L, 8)" in repr(entry)
    rows = entry.features(rows=[4, 6])
    assert [r.shape for r in rows] == [(length_of(4), DIM), (length_of(6), DIM)]
    np.testing.assert_array_equal(rows[1], direct(6).numpy())
    assert torch.equal(entry.features(rows=[6], as_="torch")[0], direct(6))
    everything = entry.features()
    assert len(everything) == 20
    assert entry.read_fields([4, 6])["label"].tolist() == [4, 1]
    assert 0.2 < info.compression_ratio < 20  # half-filled tiny chunks, metadata counted

    xr = pytest.importorskip("xarray")
    ds = entry.to_xarray()
    assert isinstance(ds, xr.Dataset)
    assert ds["features.offsets"].dims == ("sample", "bound")
    assert ds["features.values"].dims == ("features_value", "features_dim1")
    start, stop = ds["features.offsets"].sel(sample=6).values
    np.testing.assert_array_equal(ds["features.values"].values[start:stop], direct(6).numpy())
    assert ds.sizes["features_value"] == sum(length_of(i) for i in range(0, 40, 2))

    assert cli_main(["info", str(store_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    arrays = report["entries"][0]["arrays"]
    assert {"name": "features", "dtype": "float32", "shape": ["L", DIM], "ragged": True} in arrays
    assert cli_main(["info", str(store_path)]) == 0
    assert "features float32 ('L', 8)" in capsys.readouterr().out


def test_spot_check_compares_ragged_rows(store_path: Path) -> None:
    cached = make(store_path)
    cached.__getitems__(list(range(40)))
    assert cached.spot_check(8) == 8


# -- variable-length passthrough fields ------------------------------------------------------


class Fielded(Dataset[Any]):
    """Fixed inputs with variable-length fields: token ids (a list), boxes (a tensor), scores
    (an array), a string of any length."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.loads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        self.loads += 1
        count = index % 4
        return {
            "x": torch.full((3,), float(index)),
            "ids": [index * 10 + k for k in range(length_of(index) - 1)],  # some are empty
            "boxes": torch.arange(count * 4, dtype=torch.float32).reshape(count, 4) + index,
            "scores": np.linspace(0, 1, count + 1, dtype=np.float32),
            "name": "s" * index,
        }


class Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_variable_length_fields_are_stored_and_served_as_they_were(store_path: Path) -> None:
    data = Fielded(24)
    cached = CachedFeatureDataset(data, Double(), store_path, input_key="x", chunk_rows=8, spot_check=0)
    specs = {spec.name: spec for spec in cached.entry.specs}
    assert [name for name in ("ids", "boxes", "scores") if specs[name].ragged] == ["ids", "boxes", "scores"]
    misses = cached.__getitems__(list(range(24)))
    loads = data.loads
    hits = CachedFeatureDataset(Fielded(24), Double(), store_path, input_key="x", spot_check=0)
    served = hits.__getitems__(list(range(24)))
    assert hits.dataset.loads == hits.probe_loads  # nothing from the raw dataset but its probes
    assert data.loads == loads
    for index, (miss, hit) in enumerate(zip(misses, served, strict=True)):
        want = Fielded(24)[index]
        for sample in (miss, hit):
            assert sample["ids"] == want["ids"] and all(type(i) is int for i in sample["ids"])
            assert torch.equal(sample["boxes"], want["boxes"])
            assert isinstance(sample["scores"], np.ndarray) and sample["scores"].dtype == np.float32
            np.testing.assert_array_equal(sample["scores"], want["scores"])
            assert sample["name"] == want["name"]
            assert torch.equal(sample["x"], want["x"] * 2)
    batch = next(iter(DataLoader(hits, batch_size=6, num_workers=2, collate_fn=hits.pad_collate)))
    assert isinstance(batch["ids"], RaggedBatch) and isinstance(batch["boxes"], RaggedBatch)
    assert batch["ids"].lengths.tolist() == [length_of(i) - 1 for i in range(6)]
    assert batch["ids"].values[2, : length_of(2) - 1].tolist() == Fielded(24)[2]["ids"]
    assert batch["boxes"].values.shape == (6, 3, 4)
    assert batch["name"] == ["s" * i for i in range(6)]
    assert batch["x"].shape == (6, 3)


class SameLengthProbes(Fielded):
    """Boxes of one length in every sample the probes load, another length elsewhere."""

    def __getitem__(self, index: int) -> Any:
        sample = super().__getitem__(index)
        sample["boxes"] = torch.ones(2 + (index == 5), 4)
        return sample


def test_a_field_can_be_declared_ragged(store_path: Path) -> None:
    data = SameLengthProbes(24)
    declared = CachedFeatureDataset(
        data, Double(), store_path, input_key="x", spot_check=0, ragged={"boxes": True}
    )
    assert {spec.name: spec.ragged for spec in declared.entry.specs}["boxes"]
    assert declared[5]["boxes"].shape == (3, 4)
    assert declared[6]["boxes"].shape == (2, 4)


# -- declared: a padded output and its mask ----------------------------------------------------


def pad_tokens(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A tokenizer-like collate: padded ids and an attention mask."""
    tokens = [sample["tokens"] for sample in batch]
    ids = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True, padding_value=0)
    mask = torch.zeros(ids.shape, dtype=torch.int64)
    for k, row in enumerate(tokens):
        mask[k, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class PaddedEncoder(Embed):
    """Returns padded token embeddings ``(B, T, DIM)`` (and optionally the mask) like a
    transformers encoder; padded positions hold garbage that must not be stored."""

    def __init__(self, return_mask: str = "") -> None:
        super().__init__()
        self.return_mask = return_mask  # "", "mask" or "lengths": what it returns beside the hidden states

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:  # type: ignore[override]
        hidden = self.table[batch["input_ids"]] * 1.5
        hidden = torch.where(
            batch["attention_mask"].bool().unsqueeze(-1), hidden, torch.full_like(hidden, 7.0)
        )
        if self.return_mask == "mask":
            return {"hidden": hidden, "mask": batch["attention_mask"]}
        if self.return_mask == "lengths":
            return {"hidden": hidden, "lengths": batch["attention_mask"].sum(dim=1)}
        return hidden


class WholeSamples(Tokens):
    def __getitem__(self, index: int) -> Any:
        return {"input": super().__getitem__(index), "label": index % 5}


@pytest.mark.parametrize("return_mask", ["", "mask", "lengths"])
def test_padded_output_with_a_mask_stores_only_real_positions(store_path: Path, return_mask: str) -> None:
    ragged = {"hidden": return_mask} if return_mask else {"features": "attention_mask"}
    cached = CachedFeatureDataset(
        WholeSamples(40),
        PaddedEncoder(return_mask).eval(),
        store_path,
        input_key="input",
        collate_fn=pad_tokens,
        chunk_rows=8,
        batch_size=8,
        spot_check=0,
        ragged=ragged,
    )
    misses = cached.__getitems__(list(range(40)))
    hits = cached.__getitems__(list(range(40)))
    for index, (miss, hit) in enumerate(zip(misses, hits, strict=True)):
        features = hit["input"]["hidden"] if return_mask else hit["input"]
        if return_mask:
            assert list(hit["input"]) == ["hidden"]  # the mask is used, not stored
        assert torch.equal(features, direct(index))
        assert torch.equal(features, miss["input"]["hidden"] if return_mask else miss["input"])
    stored = cached.entry.nbytes_logical()
    assert stored > 0
    assert cached.entry.compression_ratio() == cached.entry.compression_ratio()  # not nan


def test_ragged_option_names_are_checked(store_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Expected the names in ragged= .*Got \['nope'\]"):
        make(store_path, ragged={"nope": True})
    with pytest.raises(TypeError, match="Expected ragged to map array names"):
        make(store_path, ragged={"features": 3})
    with pytest.raises(Exception, match="no tensor 'attention_mask' in the module's output"):
        make(store_path, ragged={"features": "attention_mask"})


def test_a_chunk_whose_values_vanished_is_rewritten_from_scratch(store_path: Path) -> None:
    cached = make(store_path, spot_check=0)
    cached.__getitems__([0, 1, 2, 3])
    values = store_path / cached.entry_name / "features.values" / "0"
    for path in sorted(values.rglob("*"), reverse=True):  # damage: chunk 0's values are gone
        path.unlink() if path.is_file() else path.rmdir()
    served = cached.__getitems__([4, 5, 6, 7])  # misses written into the damaged chunk
    for index, sample in zip(range(4, 8), served, strict=True):
        assert torch.equal(sample["tokens"], direct(index))
    assert cached.entry.valid_mask()[:8].tolist() == [False] * 4 + [True] * 4
    for index, sample in enumerate(cached.__getitems__(list(range(8)))):
        assert torch.equal(sample["tokens"], direct(index))


def test_a_reader_never_serves_a_chunk_another_writer_laid_out_anew(store_path: Path) -> None:
    reader = make(store_path, spot_check=0)
    reader.__getitems__([1, 3, 5])  # chunk 0 half filled, now in the reader's chunk cache
    assert [s["tokens"].shape[0] for s in reader.__getitems__([1, 3, 5])] == [length_of(i) for i in (1, 3, 5)]
    writer = make(store_path, spot_check=0)
    writer.__getitems__([0, 2, 4, 6, 7])  # rewrites chunk 0: every row's values move
    loads = reader.dataset.loads
    for index, sample in enumerate(reader.__getitems__(list(range(8)))):
        assert torch.equal(sample["tokens"], direct(index))
    assert reader.dataset.loads == loads  # all hits, read afresh


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_collated_hits_are_the_read_buffer_and_equal_padded_misses(store_path: Path, dtype: Any) -> None:
    cached = make(store_path, spot_check=0, dtype=dtype)
    rows = [9, 2, 30, 17, 4]
    misses = cached.pad_collate(cached.__getitems__(rows))["tokens"]  # computed: padded by copy
    samples = cached.__getitems__(rows)  # hits, read into one zero-padded buffer
    hits = cached.pad_collate(samples)["tokens"]
    assert hits.values.dtype == (dtype or torch.float32)
    assert hits.values.data_ptr() == samples[0]["tokens"].data_ptr()  # no copy of the rows
    assert torch.equal(hits.values, misses.values) and torch.equal(hits.lengths, misses.lengths)
    clones = [sample["tokens"].clone() for sample in samples]
    assert torch.equal(hits.values, torch.nn.utils.rnn.pad_sequence(clones, batch_first=True))
    some = cached.pad_collate(samples[1:])["tokens"]  # not the whole buffer: padded by copy
    assert some.values.data_ptr() != samples[1]["tokens"].data_ptr()
    assert torch.equal(some.values, torch.nn.utils.rnn.pad_sequence(clones[1:], batch_first=True))


def test_views_of_another_buffer_are_padded_by_copy() -> None:
    buffer = torch.full((2, 5, 3), 9.0)  # "padding" that is not zero
    rows = [buffer[0, :2], buffer[1, :5]]
    batch = pad_collate([rows[0], rows[1]])
    assert batch.values.data_ptr() != buffer.data_ptr()
    assert not batch.values[0, 2:].any()


def test_two_workers_computing_misses_into_shared_chunks(store_path: Path) -> None:
    cached = make(store_path, n=48, spot_check=0, batch_size=4)
    order = np.random.default_rng(3).permutation(48).tolist()  # batches share chunks across workers
    loader = DataLoader(cached, batch_size=4, sampler=order, num_workers=2, collate_fn=cached.pad_collate)
    served = []
    for batch in loader:
        served.extend(batch["tokens"].unpadded())
    for index, row in zip(order, served, strict=True):
        assert torch.equal(row, direct(index))
    reopened = make(store_path, n=48, spot_check=0)
    assert reopened.entry.valid_mask().all()  # every worker's rows survived the others' rewrites
    loads = reopened.dataset.loads
    for index, sample in enumerate(reopened.__getitems__(list(range(48)))):
        assert torch.equal(sample["tokens"], direct(index))
    assert reopened.dataset.loads == loads


class TinyBert(nn.Module):
    """A small randomly initialised transformers BertModel, called on a tokenizer-like batch;
    returns the padded last hidden states (B, T, 32)."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(
            vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
        torch.manual_seed(0)
        self.bert = transformers.BertModel(config, add_pooling_layer=False).eval()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.bert(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state


@pytest.mark.slow
def test_transformers_token_embeddings_match_the_model_on_real_tokens(store_path: Path) -> None:
    module = TinyBert().eval()
    cached = CachedFeatureDataset(
        WholeSamples(40),
        module,
        store_path,
        input_key="input",
        collate_fn=pad_tokens,
        batch_size=16,
        compressor=None,
        ragged={"features": "attention_mask"},
    )
    cached.__getitems__(list(range(40)))
    served = cached.__getitems__(list(range(40)))
    with torch.inference_mode():
        for index, sample in enumerate(served):
            tokens = Tokens(40)[index]["tokens"].unsqueeze(0)
            alone = module.bert(input_ids=tokens).last_hidden_state[0]
            assert sample["input"].shape == (length_of(index), 32)
            torch.testing.assert_close(sample["input"], alone, atol=1e-5, rtol=1e-5)
    values = sum(
        path.stat().st_size
        for path in (store_path / cached.entry_name / "features.values").rglob("*")
        if path.is_file() and path.name != "zarr.json"
    )
    real = sum(length_of(i) for i in range(40)) * 32 * 4
    assert values <= 1.001 * real + 4 * cached.entry.num_chunks  # the real tokens' bytes and checksums


class Clashing(Fielded):
    def __getitem__(self, index: int) -> Any:
        sample = super().__getitem__(index)
        return {"x": sample["x"], "ids": sample["ids"], "ids.offsets": 3}


def test_a_field_named_like_a_ragged_fields_offsets_is_refused(store_path: Path) -> None:
    with pytest.raises(FieldNotStorableError, match=r"'ids\.offsets' has the name of the offsets"):
        CachedFeatureDataset(Clashing(8), Double(), store_path, input_key="x")


def test_xarray_of_every_row_keeps_offsets_as_ints(store_path: Path) -> None:
    pytest.importorskip("xarray")
    cached = make(store_path, spot_check=0)
    cached.__getitems__([0, 3])
    ds = cached.entry.to_xarray(valid_only=False)
    offsets = ds["features.offsets"].values
    assert offsets.dtype == np.int64
    assert offsets[1].tolist() == [-1, -1]
    assert offsets[3].tolist() == [length_of(0), length_of(0) + length_of(3)]


def test_pad_collate_gives_lists_of_ints_an_int_batch_even_with_empty_rows() -> None:
    batch = pad_collate([{"ids": []}, {"ids": [1, 2]}, {"ids": [3]}])["ids"]
    assert batch.values.dtype == torch.int64
    assert batch.values.tolist() == [[0, 0], [1, 2], [3, 0]] and batch.lengths.tolist() == [0, 2, 1]
    assert pad_collate([{"ids": []}, {"ids": []}])["ids"].values.dtype == torch.int64
    assert pad_collate([[0.5], [1, 2]]).values.dtype == torch.float32  # samples that are lists


def test_a_second_creator_keeps_the_ragged_rows_another_already_stored(store_path: Path) -> None:
    """Found in review: creating a ragged entry reset its offsets and values even where another
    process (which looked before the entry's attrs landed) had stored rows, leaving them valid
    without values. Creation keeps an identical offsets array and values group, rows and all."""
    first = make(store_path, spot_check=0)
    first.__getitems__(list(range(16)))
    entry = first.entry
    assert entry is not None
    meta, specs = dict(entry.meta), entry.specs
    store = FeatureStore.open(store_path, mode="a")
    group = store.root[entry.name]
    del group.attrs["cachedfeatures"]  # as a process sees the entry before its creator's attrs
    store.create_entry(
        entry.name, meta, specs, num_rows=entry.num_rows, chunk_rows=entry.chunk_rows, compressor="default"
    )
    again = make(store_path, spot_check=0)
    served = again.__getitems__(list(range(16)))
    assert again.module_calls == 0  # every row still stored: hits
    for index, row in enumerate(served):
        assert torch.equal(row["tokens"], direct(index))


def test_a_served_ragged_row_changed_in_place_does_not_change_what_is_stored(store_path: Path) -> None:
    """Found in review: a held ragged row shared memory with the tensor served to the caller, so a
    transform changing a served sample in place changed what was later stored."""
    cached = make(store_path, spot_check=0)
    batch = next(iter(DataLoader(cached, batch_size=3, sampler=[9, 10, 11], collate_fn=list)))
    assert cached.held_bytes > 0  # held: the chunk is not complete
    for sample in batch:
        sample["tokens"].mul_(7)  # the user's transform, in place
    cached.flush()
    stored = make(store_path, spot_check=0).__getitems__([9, 10, 11])
    for index, row in zip([9, 10, 11], stored, strict=True):
        assert torch.equal(row["tokens"], direct(index))


def test_a_list_mixing_ints_and_floats_comes_back_as_it_was(store_path: Path) -> None:
    """Found by the property tests: such a list was stored as floats, so its ints came back as
    floats (and one past 2**53 changed). It is stored item by item now, each as it was."""

    class Mixed(Dataset[Any]):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> Any:
            return {"x": torch.full((2,), float(index)), "scores": [2**60 + index, 0.5]}

    cached = CachedFeatureDataset(Mixed(), nn.Identity(), store_path, input_key="x", spot_check=0)
    cached.__getitems__([0, 1, 2, 3])
    again = CachedFeatureDataset(Mixed(), nn.Identity(), store_path, input_key="x", spot_check=0)
    for index, sample in enumerate(again.__getitems__([0, 1, 2, 3])):
        assert sample["scores"] == [2**60 + index, 0.5] and type(sample["scores"][0]) is int
    assert again.module_calls == 0
