"""Batches made straight from stored columns: exactly what collating the samples gives.

The property test builds random sample and output structures, stores nothing, and compares
``BatchAssembler`` with ``collate(build_many(...))`` (the per-sample path it replaces); the
others run it end to end: ``cached.loader()``, ``cached[rows]`` and the plain-DataLoader recipe
``DataLoader(cached, batch_size=None, sampler=cached.batch_sampler(...))``, on the CPU and,
where there is one, a CUDA device.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchdata.nodes as tn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Subset, default_collate
from torch.utils.data._utils.collate import collate, default_collate_fn_map

from cachedfeatures import CachedFeatureDataset, ChunkShuffleSampler, PadCollate, RaggedBatch
from cachedfeatures.compute.layout import OutputLayout, SampleLayout, ragged_positions
from cachedfeatures.errors import InvalidArgumentError
from cachedfeatures.pipeline.collate import BatchAssembler, carry_batch, move_to
from cachedfeatures.pipeline.nodes import IndexBatches, Indices
from tests.helpers import SHAPES, Backbone, Samples, assert_same

# -- comparing batches exactly ---------------------------------------------------------------------


def has_list_of_numbers(sample: SampleLayout) -> bool:
    """Whether a list in the template holds plain numbers only (each a field of its own)."""
    kinds = {spec.name: spec.kind for spec in sample.fields}

    def walk(node: Mapping[str, Any]) -> bool:
        items = node.get("items", [])
        numbers = all(
            item["kind"] == "field" and kinds[item["name"]] in ("int", "float", "bool") for item in items
        )
        return (node["kind"] == "list" and numbers) or any(walk(item) for item in items)

    return walk(sample.template)


def per_sample(sample: SampleLayout, outputs: OutputLayout, columns: Mapping[str, np.ndarray]) -> list[Any]:
    """The samples of ``columns`` one by one: ``CachedFeatureDataset.assemble_all``'s path."""
    tensors = {
        spec.name: (spec.numpy_to_tensors if spec.ragged else spec.numpy_to_tensor)(columns[spec.name])
        for spec in outputs.arrays
    }
    return sample.build_many(outputs.unbind(tensors), columns)


def outcome(make: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", make()
    except Exception as error:
        return "raised", type(error)


# -- random samples ------------------------------------------------------------------------------

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]
NP_DTYPES = ["<f4", "<f8", "<f2", "<i8", "<i2", "|u1", "<u2", "<u8", "|b1", "<c8", ">f4"]


