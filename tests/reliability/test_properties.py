"""Property-based bad input: generated sample structures round-trip exactly, or fail clearly.

Hypothesis builds samples (nested tuples, lists and dicts; ints, floats, bools, strings,
NumPy scalars and arrays, tensors of every dtype including bfloat16, bool and float16,
zero-dim and non-contiguous tensors), an input of any dtype and shape, a module returning a
tensor or a tuple/dict of tensors (zero-dim rows, non-contiguous, bool, int, float16,
bfloat16), and datasets of 0, 1 or a few samples. Every served sample must equal the module's
direct output and the dataset's own fields, once computed and again from the store; a sample
that cannot be cached must raise a ``CacheError`` at construction.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Dataset
from zarr.storage import LocalStore, MemoryStore

from cachedfeatures import CachedFeatureDataset
from cachedfeatures.errors import CacheError, FieldNotStorableError
from tests.helpers import assert_same
from tests.reliability.figures import record

TORCH_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
]
INPUT_DTYPES = [d for d in TORCH_DTYPES if not d.is_complex]
OUTPUT_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.bool,
]
NUMPY_DTYPES = ["int8", "int16", "int64", "uint32", "float16", "float32", "float64", "bool", "complex128"]
SHAPES = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)
# A longer hunt: CACHEDFEATURES_EXAMPLES=2000 pytest tests/reliability/test_properties.py
EXAMPLES = int(os.environ.get("CACHEDFEATURES_EXAMPLES", "150"))
KEYS = st.one_of(
    st.sampled_from(["label", "features", "valid", "access", "", "a/b", "0", "x.y", "__z", "é"]),
    st.text(max_size=6),
    st.integers(-3, 50),
)


# -- what a generated sample is made of -----------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """A passthrough field: ``kind`` with ``dtype``/``shape``; ``storable`` says if it can be cached."""

    kind: str
    dtype: str = ""
    shape: tuple[int, ...] = ()
    noncontiguous: bool = False

    @property
    def storable(self) -> bool:
        return self.kind not in ("none", "bytes", "set")

    def value(self, index: int, salt: int) -> Any:
        rng = np.random.default_rng([index, salt])
        if self.kind == "int":
            return int(rng.integers(-(2**40), 2**40))
        if self.kind == "float":
            return float(rng.standard_normal())
        if self.kind == "bool":
            return bool(rng.integers(2))
        if self.kind == "str":
            return "".join(rng.choice(list("aé z/😀0"), size=int(rng.integers(0, 8))))
        if self.kind == "npscalar":
            return _numpy_values(rng, self.dtype, (1,))[0]
        if self.kind == "ndarray":
            return _numpy_values(rng, self.dtype, self.shape)
        if self.kind == "tensor":
            return _tensor(rng, getattr(torch, self.dtype), self.shape, self.noncontiguous)
        if self.kind == "none":
            return None
        if self.kind == "bytes":
            return b"raw"
        return {index}


@dataclass(frozen=True)
class Node:
    """A container of fields: ``kind`` is tuple, list or dict (with ``keys``)."""

    kind: str
    items: tuple[Any, ...]
    keys: tuple[Any, ...] = ()

    @property
    def storable(self) -> bool:
        keys_ok = all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in self.keys)
        return keys_ok and all(item.storable for item in self.items)

    def value(self, index: int, salt: int) -> Any:
        values = [item.value(index, salt * 31 + i) for i, item in enumerate(self.items)]
        if self.kind == "dict":
            return dict(zip(self.keys, values, strict=True))
        return values if self.kind == "list" else tuple(values)


@dataclass(frozen=True)
class Case:
    n: int
    root: str  # "tensor" (the sample is the input), "tuple", "list" or "dict"
    fields: Node | None  # the root's other items; the input sits at ``input_at``
    input_at: int
    input_dtype: torch.dtype
    input_shape: tuple[int, ...]
    input_noncontiguous: bool
    outputs: str  # "tensor", "tuple" or "dict"
    output_dtypes: tuple[torch.dtype, ...]
    output_zero_dim: tuple[bool, ...]
    output_noncontiguous: bool
    storage_dtype: torch.dtype | None
    batch_size: int
    chunk_rows: int

    @property
    def storable(self) -> bool:
        return self.fields is None or self.fields.storable

    @property
    def input_key(self) -> Any:
        if self.root in ("tuple", "list"):
            return self.input_at
        if self.root == "dict":
            return "input_"
        return 0


def _numpy_values(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.startswith(("int", "uint")):
        return rng.integers(0, 100, size=shape).astype(dtype)
    if dtype.startswith("complex"):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _tensor(rng: np.random.Generator, dtype: torch.dtype, shape: tuple[int, ...], noncontiguous: bool) -> Any:
    full = (*shape, 2) if noncontiguous else shape
    values = torch.from_numpy(np.asarray(rng.standard_normal(full) * 4, dtype=np.float32))
    if dtype == torch.bool:
        tensor = values > 0
    elif dtype.is_complex:
        tensor = torch.complex(values, -values).to(dtype)
    else:
        tensor = values.to(dtype)
    return tensor[..., 0] if noncontiguous else tensor


class Generated(Dataset[Any]):
    def __init__(self, case: Case) -> None:
        self.case = case

    def __len__(self) -> int:
        return self.case.n

    def input(self, index: int) -> torch.Tensor:
        case = self.case
        rng = np.random.default_rng([index, 7])
        return _tensor(rng, case.input_dtype, case.input_shape, case.input_noncontiguous)

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(index)
        case, image = self.case, self.input(index)
        if case.root == "tensor" or case.fields is None:
            return image
        values = list(case.fields.value(index, 1) if case.fields.kind != "dict" else [])
        if case.root == "dict":
            return {"input_": image, **case.fields.value(index, 1)}
        values.insert(case.input_at, image)
        return values if case.root == "list" else tuple(values)


class Elementwise(nn.Module):
    """Per-element ops only, so a row's outputs do not depend on the batch it is computed in."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.case = case
        self.eval()

    def forward(self, x: torch.Tensor) -> Any:
        case = self.case
        flat = (x.to(torch.float32) * 0.75 + 0.5).reshape(len(x), -1)
        flat = torch.cat([flat, torch.ones(len(x), 1)], dim=1)  # at least one column
        outs = []
        for i, (dtype, zero_dim) in enumerate(zip(case.output_dtypes, case.output_zero_dim, strict=True)):
            y = flat + i
            if case.output_noncontiguous:
                y = torch.stack([y, -y], dim=2)[:, :, 0]
            y = y[:, -1] if zero_dim else y
            outs.append(y > 1 if dtype == torch.bool else y.to(dtype))
        if case.outputs == "tensor":
            return outs[0]
        if case.outputs == "tuple":
            return tuple(outs)
        return {f"out{i}": out for i, out in enumerate(outs)}


