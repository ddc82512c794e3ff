"""``@cached_module``: content keys, partial hits, tiers, scoping, gradients, compile, threads."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from cachedfeatures import (
    FeatureStore,
    InputBatchError,
    RequiresGradError,
    TrainingModeError,
    UnhashableArgumentError,
    cached_module,
)
from cachedfeatures.compute.memory_tier import MemoryTier
from cachedfeatures.format.row_keys import gather_inputs, row_keys
from cachedfeatures.pruning import measure
from tests.helpers import Backbone


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def direct(module: Backbone, x: torch.Tensor) -> Any:
    """``module``'s output computed without the cache (and without counting a call)."""
    with torch.no_grad():
        out = Backbone.forward(module, x)
    module.calls -= 1
    module.batch_sizes.pop()
    return out


def frozen(cls: type[Backbone], **kwargs: Any) -> Backbone:
    return cls(**kwargs).requires_grad_(False)


def keys_of(*args: Any, **kwargs: Any) -> list[bytes]:
    return row_keys(gather_inputs(args, kwargs))


# -- keys ------------------------------------------------------------------------------------------


def torchcache_hash(x: torch.Tensor) -> list[int]:
    """torchcache 0.6's row hash, with its default settings (subsample_count=10000)."""
    torchcache = pytest.importorskip("torchcache.torchcache")
    cache = torchcache._TorchCache(
        memory_cache_device="cpu",
        subsample_count=10000,
        persistent=False,
        persistent_cache_dir=None,
        persistent_module_hash=None,
        max_persistent_cache_size=int(10e9),
        max_memory_cache_size=int(1e9),
        zstd_compression=False,
        zstd_compression_level=3,
        zstd_compression_threads=1,
        cache_dtype=None,
        use_mmap_on_load=False,
    )
    return cache.hash_tensor(x.flatten(1)).tolist()  # type: ignore[no-any-return]


def test_rows_that_torchcache_confuses_get_different_keys_and_outputs() -> None:
    # torchcache hashes every 3rd value of a 3x112x112 row (37632 floats > 2 * 10000), and
    # truncates each weighted value to an integer: two kinds of collision.
    base = torch.randn(3, 112, 112, generator=torch.Generator().manual_seed(0))
    skipped = base.clone()
    skipped.view(-1)[1] += 5.0  # index 1 is not among the subsampled values
    fraction = base.clone()
    fraction.view(-1)[0] = torch.floor(base.view(-1)[0]) + 0.25  # same integer part, weight 1
    rows = torch.stack([base, skipped, fraction])
    theirs = torchcache_hash(rows)
    assert theirs[0] == theirs[1] == theirs[2]  # the collisions are real
    ours = keys_of(rows)
    assert len(set(ours)) == 3

    @cached_module()
    def mean_of_first_values(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :2].sum(dim=1, keepdim=True)

    first = mean_of_first_values(rows[:1])
    second = mean_of_first_values(rows[1:2])
    assert not torch.equal(first, second)  # torchcache would serve `first` again here


def test_truncating_hash_collision_is_kept_apart() -> None:
    row = torch.zeros(1, 64)
    other = row.clone()
    other[0, 0] = 0.5  # 0.5 * 2**0 truncates to 0 in torchcache's integer sum
    assert torchcache_hash(row) == torchcache_hash(other)
    assert keys_of(row) != keys_of(other)


def test_keys_cover_dtype_shape_position_and_scalar_arguments() -> None:
    x = torch.arange(12, dtype=torch.int32).reshape(2, 6)
    base = keys_of(x)
    assert keys_of(x.clone()) == base  # content, not identity
    assert keys_of(x.view(torch.float32)) != base  # same bytes, other dtype
    assert keys_of(x.reshape(2, 2, 3)) != base  # same bytes, other shape
    assert keys_of(x, 1) != keys_of(x, 2)
    assert keys_of(x, 1) != keys_of(x, 1.0)
    assert keys_of(x, True) != keys_of(x, 1)
    assert keys_of(x, mode="a") != keys_of(x, mode="b")
    assert keys_of(x, None) != keys_of(x)
    y = x + 100
    assert keys_of(x, y) != keys_of(y, x)
    assert keys_of(x=x, y=y) == keys_of(y=y, x=x)  # keyword order does not matter
    assert base[0] != base[1]