@st.composite
def leaves(draw: st.DrawFn, n: int) -> list[Any]:
    """One leaf value for each of ``n`` samples, all of one kind."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    kind = draw(
        st.sampled_from(["tensor", "ndarray", "npscalar", "int", "float", "bool", "str", "numbers", "ragged"])
    )
    shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    if kind == "tensor":
        dtype = draw(st.sampled_from(DTYPES))
        return [torch.from_numpy(np.asarray(rng.standard_normal(shape) * 3)).to(dtype) for _ in range(n)]
    if kind == "ndarray":
        dtype = np.dtype(draw(st.sampled_from(NP_DTYPES)))
        return [np.asarray(rng.standard_normal(shape) * 3).astype(dtype) for _ in range(n)]
    if kind == "npscalar":
        dtype = np.dtype(draw(st.sampled_from(NP_DTYPES[:-1])))
        return [dtype.type(rng.integers(0, 3)) for _ in range(n)]
    if kind == "int":
        return [int(rng.integers(-5, 5)) for _ in range(n)]
    if kind == "float":
        return [int(k) if k % 2 else float(rng.standard_normal()) for k in range(n)]  # ints among floats
    if kind == "bool":
        return [bool(rng.integers(0, 2)) for _ in range(n)]
    if kind == "str":
        return [draw(st.text(max_size=4)) for _ in range(n)]
    if kind == "numbers":
        floats = draw(st.booleans())
        return [
            [float(v) if floats else int(v) for v in rng.integers(0, 9, size=int(rng.integers(k == 0, 4)))]
            for k in range(n)  # the first not empty: an empty list is taken for one of ints
        ]
    lengths = rng.integers(1, 5, size=n)  # a tensor field whose first dimension varies: ragged
    lengths[0], lengths[-1] = 1, 2
    return [torch.from_numpy(rng.standard_normal((int(length), *shape))).float() for length in lengths]


@st.composite
def containers(draw: st.DrawFn, n: int, depth: int) -> list[Any]:
    """``n`` samples of one random structure (without the input)."""
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(leaves(n))
    kind = draw(st.sampled_from(["tuple", "list", "dict"]))
    parts = draw(st.lists(containers(n, depth - 1), max_size=3))
    if kind == "dict":
        keys = [f"k{i}" for i in range(len(parts))]
        return [{key: part[k] for key, part in zip(keys, parts, strict=True)} for k in range(n)]
    made = [[part[k] for part in parts] for k in range(n)]
    return [tuple(items) for items in made] if kind == "tuple" else made


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[Any], Any, Any]:
    """Samples holding an input, the input key, and the module's (batched) output for them."""
    n = draw(st.integers(2, 5))
    inputs = [torch.full((2,), float(k)) for k in range(n)]
    kind = draw(st.sampled_from(["tensor", "tuple", "dict"]))
    others = draw(st.lists(containers(n, 2), max_size=3))
    input_key: Any
    if kind == "tensor" and not others:
        samples, input_key = inputs, 0
    elif kind == "dict":
        keys = [f"f{i}" for i in range(len(others))]
        samples = [
            {"x": inputs[k], **{key: o[k] for key, o in zip(keys, others, strict=True)}} for k in range(n)
        ]
        input_key = "x"
    else:
        at = draw(st.integers(0, len(others)))
        samples = [
            tuple([*(o[k] for o in others[:at]), inputs[k], *(o[k] for o in others[at:])]) for k in range(n)
        ]
        input_key = at
    out = draw(st.sampled_from(["tensor", "tuple", "dict", "ragged", "ragged-in-dict", "bf16"]))
    x = torch.stack(inputs)
    output: Any = {
        "tensor": x * 2,
        "tuple": (x, x.sum(1)),  # a 0-d row per sample
        "dict": {"a": x.to(torch.float16), "b a": x.long()},
        "ragged": [torch.arange(k + 1.0).repeat(2, 1).T for k in range(n)],
        "ragged-in-dict": {
            "seq": torch.nested.nested_tensor([torch.ones(k + 1, 3) for k in range(n)], layout=torch.jagged),
            "cls": x,
        },
        "bf16": x.to(torch.bfloat16),
    }[out]
    return samples, input_key, output


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.sampled_from(["default", "pad", "pad-nested", "pad-value"]))
def test_batch_assembler_equals_collating_the_samples(case: tuple[list[Any], Any, Any], collate: str) -> None:
    samples, input_key, output = case
    n = len(samples)
    sample = SampleLayout.from_sample(samples[0], input_key, others=samples[1:])
    outputs = OutputLayout.from_output(output, n, None, detect_ragged=True)
    split = outputs.split(output, n, None)
    columns = {spec.name: spec.tensor_batch_to_numpy(split[spec.name]) for spec in outputs.arrays}
    columns.update(sample.field_values(samples))
    ragged = ragged_positions(sample, outputs)
    collate_fn: Any = {
        "default": default_collate,
        "pad": PadCollate(ragged),
        "pad-nested": PadCollate(ragged, nested=True),
        "pad-value": PadCollate(ragged, padding_value=-1.0),
    }[collate]
    assembler = BatchAssembler.of(collate_fn, sample, outputs)
    if collate == "default" and ragged:
        assert assembler is None  # default_collate cannot stack rows of different lengths
        return
    if collate != "default" and has_list_of_numbers(sample):
        assert assembler is None  # PadCollate pads a list [3, True] whose items are stored apart
        return
    assert assembler is not None
    want = outcome(lambda: collate_fn(per_sample(sample, outputs, columns)))
    got = outcome(lambda: assembler(columns))
    # What a DataLoader's fetcher gets from cached.__getitems__: the samples carrying the batch.
    build = functools.partial(assembler, columns)
    samples_carrying = per_sample(sample, outputs, columns)
    carried = outcome(lambda: collate_fn(carry_batch(samples_carrying, build, collate_fn)))
    assert got[0] == want[0] == carried[0], (got, want, carried)
    if want[0] == "raised":  # default_collate refuses some NumPy scalars (uint64): so does the batch
        assert got[1] is want[1] is carried[1]
        return
    assert_same(got[1], want[1])
    assert_same(carried[1], want[1])