# -- strategies ---------------------------------------------------------------------------------


def leaves() -> st.SearchStrategy[Leaf]:
    return st.one_of(
        st.sampled_from([Leaf("int"), Leaf("float"), Leaf("bool"), Leaf("str")]),
        st.builds(Leaf, st.just("npscalar"), st.sampled_from(NUMPY_DTYPES)),
        st.builds(Leaf, st.just("ndarray"), st.sampled_from(NUMPY_DTYPES), SHAPES),
        st.builds(
            Leaf,
            st.just("tensor"),
            st.sampled_from([str(d).removeprefix("torch.") for d in TORCH_DTYPES]),
            SHAPES,
            st.booleans(),
        ),
        st.sampled_from([Leaf("none"), Leaf("bytes"), Leaf("set")]),  # cannot be stored
    )


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Node]:
    items = st.lists(children, min_size=0, max_size=3).map(tuple)
    sequences = st.builds(Node, st.sampled_from(["tuple", "list"]), items)

    @st.composite
    def dicts(draw: st.DrawFn) -> Node:
        keys = draw(st.lists(KEYS, max_size=3, unique=True))
        if draw(st.integers(0, 15)) == 0:
            keys.append((1, 2))  # a tuple key cannot name an array
        values = draw(st.lists(children, min_size=len(keys), max_size=len(keys)))
        return Node("dict", tuple(values), tuple(keys))

    return st.one_of(sequences, dicts())