def test_keys_equal_exactly_when_rows_equal() -> None:
    x = images(6)
    x[3] = x[1]
    keys = keys_of(x)
    assert keys[3] == keys[1]
    assert len(set(keys)) == 5
    assert keys_of(x.to(torch.bfloat16))[3] == keys_of(x.to(torch.bfloat16))[1]
    assert keys_of(x[:2]) == keys[:2]  # a row's key does not depend on its batch


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        dtype=st.sampled_from([np.uint8, np.int16, np.float32, np.float64, np.bool_]),
        shape=st.tuples(st.integers(1, 6), st.integers(0, 5)),
    )
)
def test_two_rows_share_a_key_exactly_when_their_bytes_match(batch: np.ndarray) -> None:
    keys = keys_of(torch.from_numpy(batch.copy()))
    raw = [row.tobytes() for row in batch]
    for i in range(len(batch)):
        for j in range(len(batch)):
            assert (keys[i] == keys[j]) == (raw[i] == raw[j])


@pytest.mark.parametrize("value", [[1, 2], {"a": 1}, object(), (1,)])
def test_unhashable_argument_is_a_clear_error(value: Any) -> None:
    @cached_module()
    def f(x: torch.Tensor, option: Any) -> torch.Tensor:
        return x

    with pytest.raises(UnhashableArgumentError, match="int, float, str, bool or None"):
        f(images(2), value)
    with pytest.raises(TypeError):  # also the matching built-in
        f(images(2), value)


def test_inputs_must_share_a_batch_dimension() -> None:
    @cached_module()
    def f(x: torch.Tensor, y: torch.Tensor | float) -> torch.Tensor:
        return x

    with pytest.raises(InputBatchError, match="batch size"):
        f(images(2), images(3))
    with pytest.raises(InputBatchError, match="0-d"):
        f(images(2), torch.tensor(1.0))
    with pytest.raises(InputBatchError, match="no tensor"):
        f(1.0, 2.0)


# -- hits and misses -------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "zarr"])
def test_partial_hit_runs_only_missing_rows_in_order(store: str, store_path: Path) -> None:
    cls = cached_module(store=None if store == "memory" else store_path)(Backbone)
    module = frozen(cls)
    x = images(10)
    first = module(x[:6])
    assert module.batch_sizes == [6]
    mixed = torch.cat([x[8:], x[:3], x[6:8], x[3:6]])  # new rows interleaved with cached ones
    out = module(mixed)
    assert module.batch_sizes == [6, 4]  # only the four new rows ran
    assert torch.equal(out, direct(module, mixed))
    assert torch.equal(out[2:5], first[:3])
    assert module.module_cache.hit_rows == 6


@pytest.mark.parametrize("store", ["memory", "zarr"])
def test_full_hit_does_not_call_module(store: str, store_path: Path) -> None:
    module = frozen(cached_module(store=None if store == "memory" else store_path)(Backbone))
    x = images(8)
    expected = module(x)
    saved = expected.clone()
    expected.add_(1.0)  # the caller's tensor is its own: changing it leaves the cache alone
    again = module(x.clone())
    assert module.calls == 1
    assert torch.equal(again, saved)
    assert torch.equal(saved, direct(module, x))


def test_persistent_tier_serves_a_fresh_instance(store_path: Path) -> None:
    cls = cached_module(store=store_path, max_memory_bytes=0)(Backbone)
    writer = frozen(cls)
    x = images(12)
    expected = writer(x)
    reader = frozen(cls)  # same class and weights: same entry, empty memory tier
    assert torch.equal(reader(x), expected)
    assert reader.calls == 0
    assert reader.module_cache.memory is None


def test_repeated_rows_in_a_batch_run_once() -> None:
    module = frozen(cached_module()(Backbone))
    x = images(3)
    batch = torch.stack([x[0], x[1], x[0], x[2], x[1]])
    out = module(batch)
    assert module.batch_sizes == [3]
    assert torch.equal(out, direct(module, batch))


@pytest.mark.parametrize("outputs", ["tuple", "dict"])
def test_tuple_and_dict_outputs(outputs: str, store_path: Path) -> None:
    module = frozen(cached_module(store=store_path)(Backbone), outputs=outputs)
    x = images(6)
    module(x[:3])
    out = module(x)
    expected = direct(module, x)
    assert type(out) is type(expected)
    items = out.values() if isinstance(out, dict) else out
    for got, want in zip(items, expected.values() if isinstance(expected, dict) else expected, strict=True):
        assert torch.equal(got, want)