def test_strings_come_back_as_default_collate_and_pad_collate_give_them() -> None:
    """default_collate gives strings under a tuple or list as the transposed tuple, under a dict as
    a list; PadCollate makes a list of every group. The batch follows each."""
    samples = [(torch.ones(2), "a", {"s": "x"}), (torch.zeros(2), "b", {"s": "y"})]
    sample = SampleLayout.from_sample(samples[0], 0)
    outputs = OutputLayout.from_output(torch.ones(2, 3), 2, None)
    columns = {"features": np.ones((2, 3), np.float32), **sample.field_values(samples)}
    batch = BatchAssembler(sample, outputs)(columns)
    assert batch[1] == ("a", "b") and batch[2] == {"s": ["x", "y"]}
    padded = BatchAssembler(sample, outputs, PadCollate())(columns)
    assert padded[1] == ["a", "b"] and padded[2] == {"s": ["x", "y"]}


def test_a_collate_of_the_users_or_a_pad_collate_missing_a_ragged_position_gets_none() -> None:
    samples = [(torch.ones(2), [1, 2]), (torch.zeros(2), [3])]
    sample = SampleLayout.from_sample(samples[0], 0, others=samples[1:])
    outputs = OutputLayout.from_output(torch.ones(2, 3), 2, None)
    assert BatchAssembler.of(PadCollate([(1,)]), sample, outputs) is not None
    assert BatchAssembler.of(lambda s: default_collate(s), sample, outputs) is None
    assert BatchAssembler.of(default_collate, sample, outputs) is None  # the ids are ragged
    assert BatchAssembler.of(PadCollate(), sample, outputs) is None  # pads (1,) only where lengths differ
    assert BatchAssembler.of(PadCollate([(1,), ()]), sample, outputs) is None  # pads the whole tuple


# -- end to end ----------------------------------------------------------------------------------


class Ids(torch.utils.data.Dataset[Any]):
    """Samples with an image, a variable-length list of token ids and a name."""

    def __init__(self, n: int) -> None:
        self.data = Samples(n, "tuple")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return {"image": self.data.image(index), "ids": list(range(index % 4)), "name": f"s{index}"}


def per_sample_collate(samples: list[Any]) -> Any:
    return default_collate(samples)


@pytest.mark.parametrize("outputs", ["tensor", "tuple", "dict"])
@pytest.mark.parametrize("shape", SHAPES)
def test_loader_batches_equal_collated_samples(store_path: Path, shape: str, outputs: str) -> None:
    data = Samples(40, shape)
    cached = CachedFeatureDataset(
        data, Backbone(outputs=outputs), store_path, input_key="image" if shape == "dict" else 0, spot_check=0
    )
    for _ in range(2):  # misses computed, then hits read
        fast = list(cached.loader(batch_size=16, shuffle=True, seed=1))
        slow = list(cached.loader(batch_size=16, shuffle=True, seed=1, collate_fn=per_sample_collate))
        assert len(fast) == len(slow) == 3
        for got, want in zip(fast, slow, strict=True):
            assert_same(got, want)