@st.composite
def cases(draw: st.DrawFn) -> Case:
    root = draw(st.sampled_from(["tensor", "tuple", "list", "dict"]))
    fields = None
    input_at = 0
    if root != "tensor":
        tree = st.recursive(leaves(), containers, max_leaves=5)
        node = draw(
            containers(tree).filter(lambda node: node.kind == ("dict" if root == "dict" else "tuple"))
        )
        if root == "dict":
            node = Node("dict", node.items, tuple(k for k in node.keys if k != "input_"))
            node = Node("dict", node.items[: len(node.keys)], node.keys)
        fields = node
        input_at = draw(st.integers(0, len(node.items)))
    num_outputs = draw(st.integers(1, 3))
    outputs = (
        "tensor" if num_outputs == 1 and draw(st.booleans()) else draw(st.sampled_from(["tuple", "dict"]))
    )
    return Case(
        n=draw(st.sampled_from([1, 2, 5, 9, 1, 0])),
        root=root,
        fields=fields,
        input_at=input_at,
        input_dtype=draw(st.sampled_from(INPUT_DTYPES)),
        input_shape=draw(SHAPES),
        input_noncontiguous=draw(st.booleans()),
        outputs=outputs,
        output_dtypes=tuple(
            draw(st.lists(st.sampled_from(OUTPUT_DTYPES), min_size=num_outputs, max_size=num_outputs))
        ),
        output_zero_dim=tuple(draw(st.lists(st.booleans(), min_size=num_outputs, max_size=num_outputs))),
        output_noncontiguous=draw(st.booleans()),
        storage_dtype=draw(st.sampled_from([None, None, torch.float16, torch.bfloat16, torch.float64])),
        batch_size=draw(st.integers(1, 4)),
        chunk_rows=draw(st.integers(1, 4)),
    )


# -- the oracle -----------------------------------------------------------------------------------


def expected(case: Case, data: Generated, module: Elementwise, index: int) -> Any:
    """``dataset[index]`` with the input replaced by the module's output, computed directly."""
    with torch.inference_mode():
        out = module(data.input(index)[None])

    def row(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor[0]
        if case.storage_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(case.storage_dtype)
        return tensor

    features: Any
    if isinstance(out, tuple):
        features = tuple(row(t) for t in out)
    elif isinstance(out, dict):
        features = {k: row(t) for k, t in out.items()}
    else:
        features = row(out)
    sample = data[index]
    if case.root == "tensor":
        return features
    if case.root == "dict":
        return {**sample, "input_": features}
    items = list(sample)
    items[case.input_at] = features
    return items if case.root == "list" else tuple(items)


def check_case(case: Case, store: Any, reopen: Any) -> str:
    """Run one generated case; the outcome's name (for the figures)."""
    data, module = Generated(case), Elementwise(case)
    kwargs = dict(input_key=case.input_key, dtype=case.storage_dtype, batch_size=case.batch_size)
    try:
        cached = CachedFeatureDataset(data, module, store, chunk_rows=case.chunk_rows, **kwargs)
    except FieldNotStorableError:
        assert not case.storable
        return "clear error: FieldNotStorableError"
    assert case.storable or case.n == 0, "an unstorable field was accepted"  # empty: never probed
    assert len(cached) == case.n
    if case.n == 0:
        assert cached.__getitems__([]) == []
        with pytest.raises(IndexError):
            cached[0]
        return "empty dataset"
    order = [i for i in reversed(range(case.n))] + [0]  # repeated index too
    for pass_ in range(2):  # computed, then served from the store
        for index, sample in zip(order, cached.__getitems__(order), strict=True):
            want = expected(case, data, module, index)
            assert_same(sample, want, f"pass {pass_} row {index}", layout=False)
    again = CachedFeatureDataset(data, Elementwise(case), reopen(), **kwargs)
    for index in range(case.n):
        assert_same(again[index], expected(case, data, module, index), f"reopened row {index}", layout=False)
    assert again.module_calls == again.spot_check_calls  # every row a hit: only spot checks ran it
    return "round trip"


def test_generated_samples_round_trip_or_fail_clearly() -> None:
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(case=cases())
    def run(case: Case) -> None:
        store = MemoryStore()
        try:
            outcomes[check_case(case, store, lambda: store)] += 1
        except CacheError as error:  # any other clear error is a bug in the oracle or the core
            raise AssertionError(f"unexpected {type(error).__name__}: {error}\n{case}") from error

    run()
    record(
        "property-based inputs tried (in memory)",
        f"{sum(outcomes.values())}: {dict(sorted(outcomes.items()))}",
    )
    assert outcomes["round trip"] > 0 and outcomes["clear error: FieldNotStorableError"] > 0


def test_generated_samples_round_trip_on_disk(tmp_path: Path) -> None:
    tried = Counter[str]()
    counter = iter(range(10**6))

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(case=cases().filter(lambda case: case.storable and case.n > 0))
    def run(case: Case) -> None:
        path = tmp_path / f"store-{next(counter)}.zarr"
        tried[check_case(case, path, lambda: LocalStore(path))] += 1

    run()
    record("property-based inputs tried (local store)", sum(tried.values()))