def test_cache_dtype_applies_to_hits_and_misses(store_path: Path) -> None:
    module = frozen(cached_module(store=store_path, cache_dtype=torch.float16)(Backbone))
    x = images(6)
    miss = module(x)
    hit = module(x)
    assert miss.dtype == hit.dtype == torch.float16
    assert torch.equal(miss, hit)
    assert torch.equal(miss, direct(module, x).to(torch.float16))
    assert zarr.open_group(store_path).attrs  # a real store on disk


def test_bfloat16_cache_round_trips_through_the_store(store_path: Path) -> None:
    cls = cached_module(store=store_path, cache_dtype=torch.bfloat16, max_memory_bytes=0)(Backbone)
    x = images(5)
    miss = frozen(cls)(x)
    reader = frozen(cls)
    hit = reader(x)
    assert reader.calls == 0
    assert hit.dtype == torch.bfloat16 and torch.equal(hit, miss)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"max_bytes": -1}, ValueError),
        ({"max_memory_bytes": "1.5 parsecs"}, ValueError),
        ({"chunk_rows": 0}, ValueError),
        ({"cache_dtype": "float16"}, TypeError),
        ({"enabled": "yes"}, TypeError),
        ({"version": 3}, TypeError),
        ({"store": 3}, TypeError),
    ],
)
def test_bad_options_say_what_was_expected(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match="Expected"):
        cached_module(**options)


def test_only_modules_and_functions_can_be_decorated() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module subclasses and plain functions"):
        cached_module()(int)
    with pytest.raises(TypeError, match="above the class or function"):
        cached_module()(Backbone())  # an instance, not its class
    assert callable(cached_module()(lambda x: x))


def test_outputs_keep_the_module_dtype_without_cache_dtype() -> None:
    module = frozen(cached_module()(Backbone)).to(torch.float64)
    x = images(4).double()
    assert module(x).dtype == module(x).dtype == torch.float64