def test_ragged_entry_loader_and_batches_equal_pad_collate(store_path: Path) -> None:
    cached = CachedFeatureDataset(Ids(30), Backbone(), store_path, input_key="image", spot_check=0)
    assert cached.ragged_positions() == [("ids",)]
    pad = cached.pad_collate

    def slow(samples: list[Any]) -> Any:
        return pad(samples)

    for _ in range(2):
        fast = list(cached.loader(batch_size=8))
        for got, want in zip(fast, cached.loader(batch_size=8, collate_fn=slow), strict=True):
            assert isinstance(got["ids"], RaggedBatch)
            assert_same(got, want)
        assert_same(cached[list(range(8))], fast[0])


def test_loader_hands_a_collate_of_the_users_the_samples(store_path: Path, monkeypatch: Any) -> None:
    cached = CachedFeatureDataset(Samples(20, "tuple"), Backbone(), store_path, spot_check=0)
    list(cached.loader(batch_size=8))  # fill
    got: list[Any] = []
    for batch in cached.loader(batch_size=8, collate_fn=lambda samples: got.append(samples) or len(samples)):
        assert batch in (8, 4)
    assert [len(samples) for samples in got] == [8, 8, 4]
    assert all(isinstance(s, tuple) and s[0].shape == (16,) and type(s[1]) is int for s in got[0])

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the default collate built a sample per row")

    monkeypatch.setattr(SampleLayout, "build_many", refuse)
    assert len(list(cached.loader(batch_size=8, num_workers=2))) == 3  # straight from the columns
    assert cached[[1, 2]][0].shape == (2, 16)
    with pytest.raises(AssertionError, match="a sample per row"):
        list(cached.loader(batch_size=8, collate_fn=per_sample_collate))


