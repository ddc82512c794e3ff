"""Served features equal the module's output, for every sample and output structure."""

from __future__ import annotations

import math

import pytest
import torch

from cachedfeatures import CachedFeatureDataset
from tests.helpers import SHAPES, Backbone, Samples, features_of, reference


def _assert_features_equal(served: object, expected: object, dtype: torch.dtype | None = None) -> None:
    if isinstance(expected, tuple):
        assert isinstance(served, tuple) and len(served) == len(expected)
        for s, e in zip(served, expected, strict=True):
            _assert_features_equal(s, e, dtype)
    elif isinstance(expected, dict):
        assert isinstance(served, dict) and served.keys() == expected.keys()
        for key in expected:
            _assert_features_equal(served[key], expected[key], dtype)
    else:
        assert isinstance(served, torch.Tensor) and isinstance(expected, torch.Tensor)
        want = expected if dtype is None else expected.to(dtype)
        assert served.dtype == want.dtype
        assert torch.equal(served, want)


@pytest.mark.parametrize("outputs", ["tensor", "tuple", "dict"])
@pytest.mark.parametrize("shape", SHAPES)
def test_served_features_equal_module_output(store_path, shape: str, outputs: str) -> None:
    data = Samples(40, shape)
    module = Backbone(outputs=outputs)
    cached = CachedFeatureDataset(
        data, module, store_path, input_key="image" if shape == "dict" else 0, batch_size=16
    )
    first = cached.__getitems__(list(range(40)))  # misses: computed
    second = cached.__getitems__(list(range(40)))  # hits: read back
    for index in range(40):
        expected = reference(module, data, index)
        _assert_features_equal(features_of(first[index], shape), expected)
        _assert_features_equal(features_of(second[index], shape), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_storage_rounds_once(store_path, dtype: torch.dtype) -> None:
    data = Samples(30, "tuple")
    module = Backbone()
    cached = CachedFeatureDataset(data, module, store_path, dtype=dtype, batch_size=8)
    for sample_list in (cached.__getitems__(list(range(30))), [cached[i] for i in range(30)]):
        for index, (features, label) in enumerate(sample_list):
            expected = reference(module, data, index)
            assert features.dtype == dtype
            assert torch.equal(features, expected.to(dtype))
            assert label == index % 7


def test_passthrough_fields_come_back_with_their_types(store_path) -> None:
    data = Samples(20, "dict")
    cached = CachedFeatureDataset(data, Backbone(), store_path, input_key="image")
    cached.__getitems__(list(range(20)))
    for index in range(20):
        sample = cached[index]
        assert set(sample) == {"image", "label", "name"}
        assert type(sample["label"]) is int and sample["label"] == index % 7
        assert sample["name"] == f"sample-{index}"


def test_repeated_and_negative_indices(store_path) -> None:
    data = Samples(10, "tuple")
    module = Backbone()
    cached = CachedFeatureDataset(data, module, store_path)
    samples = cached.__getitems__([3, 3, -1, 9, 3])
    assert [label for _, label in samples] == [3, 3, 2, 2, 3]
    assert torch.equal(samples[2][0], reference(module, data, 9))
    assert torch.equal(samples[0][0], samples[1][0])


def test_callable_input_key_replaces_the_field_it_reads(store_path) -> None:
    data = Samples(12, "dict")
    module = Backbone()
    cached = CachedFeatureDataset(data, module, store_path, input_key=lambda s: s["image"] * 2)
    sample = cached[5]
    assert set(sample) == {"image", "label", "name"}
    with torch.inference_mode():
        expected = module(data.image(5)[None] * 2)[0]
    assert torch.equal(sample["image"], expected)


@pytest.mark.parametrize("batch_size,k", [(8, 1), (8, 8), (8, 9), (5, 23), (256, 40)])
def test_misses_run_in_ceil_k_over_batch_size_calls(store_path, batch_size: int, k: int) -> None:
    data = Samples(60, "tuple")
    module = Backbone()
    cached = CachedFeatureDataset(data, module, store_path, batch_size=batch_size)
    assert cached.entry is not None
    valid_before = cached.entry.valid_mask()
    misses = [i for i in range(60) if not valid_before[i]][:k]
    calls = module.calls
    cached.__getitems__(misses)
    assert module.calls - calls == math.ceil(k / batch_size)
    assert module.batch_sizes[-1] == k - batch_size * (math.ceil(k / batch_size) - 1)
    assert all(module.inference_modes)
    assert set(module.devices) == {"cpu"}
    assert all(cached.entry.valid_mask()[misses])


def test_hits_do_not_load_raw_samples_or_call_the_module(store_path) -> None:
    data = Samples(50, "dict")
    module = Backbone()
    cached = CachedFeatureDataset(data, module, store_path, input_key="image", batch_size=16)
    cached.__getitems__(list(range(50)))
    loads, calls = data.loads, module.calls
    checked, spot_calls = len(cached.spot_checked_rows), cached.spot_check_calls
    for _ in range(2):
        cached.__getitems__(list(range(49, -1, -1)))
        _ = [cached[i] for i in range(0, 50, 7)]
    # The only loads and module calls are the spot checks' (once per 50 rows served, 8 rows).
    assert cached.spot_check_calls - spot_calls == 2
    assert len(cached.spot_checked_rows) - checked == 16
    assert data.loads == loads + 16
    assert module.calls == calls + 2


def test_features_served_on_cpu_and_independent_of_each_other(store_path) -> None:
    data = Samples(8, "tensor")
    cached = CachedFeatureDataset(data, Backbone(), store_path)
    first = cached.__getitems__([0, 1])
    first[0].zero_()  # a caller writing into what it got must not change the cache
    assert not torch.equal(cached[0], first[0])
    assert first[1].device.type == "cpu"


def test_in_memory_store(tmp_path) -> None:
    data = Samples(20, "tuple")
    module = Backbone()
    cached = CachedFeatureDataset(data, module, None, batch_size=8)
    cached.__getitems__(list(range(20)))
    loads = data.loads
    assert torch.equal(cached[4][0], reference(module, data, 4))
    assert data.loads == loads


def test_empty_dataset(store_path) -> None:
    cached = CachedFeatureDataset(Samples(0), Backbone(), store_path)
    assert len(cached) == 0
    assert cached.__getitems__([]) == []
    with pytest.raises(IndexError):
        cached[0]