def test_integer_inputs_keep_float_outputs_on_hits() -> None:
    @cached_module()
    def normalise(x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255.0 * 10.0

    x = torch.randint(0, 256, (3, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    miss, hit = normalise(x), normalise(x)
    assert miss.dtype == hit.dtype == torch.float32  # torchcache returns uint8 on the hit
    assert torch.equal(miss, hit)


def test_function_of_several_tensors_and_numbers() -> None:
    calls = []

    @cached_module()
    def combine(a: torch.Tensor, b: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        calls.append(len(a))
        return a.flatten(1)[:, :4] * scale + b

    a, b = images(5), torch.randn(5, 4)
    first = combine(a, b, scale=2.0)
    assert torch.equal(combine(a, b, scale=2.0), first)
    assert calls == [5]
    assert not torch.equal(combine(a, b, scale=3.0), first)  # other number, other rows
    assert calls == [5, 5]
    assert combine.module_cache.hit_rows == 5  # type: ignore[attr-defined]


def test_empty_batch_passes_through() -> None:
    @cached_module()
    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    assert flat(images(0)).shape == (0, 192)


# -- tiers and budgets -----------------------------------------------------------------------------


def row(nbytes: int, value: float = 0.0) -> tuple[torch.Tensor, ...]:
    return (torch.full((nbytes // 4,), float(value)),)


def test_memory_tier_keeps_its_budget_and_drops_most_recent_first() -> None:
    tier = MemoryTier(max_bytes=400)
    keys = [bytes([i]) * 16 for i in range(10)]
    hits = []
    for cycle in range(3):  # cyclic passes over 10 rows, room for 4
        found = tier.get(keys)
        hits.append(sum(row is not None for row in found))
        missing = [key for key, got in zip(keys, found, strict=True) if got is None]
        tier.put(missing, [row(100, cycle) for _ in missing])
        assert tier.nbytes <= 400
        assert len(tier) == 4
    assert hits == [0, 4, 4]  # MRU keeps a full, stable subset; LRU would hit nothing
    tier.put([b"x" * 16], [row(800)])  # larger than the whole budget: not kept
    assert tier.get([b"x" * 16]) == [None]


def test_memory_budget_bounds_the_module_cache() -> None:
    module = frozen(cached_module(max_memory_bytes=16 * 4 * 5)(Backbone))  # five 16-float rows
    module(images(20))
    cache = module.module_cache
    assert cache.memory is not None
    assert len(cache.memory) == 5
    assert cache.memory.nbytes <= 16 * 4 * 5


def test_persistent_budget_drops_chunks_and_keeps_a_stable_subset(store_path: Path) -> None:
    cls = cached_module(
        store=store_path, max_bytes=60_000, chunk_rows=16, max_memory_bytes=0, compressor=None
    )(Backbone)
    module = frozen(cls, out=256)  # 1 KiB rows: a chunk is 16 KiB of features
    data = images(160)
    entry_bytes = []
    hits = []
    for _ in range(3):
        before = module.module_cache.hit_rows
        for start in range(0, 160, 16):
            module(data[start : start + 16])
        hits.append(module.module_cache.hit_rows - before)
        (entry,) = FeatureStore.open(store_path).entries
        entry_bytes.append(entry.nbytes_stored())
    assert max(entry_bytes) <= 60_000
    assert hits[0] == 0
    assert hits[1] > 0 and hits[1] == hits[2]  # the same chunks survive every pass
    out = module(data)
    assert torch.equal(out, direct(module, data))


def test_max_bytes_bounds_the_whole_store_that_two_cached_modules_share(store_path: Path) -> None:
    """``max_bytes`` is store-wide, as ``CachedFeatureDataset``'s: two cached modules on one store,
    each given it, keep the store's total within it (it used to bound each entry alone, so two
    took twice the budget). Other entries' chunks go first, so each module keeps some rows."""
    budget = 24_000
    options: dict[str, Any] = {"store": store_path, "chunk_rows": 4, "max_bytes": budget}
    options |= {"max_memory_bytes": 0, "version": "v", "compressor": None}

    @cached_module(**options)
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @cached_module(**options)
    def triple(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    generator = torch.Generator().manual_seed(0)
    data = torch.randn(400, 16, generator=generator)
    peak = 0
    for start in range(0, 400, 4):
        x = data[start : start + 4]
        assert torch.equal(double(x), x * 2) and torch.equal(triple(x), x * 3)
        peak = max(peak, measure(FeatureStore.open(store_path)).total)
    assert peak <= budget + 1000  # the budget, plus at most about one chunk being written
    entries = FeatureStore.open(store_path).entries
    assert len(entries) == 2 and all(entry.valid_mask().any() for entry in entries)
    for module, factor in ((double, 2), (triple, 3)):
        assert torch.equal(module(data), data * factor)


def test_entry_grows_past_its_first_capacity(store_path: Path) -> None:
    cls = cached_module(store=store_path, chunk_rows=4, max_memory_bytes=0)(Backbone)
    module = frozen(cls)
    data = images(50)
    for start in range(0, 50, 7):
        module(data[start : start + 7])
    reader = frozen(cls)
    assert torch.equal(reader(data), direct(reader, data))
    assert reader.calls == 0
    (entry,) = FeatureStore.open(store_path).entries
    assert entry.num_rows >= 50


def test_a_cached_chunk_that_grew_is_read_again(store_path: Path) -> None:
    cls = cached_module(store=store_path, chunk_rows=4, max_memory_bytes=0)(Backbone)
    writer, reader = frozen(cls), frozen(cls)  # two caches on one entry, like two processes
    data = images(8)
    writer(data[:6])  # chunk 1 holds rows 4 and 5 only
    assert torch.equal(reader(data[:6]), direct(reader, data[:6]))  # reader keeps chunk 1 decoded
    writer(data[6:])  # rows 6 and 7 land in chunk 1 after the reader decoded it
    out = reader(data)
    assert reader.calls == 0  # found on disk, not recomputed, and not read from the stale copy
    assert torch.equal(out, direct(reader, data))


def test_a_chunk_that_does_not_decode_is_recomputed(
    store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cls = cached_module(store=store_path, chunk_rows=4, max_memory_bytes=0)(Backbone)
    data = images(8)
    frozen(cls)(data)
    (entry,) = FeatureStore.open(store_path).entries
    chunk_file = store_path / entry.name / "features" / "c" / "1" / "0"
    chunk_file.write_bytes(b"garbage, not a blosc frame")
    reader = frozen(cls)
    out = reader(data)
    assert reader.batch_sizes == [4]  # chunk 0 served, chunk 1's rows recomputed
    assert torch.equal(out, direct(reader, data))
    assert "cannot be read" in caplog.text
    again = frozen(cls)
    assert torch.equal(again(data), out)  # the recomputed rows were stored again ...
    assert again.calls == 0  # ... and a key's newest row wins: the broken chunk is not read


def test_store_is_plain_zarr_and_listed_as_an_entry(store_path: Path) -> None:
    module = frozen(cached_module(store=store_path)(Backbone))
    x = images(5)
    out = module(x)
    (entry,) = FeatureStore.open(store_path).entries
    assert entry.meta["kind"] == "module_cache"
    assert "Backbone" in entry.module_description
    group = zarr.open_group(store_path, mode="r")[entry.name]
    assert int(group["next_row"][0]) == 5
    assert group["valid"][:5].all()
    assert group["key"].shape[1] == 16
    stored = torch.from_numpy(group["features"][:5])
    assert {tuple(r.tolist()) for r in stored} == {tuple(r.tolist()) for r in out}


# -- scoping ---------------------------------------------------------------------------------------


def test_new_weights_never_see_stale_outputs(store_path: Path) -> None:
    cls = cached_module(store=store_path)(Backbone)
    module = frozen(cls, seed=0)
    x = images(4)
    old = module(x)
    module.load_state_dict(Backbone(seed=1).state_dict())  # fine-tuned checkpoint, same class
    new = module(x)
    assert module.calls == 2
    assert not torch.equal(new, old)
    assert torch.equal(new, direct(module, x))
    with torch.no_grad():
        module.head.bias.add_(1.0)  # modified in place
    assert torch.equal(module(x), direct(module, x))
    assert module.calls == 3
    assert len(FeatureStore.open(store_path).entries) == 3


def counting_fingerprints(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the module fingerprints cached_module takes (each hashes every weight)."""
    import cachedfeatures.module_cache as module_cache

    taken: list[int] = []
    original = module_cache.module_fingerprint

    def counted(module: Any, version: str | None = None) -> Any:
        taken.append(1)
        return original(module, version)

    monkeypatch.setattr(module_cache, "module_fingerprint", counted)
    return taken


def test_what_the_forward_changes_itself_is_not_a_new_state(monkeypatch: pytest.MonkeyPatch) -> None:
    # Backbone's forward counts its calls and appends to lists in its __dict__; modes toggle
    # between epochs. Neither may cost a new fingerprint (a hash of every weight) per call.
    taken = counting_fingerprints(monkeypatch)
    module = frozen(cached_module()(Backbone))
    for seed in range(3):
        module(images(4, seed))
        module.train()
        module.eval()
    assert module(images(4, 0)) is not None and module.calls == 3
    assert len(taken) == 1


@pytest.mark.parametrize("where", ["config", "array", "list"])
def test_state_changed_in_place_between_calls_gives_fresh_outputs(where: str) -> None:
    # Plain state held by the module and changed in place (not reassigned): a config object's
    # attribute, a small NumPy array, a list of floats.
    @cached_module()
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Config", (), {})()
            self.config.scale = 2.0
            self.table = np.array([2.0])
            self.factors = [2.0]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.config.scale * float(self.table[0]) * self.factors[0] / 4.0

    module = Scaled()
    x = torch.randn(3, 2)
    assert torch.allclose(module(x), x * 2.0)
    if where == "config":
        module.config.scale = 3.0
    elif where == "array":
        module.table[0] = 3.0
    else:
        module.factors[0] = 3.0
    assert torch.allclose(module(x), x * 3.0)
    assert module.module_cache.miss_rows == 6


class Settings:
    """A module-level config object, read (not held) by a cached module's forward."""

    scale = 2.0


SETTINGS = Settings()


def test_a_global_config_read_by_forward_changed_gives_fresh_outputs() -> None:
    @cached_module()
    class ReadsSettings(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * SETTINGS.scale

    module = ReadsSettings()
    x = torch.randn(3, 2)
    assert torch.equal(module(x), x * 2.0)
    SETTINGS.scale = 5.0
    try:
        assert torch.equal(module(x), x * 5.0)
    finally:
        SETTINGS.scale = 2.0


def test_each_instance_has_its_own_cache_and_options(tmp_path: Path) -> None:
    memory_only = cached_module()(Backbone)
    a, b = frozen(memory_only), frozen(memory_only)
    a(images(3))
    b(images(3))
    assert a.calls == b.calls == 1  # torchcache would share one cache between instances
    assert a.module_cache is not b.module_cache

    cls = cached_module(store=tmp_path / "default.zarr")(Backbone)

    class Override(cls):  # type: ignore[valid-type,misc]
        cachedfeatures_store = tmp_path / "override.zarr"

    frozen(cls)(images(3))
    c = frozen(Override)
    c.cachedfeatures_max_memory_bytes = 0  # per-instance, before the first call
    c(images(3))
    assert c.calls == 1  # its own store: no rows yet
    assert (tmp_path / "override.zarr").is_dir()
    assert c.module_cache.memory is None


def test_unknown_option_attribute_is_a_clear_error() -> None:
    module = frozen(cached_module()(Backbone))
    module.cachedfeatures_max_byte = 10
    with pytest.raises(ValueError, match="cachedfeatures_max_bytes"):
        module(images(2))


def test_enabled_switches() -> None:
    off = frozen(cached_module(enabled=False)(Backbone))
    off(images(2))
    off(images(2))
    assert off.calls == 2
    on = frozen(cached_module()(Backbone))
    on.module_cache.enabled = False
    on(images(2))
    on.module_cache.enabled = True
    on(images(2))
    on(images(2))
    assert on.calls == 2
    per_instance = frozen(cached_module()(Backbone))
    per_instance.cachedfeatures_enabled = False
    per_instance(images(2))
    per_instance(images(2))
    assert per_instance.calls == 2


def test_deepcopy_gives_a_working_module_with_an_empty_cache() -> None:
    module = frozen(cached_module()(Backbone))
    module(images(3))
    clone = copy.deepcopy(module)
    assert torch.equal(clone(images(3)), module(images(3)))
    assert clone.module_cache.miss_rows == 3


# -- gradients and modes ---------------------------------------------------------------------------


def test_parameters_that_require_grad_are_an_error() -> None:
    module = cached_module()(Backbone)()
    with pytest.raises(RequiresGradError, match="requires_grad_\\(False\\)"):
        module(images(2))


def test_inputs_that_require_grad_are_an_error_while_grad_is_on() -> None:
    module = frozen(cached_module()(Backbone))
    trainable = nn.Conv2d(3, 3, 1)
    x = trainable(images(2))  # the output of a layer being trained
    with pytest.raises(RequiresGradError, match="detach"):
        module(x)
    assert module(x.detach()).shape == (2, 16)
    with torch.no_grad():
        assert module(trainable(images(2))).shape == (2, 16)


def test_training_mode_with_dropout_is_an_error_but_plain_training_mode_is_not() -> None:
    @cached_module()
    class WithDropout(nn.Module):
        def __init__(self, p: float) -> None:
            super().__init__()
            self.drop = nn.Dropout(p)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(x)

    with pytest.raises(TrainingModeError, match="eval"):
        WithDropout(0.5).train()(images(2))
    assert WithDropout(0.5).eval()(images(2)).shape == (2, 3, 8, 8)
    assert WithDropout(0.0).train()(images(2)).shape == (2, 3, 8, 8)  # p=0 changes nothing
    frozen(cached_module()(Backbone)).train()(images(2))  # no dropout or batch norm


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_outputs_are_detached_and_train_a_head(mode: str) -> None:
    backbone = frozen(cached_module()(Backbone))
    head = nn.Linear(16, 2)
    x = images(4)
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[
        mode
    ]
    with context():
        first = backbone(x)
    assert not first.requires_grad
    for _ in range(2):  # a miss (above), then a hit, both feed an autograd graph
        features = backbone(x)
        loss = head(features).square().mean()
        loss.backward()
        assert head.weight.grad is not None
    assert backbone.calls == 1


def test_inference_mode_rows_serve_grad_mode_callers() -> None:
    backbone = frozen(cached_module()(Backbone))
    with torch.inference_mode():
        backbone(images(3))
    out = backbone(images(3))
    out.add_(1.0)  # a normal tensor: in-place works outside inference mode
    assert not torch.equal(backbone(images(3)), out)  # and it is a copy of the cached row


# -- compile and DataParallel-style splits ---------------------------------------------------------


class Probe(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.backbone(x) * 2.0))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
# Importing inductor scripts torch.utils.mkldnn, which warns about torch.jit (torch's own code).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_of_a_surrounding_model(backend: str, store_path: Path) -> None:
    backbone = frozen(cached_module(store=store_path)(Backbone))
    model = Probe(backbone)
    compiled = torch.compile(model, backend=backend)
    x = images(6)
    expected = model.head(torch.relu(direct(backbone, x) * 2.0))
    first = compiled(x)
    second = compiled(x)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert backbone.calls == 1  # the cache works inside the compiled model (a graph break)
    partial = compiled(torch.cat([x[:3], images(2, seed=9)]))
    assert backbone.batch_sizes == [6, 2]
    torch.testing.assert_close(partial[:3], expected[:3])


def test_fullgraph_compile_is_a_documented_limitation() -> None:
    model = Probe(frozen(cached_module()(Backbone)))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"(?i)skip|disable"):
        compiled(images(2))


def test_sub_batches_from_threads_share_one_cache() -> None:
    module = frozen(cached_module()(Backbone))
    x = images(32)
    expected = direct(module, x)
    replicas = [module._replicate_for_data_parallel() for _ in range(4)]  # what DataParallel does
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        results[i] = replicas[i](x[i * 8 : (i + 1) * 8])

    for round_ in range(2):
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert torch.equal(torch.cat([results[i] for i in range(4)]), expected)
        if round_ == 0:
            assert module.module_cache.miss_rows == 32
    assert module.module_cache.hit_rows == 32  # the second round: every sub-batch hit
    assert torch.equal(module(x), expected)  # the whole batch after its parts: a full hit
    assert module.module_cache.hit_rows == 64


def test_replicas_see_a_checkpoint_loaded_into_the_original() -> None:
    module = frozen(cached_module()(Backbone), seed=0)
    module.cachedfeatures_max_memory_bytes = 4096  # an override, read at the first call
    x = images(4)
    old = module._replicate_for_data_parallel()(x)
    module.load_state_dict(Backbone(seed=1).state_dict())
    new = module._replicate_for_data_parallel()(x)  # a fresh replica, as on every DataParallel step
    assert not torch.equal(new, old)
    assert torch.equal(new, direct(module, x))


def test_data_parallel_wrapper() -> None:
    module = frozen(cached_module()(Backbone))
    parallel = nn.DataParallel(module)
    x = images(8)
    assert torch.equal(parallel(x), parallel(x))
    assert module.module_cache.hit_rows == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_come_back_on_cuda(store_path: Path) -> None:
    module = frozen(cached_module(store=store_path)(Backbone)).cuda()
    x = images(6).cuda()
    miss = module(x[:4])
    out = module(x)
    assert out.device.type == "cuda" and miss.device.type == "cuda"
    assert module.batch_sizes == [4, 2]
    torch.testing.assert_close(out, direct(module, x))
    parallel = nn.DataParallel(module)
    assert torch.equal(parallel(x), out)


def test_a_budgeted_entry_stays_within_its_budget_over_many_chunks(store_path) -> None:
    """Dropping a chunk drops its checksum record too: otherwise the records of dropped chunks
    add up until the budget cannot hold a single chunk."""

    @cached_module(store=store_path, chunk_rows=4, max_bytes=8000, max_memory_bytes=0, version="v")
    def embed(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    generator = torch.Generator().manual_seed(0)
    for _ in range(300):  # 300 chunks of 4 rows, about 0.4 MB unpruned
        x = torch.randn(4, 16, generator=generator)
        assert torch.equal(embed(x), x * 2)
    size = sum(path.stat().st_size for path in store_path.rglob("*") if path.is_file())
    assert size <= 8000 + 1000  # the budget, plus at most about one chunk being written


def test_byte_budgets_are_written_as_a_dataset_takes_them(store_path: Path) -> None:
    """``max_bytes="10MB"`` as for CachedFeatureDataset; a bad one names the forms it takes."""
    cached = cached_module(store=store_path, max_bytes="10MB", max_memory_bytes="1MiB")(nn.Linear)(2, 2)
    assert cached.module_cache.options.max_bytes == 10_000_000
    assert cached.module_cache.options.max_memory_bytes == 1024 * 1024
    with pytest.raises(ValueError, match=r"Expected max_bytes to be a number of bytes like .*'10GB'"):
        cached_module(store=store_path, max_bytes="lots")