def test_indexing_with_several_rows_gives_their_batch(store_path: Path) -> None:
    data = Samples(20, "dict")
    cached = CachedFeatureDataset(data, Backbone(), store_path, input_key="image", spot_check=0)
    rows = [3, 3, -1, 7]
    want = default_collate(cached.__getitems__(rows))  # computed (and stored) on the way
    for index in (rows, np.array(rows), torch.tensor(rows)):
        assert_same(cached[index], want)
    for one in (5, np.int64(5), np.array(5), torch.tensor(5)):  # one index: one sample, as before
        assert cached[one]["label"] == 5 and cached[one]["image"].shape == (16,)
    empty = cached[[]]
    assert empty["image"].shape == (0, 16) and empty["name"] == []
    with pytest.raises(IndexError):
        cached[[0, 20]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_batch_sampler_recipe(store_path: Path, num_workers: int) -> None:
    """Whole batches through a plain DataLoader: every row once per epoch, in a new order each
    epoch, its own features; misses computed (in the workers) and stored."""
    cached = CachedFeatureDataset(
        Samples(50, "dict"), Backbone(), store_path, input_key="image", spot_check=0
    )
    sampler = cached.batch_sampler(16, shuffle=True, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(cached, batch_size=None, sampler=sampler, num_workers=num_workers)
    assert len(loader) == 4
    orders = []
    for _ in range(2):  # misses computed in the first epoch, hits read in the second
        rows, features = [], []
        for batch in loader:
            assert list(batch) == ["image", "label", "name"] and batch["label"].dtype == torch.int64
            rows.extend(int(name.removeprefix("sample-")) for name in batch["name"])
            features.append(batch["image"])
            assert torch.equal(batch["label"], torch.tensor(rows[-len(batch["name"]) :]) % 7)
        assert sorted(rows) == list(range(50))
        want = default_collate(cached.__getitems__(rows))
        assert torch.equal(torch.cat(features), want["image"])
        orders.append(rows)
        assert cached.entry is not None and cached.entry.valid_mask().all()  # the misses were stored
    assert orders[0] != orders[1]


def _refuse_to_stack(batch: Any, *, collate_fn_map: Any = None) -> Any:
    raise AssertionError("default_collate stacked the samples' tensors again")


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_per_sample_dataloader_takes_the_batch_made_from_the_columns(
    store_path: Path, shape: str, num_workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``DataLoader(cached, batch_size=B)``: ``__getitems__``'s samples carry their batch, which
    ``default_collate`` returns instead of stacking the samples again; it equals collating
    ``cached[i]`` of the rows, in this process and in (forked) workers, through a ``Subset`` too."""
    data = Samples(40, shape)
    cached = CachedFeatureDataset(
        data, Backbone(), store_path, input_key="image" if shape == "dict" else 0, spot_check=0
    )
    cached.prefill(progress=False)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist()
    want = [default_collate([cached[i] for i in order[k : k + 16]]) for k in range(0, 40, 16)]
    subset = Subset(cached, list(range(40)))
    monkeypatch.setitem(default_collate_fn_map, torch.Tensor, _refuse_to_stack)  # forked workers too
    for dataset in (cached, subset):
        got = list(DataLoader(dataset, batch_size=16, sampler=order, num_workers=num_workers))
        assert len(got) == len(want)
        for batch, expected in zip(got, want, strict=True):
            assert_same(batch, expected)
    with pytest.raises(AssertionError, match="stacked the samples"):  # any other caller: samples
        default_collate(cached.__getitems__(order[:16]))


def test_per_sample_dataloader_with_misses_and_a_pad_collate(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Misses computed on the way are carried as well; a ragged entry's ``pad_collate`` takes the
    batch too, and a collate function of the user's gets plain samples."""
    stack = functools.partial(torch.stack, dim=0)  # the module's inputs: not through default_collate
    cached = CachedFeatureDataset(
        Ids(20), Backbone(), store_path, input_key="image", spot_check=0, collate_fn=stack
    )
    pad = cached.pad_collate
    rows = list(range(20))
    with monkeypatch.context() as patched:
        patched.setitem(default_collate_fn_map, torch.Tensor, _refuse_to_stack)
        got = list(DataLoader(cached, batch_size=8, sampler=rows, collate_fn=pad))  # computed
    for k, batch in enumerate(got):
        assert_same(batch, pad([cached[i] for i in rows[8 * k : 8 * k + 8]]))
    seen: list[Any] = []
    list(DataLoader(cached, batch_size=8, collate_fn=lambda samples: seen.extend(samples)))
    assert len(seen) == 20 and all(type(sample) is dict for sample in seen)

    plain = CachedFeatureDataset(Samples(20, "tuple"), Backbone(), store_path, spot_check=0, collate_fn=stack)
    with monkeypatch.context() as patched:
        patched.setitem(default_collate_fn_map, torch.Tensor, _refuse_to_stack)
        batches = list(DataLoader(plain, batch_size=8, sampler=rows))  # computed, held in this process
    for k, batch in enumerate(batches):
        assert_same(batch, default_collate([plain[i] for i in rows[8 * k : 8 * k + 8]]))


def test_wrappers_that_read_the_samples_get_plain_ones(store_path: Path) -> None:
    """Only torch's fetcher (through ``Subset``s) gets a carrying first sample: a ``StackDataset``,
    which builds samples of its own from ours, gets plain ones, and so does a collate of the user's."""
    cached = CachedFeatureDataset(Samples(8, "tuple"), Backbone(), store_path, spot_check=0)
    stacked = torch.utils.data.StackDataset(cached, cached)
    batch = next(iter(DataLoader(stacked, batch_size=4, collate_fn=list)))
    assert all(type(part) is tuple for pair in batch for part in pair)
    samples = next(iter(DataLoader(Subset(cached, [1, 2, 3]), batch_size=3, collate_fn=list)))
    assert [type(sample) for sample in samples] == [tuple] * 3
    want = default_collate([stacked[i] for i in range(4)])
    assert_same(next(iter(DataLoader(stacked, batch_size=4))), want)


@pytest.mark.parametrize("shape", ["tensor", "tuple", "list", "dict"])
def test_carried_batch_only_for_the_list_it_came_with(shape: str) -> None:
    """The first sample equals the sample it stands for; the batch it carries is returned once, for
    its list as it was and the collate it was made for: any other list, a changed one, a second
    collate or another collate function collates the samples themselves."""
    rows = torch.arange(12.0).reshape(4, 3)
    make = {
        "tensor": lambda row, k: row,
        "tuple": lambda row, k: (row, k),
        "list": lambda row, k: [row, k],
        "dict": lambda row, k: {"x": row, "k": k},
    }[shape]

    def samples() -> list[Any]:
        return [make(row, k) for k, row in enumerate(rows.unbind(0))]

    want = default_collate(samples())
    marker = ("carried",)

    def carried() -> list[Any]:
        return carry_batch(samples(), lambda: marker, default_collate)

    original = samples()
    batch = carry_batch(list(original), lambda: marker, default_collate)
    first, sample = batch[0], original[0]
    assert isinstance(first, type(sample)) and batch[1:] == original[1:]
    if shape == "tensor":
        assert torch.equal(first, sample) and type(first + 1) is torch.Tensor
    else:
        items = first.items() if shape == "dict" else enumerate(first)
        assert len(first) == len(sample) and all(value is sample[key] for key, value in items)
    assert default_collate(batch) is marker
    assert_same(default_collate(batch), want)  # a second collate: the samples
    changed = carried()
    changed[2] = samples()[2]  # an equal sample, but not the one it came with
    assert_same(default_collate(changed), want)
    assert_same(default_collate(carried()[:3]), default_collate(samples()[:3]))
    assert_same(collate(carried(), collate_fn_map=dict(default_collate_fn_map)), want)
    if shape != "tensor":
        assert_same(PadCollate()(carried()), PadCollate()(samples()))
    assert_same(default_collate(carry_batch(samples(), lambda: 1 / 0, default_collate)), want)


def test_dataloader_recipe_spot_checks_hits(store_path: Path) -> None:
    cached = CachedFeatureDataset(Samples(40, "tuple"), Backbone(), store_path, spot_check=4)
    cached.prefill(progress=False)
    before = len(cached.spot_checked_rows)
    list(DataLoader(cached, batch_size=None, sampler=cached.batch_sampler(16)))
    assert len(cached.spot_checked_rows) == before + 4


def test_batch_sampler_options(store_path: Path) -> None:
    cached = CachedFeatureDataset(Samples(10, "tuple"), Backbone(), store_path, batch_size=4, spot_check=0)
    assert list(cached.batch_sampler()) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(cached.batch_sampler(3, drop_last=True)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    batched = cached.batch_sampler(5, sampler=ChunkShuffleSampler(10, 2, window=2, seed=0))
    expected = ChunkShuffleSampler(10, 2, window=2, seed=0)
    orders = []
    for epoch in (0, 3):
        batched.set_epoch(epoch)  # reaches the sampler of rows
        expected.set_epoch(epoch)
        orders.append([row for batch in batched for row in batch])
        assert orders[-1] == list(expected)
    assert orders[0] != orders[1]
    with pytest.raises(InvalidArgumentError, match="shuffle=False with a sampler"):
        cached.batch_sampler(sampler=expected, shuffle=True)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        cached.batch_sampler(0)


# -- batches on a device -------------------------------------------------------------------------


def _devices(batch: Any) -> set[str]:
    if isinstance(batch, torch.Tensor):
        return {batch.device.type}
    if isinstance(batch, Mapping):
        return set().union(*(_devices(v) for v in batch.values()))
    if isinstance(batch, (list, tuple)):
        return set().union(*(_devices(v) for v in batch)) if batch else set()
    return set()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_loader_delivers_batches_on_the_device(store_path: Path, device: str) -> None:
    """``meta`` runs the device path on any machine: every tensor, the ragged lengths included,
    must be moved (a CPU tensor left behind shows up)."""
    cached = CachedFeatureDataset(Ids(20), Backbone(), store_path, input_key="image", spot_check=0)
    for batch in cached.loader(batch_size=8, device=device):
        assert _devices(batch) == {device}
        assert batch["ids"].lengths.device.type == device and batch["name"][0].startswith("s")
    loader = cached.loader(batch_size=8, device=device)
    assert loader.device == torch.device(device) and not loader.pin_memory
    with pytest.raises(InvalidArgumentError, match="device"):
        cached.loader(device="nowhere")


def test_move_to_keeps_the_structure() -> None:
    batch = {"a": [torch.ones(2), ("x", "y")], "r": RaggedBatch(torch.ones(2, 3), torch.tensor([1, 3]))}
    moved = move_to(batch, torch.device("meta"))
    assert type(moved["r"]) is RaggedBatch and moved["a"][1] == ("x", "y")
    assert _devices(moved) == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_on_cuda_equals_the_cpu_batches(store_path: Path, num_workers: int) -> None:
    cached = CachedFeatureDataset(Ids(40), Backbone(), store_path, input_key="image", spot_check=0)
    cpu = list(cached.loader(batch_size=16))
    loader = cached.loader(batch_size=16, device="cuda", num_workers=num_workers)
    assert loader.pin_memory  # pinned by default on CUDA: non_blocking copies
    for got, want in zip(loader, cpu, strict=True):
        assert _devices(got) == {"cuda"}
        assert_same(move_to(got, torch.device("cpu")), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dataloader_recipe_with_pinned_memory_on_cuda(store_path: Path) -> None:
    cached = CachedFeatureDataset(Samples(40, "tuple"), Backbone(), store_path, spot_check=0)
    cached.prefill(progress=False)
    loader = DataLoader(
        cached, batch_size=None, sampler=cached.batch_sampler(16), num_workers=2, pin_memory=True
    )
    for features, labels in loader:
        assert features.is_pinned() and labels.is_pinned()
        on_gpu = features.to("cuda", non_blocking=True)
        assert torch.equal(on_gpu.cpu(), features)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(("n", "batch_size"), [(10, 4), (8, 4), (3, 5)])
def test_index_batches_are_what_a_batcher_of_indices_yields(n: int, batch_size: int, drop_last: bool) -> None:
    """The loader's batches of indices come a batch at a time; same batches, and either resumes the
    other's state (a checkpoint saved before the change still resumes)."""
    batcher = tn.Batcher(Indices(n, shuffle=True, seed=3), batch_size, drop_last=drop_last)
    batches = IndexBatches(Indices(n, shuffle=True, seed=3), batch_size, drop_last=drop_last)
    for _ in range(3):  # a new permutation each epoch
        batcher.reset()
        batches.reset()
        want = [list(batch) for batch in batcher]
        assert [batch.tolist() for batch in batches] == want
        assert batches.state_dict() == batcher.state_dict()
    for first, second in ((batcher, batches), (batches, batcher)):
        first.reset()
        if n > batch_size:
            next(first)
        state = first.state_dict()
        rest = [list(batch) for batch in first]
        second.reset(state)
        assert [list(batch) for batch in second] == rest


class Pairs(torch.utils.data.Dataset[Any]):
    """Samples whose ``pair`` is a list of an int and a bool (two fields, which PadCollate pads as
    one row of numbers) beside variable-length ``ids``."""

    def __init__(self, n: int) -> None:
        self.data = Samples(n, "tuple")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return {"image": self.data.image(index), "pair": [index, index % 2 == 0], "ids": [1] * (index % 3)}


@pytest.mark.parametrize("dataset", [Pairs, Ids])
def test_batches_pickle_to_workers_and_fall_back_to_samples_where_they_must(
    store_path: Path, dataset: Callable[[int], Any]
) -> None:
    cached = CachedFeatureDataset(dataset(12), Backbone(), store_path, input_key="image", spot_check=0)
    want = cached.pad_collate(cached.__getitems__(list(range(12))))
    assert_same(cached[list(range(12))], want)
    copy = pickle.loads(pickle.dumps(cached))  # what a spawn-started DataLoader worker gets
    assert_same(copy[list(range(12))], want)
    batch = next(iter(DataLoader(cached, batch_size=None, sampler=cached.batch_sampler(12), num_workers=1)))
    assert_same(batch, want)
