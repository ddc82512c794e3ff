"""The predecessor's scenarios, translated to ``@cached_module``.

Each test mirrors one behaviour of torchcache 0.6 (its README and its own test suite, read
and rewritten here, not copied) or of our docs (docs/guides/module-cache.md), and says
which in its docstring. Where torchcache's behaviour is a defect (state it never sees, a
budget that silently drops every write), the test asserts what a careful user expects.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import pytest
import torch
import zarr
from torch import nn

from cachedfeatures import (
    BudgetError,
    FeatureStore,
    InputBatchError,
    RequiresGradError,
    UnhashableArgumentError,
    cached_module,
    default_cache_dir,
    default_store_path,
)
from tests.helpers import run_script


class Doubler(nn.Module):
    """torchcache's test module: ``forward(x) = x * 2``.

    The tests count computed rows with the cache's own ``miss_rows`` (a counter in the
    module's ``__dict__`` would be module state, part of its fingerprint).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def computed(model: nn.Module) -> int:
    """Rows the cached ``model`` has computed (sent through its forward)."""
    return int(model.module_cache.miss_rows)


def pair() -> torch.Tensor:
    return torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


def other_pair() -> torch.Tensor:
    return torch.tensor([[7.0, 8.0, 9.0], [10.0, 11.0, 12.0]])


# -- memory caching ----------------------------------------------------------------------------


def test_memory_caching_counts_hits_and_misses() -> None:
    """torchcache: a first call fills the memory cache (one entry per row), a second call is
    served from it, and a bigger batch reuses the cached rows."""
    model = cached_module()(Doubler)()
    cache = model.module_cache
    assert cache.memory is not None and len(cache.memory) == 0
    out = model(pair())
    assert torch.equal(out, pair() * 2)
    assert (cache.miss_rows, cache.hit_rows, len(cache.memory)) == (2, 0, 2)
    again = model(pair())
    assert torch.equal(again, out)
    assert (cache.miss_rows, cache.hit_rows) == (2, 2)
    bigger = torch.cat([pair(), torch.tensor([[7.0, 8.0, 9.0]])])
    out3 = model(bigger)
    assert torch.equal(out3[:2], out) and torch.equal(out3, bigger * 2)
    assert (cache.miss_rows, cache.hit_rows) == (3, 4)


def test_subsequent_calls_with_mixed_hits_and_misses() -> None:
    """torchcache (mixed cache hits): a batch of cached and new rows computes only the new
    ones and returns every row in its place."""
    model = cached_module()(Doubler)()
    model(pair())
    combined = model(torch.cat([other_pair()[:1], pair(), other_pair()[1:]]))
    assert torch.equal(combined, torch.cat([other_pair()[:1], pair(), other_pair()[1:]]) * 2)
    assert computed(model) == 4  # the two cached rows were not computed again
    assert model.module_cache.module_calls == 2


def test_a_repeated_call_is_served_whole() -> None:
    """torchcache (monkey patching): the second call of the same batch skips the forward and
    still returns the right values."""
    model = cached_module()(Doubler)()
    x = torch.tensor([[1.0, 2.0, 3.0]])
    model(x)
    assert torch.equal(model(x), x * 2)
    assert model.module_cache.module_calls == 1


def test_several_tensor_inputs() -> None:
    """torchcache (multiple inputs): rows are keyed by all tensor arguments together."""

    @cached_module()
    class TwoInputs(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x * 2 + y * 3

    model = TwoInputs()
    x, y = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[4.0, 5.0, 6.0]])
    assert torch.equal(model(x, y), x * 2 + y * 3)
    assert torch.equal(model(x, y), x * 2 + y * 3)
    assert torch.equal(model(x, x), x * 5)  # same x, other y: another row
    assert model.module_cache.miss_rows == 2 and model.module_cache.hit_rows == 1


def test_inputs_of_any_rank() -> None:
    """torchcache (different shapes): a (5, 5, 5, 5) batch goes through and comes back."""
    model = cached_module()(Doubler)()
    x = torch.randn(5, 5, 5, 5)
    assert torch.equal(model(x), x * 2)
    assert torch.equal(model(x), x * 2)
    assert computed(model) == 5


# -- arguments: binding, non-tensor values, bad calls -----------------------------------------


class Scale(nn.Module):
    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x * scale


def test_non_tensor_arguments_are_part_of_the_key() -> None:
    """torchcache (non-tensor args/kwargs affect cache): another scale gives new rows, the
    same scale hits, whether passed by position or by keyword."""
    model = cached_module()(Scale)()
    memory = model.module_cache.memory
    assert memory is not None
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(model(x, 2), x * 2) and len(memory) == 2
    assert torch.equal(model(x, 3), x * 3) and len(memory) == 4
    assert torch.equal(model(x, 2), x * 2) and len(memory) == 4
    assert torch.equal(model(x, scale=3), x * 3) and len(memory) == 4
    assert computed(model) == 4


def test_keyword_and_positional_calls_share_rows() -> None:
    """torchcache keys ``f(x, 3)`` and ``f(x, scale=3)`` alike (it hashes the values only); ours
    binds the call to the forward's signature first, defaults applied, so ``f(x, 3)``,
    ``f(x, scale=3)`` and ``f(x=x, scale=3)`` are one key, and so are ``f(x)`` and ``f(x, 1.0)``."""
    model = cached_module()(Scale)()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    model(x, 3)
    assert torch.equal(model(x, scale=3), x * 3)
    assert torch.equal(model(x=x, scale=3), x * 3)
    model(x)
    assert torch.equal(model(x, 1.0), x)
    assert computed(model) == 4 and model.module_cache.module_calls == 2


def test_keyword_and_positional_calls_share_persistent_rows(store_path: Path) -> None:
    """The same binding for the persistent tier: a fresh instance finds rows stored by a
    keyword call when called positionally (one entry, not two)."""
    first = cached_module(store=store_path)(Scale)()
    x = torch.randn(3, 4)
    first(x, scale=2.0)
    second = cached_module(store=store_path, max_memory_bytes=0)(Scale)()
    assert torch.equal(second(x, 2.0), x * 2.0)
    assert computed(second) == 0
    assert len(FeatureStore.open(store_path).entries) == 1


def test_pure_function_arguments_bind_to_its_signature() -> None:
    """torchcache (pure function kwargs affect cache), with binding: the offset is part of the
    key however it is passed."""
    calls: list[float] = []

    @cached_module()
    def add(x: torch.Tensor, offset: float) -> torch.Tensor:
        calls.append(offset)
        return x + offset

    x = torch.tensor([[1.0], [2.0]])
    assert torch.equal(add(x, 5), x + 5)
    assert torch.equal(add(x, offset=5), x + 5)
    assert torch.equal(add(x, 6), x + 6)
    assert calls == [5, 6]


def test_a_batch_of_scalars_is_a_one_dimensional_tensor() -> None:
    """torchcache refuses 1-D inputs ("at least 2 dimensions"); our docs take the first
    dimension as the batch, so a 1-D tensor is a batch of scalars for an element-wise
    function such as torchcache's ``x * 2``, and is cached row by row."""
    calls = []

    @cached_module()
    def double(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x * 2

    x = torch.arange(5.0)
    assert torch.equal(double(x), x * 2)
    assert torch.equal(double(torch.arange(7.0)), torch.arange(7.0) * 2)
    assert calls[-1] == 2  # rows 0..4 were hits, only 5 and 6 were computed


@pytest.mark.parametrize("features", [5, 10])
def test_one_sample_without_a_batch_dimension_is_an_input_error(features: int) -> None:
    """torchcache's README example passes ``torch.ones(10)`` to a ``Linear(10, 10)``: one sample
    without a batch dimension. Taken as a batch of 10 scalars it cannot work (each output row
    would depend on the other rows); the first such call is an input error naming the fix."""
    linear = cached_module()(nn.Linear)(10, features).requires_grad_(False)
    with pytest.raises(InputBatchError, match=r"1-D.*x\[None\]"):
        linear(torch.randn(10))
    with pytest.raises(InputBatchError, match=r"1-D.*x\[None\]"):
        linear(torch.ones(10))  # ten equal rows: the module would see a single row
    out = linear(torch.randn(10)[None])  # the fix the message names
    assert out.shape == (1, features)


def test_bad_calls_are_clear_errors() -> None:
    """torchcache (fail on bad parameters): scalars of every basic type and keyword tensors
    are accepted; no tensor, a list argument and disagreeing batch sizes are errors, and so
    is decorating a class that is not a module."""

    @cached_module()
    class Anything(nn.Module):
        def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            tensor = next(v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor))
            return torch.zeros(len(tensor), 1)

    module = Anything()
    module(torch.tensor([[1, 2, 3]]), "hello", 1, 1.0, boolean_argument=True)
    module(hi=torch.tensor([[1, 2, 3]]))
    with pytest.raises(InputBatchError, match="no tensor argument"):
        module(1, "a")
    with pytest.raises(UnhashableArgumentError):
        module(torch.tensor([[1, 2, 3]]), [1, 2, 3])
    with pytest.raises(InputBatchError, match="batch size"):
        module(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[7, 8, 9]]))
    with pytest.raises(TypeError, match=r"nn\.Module subclasses"):

        @cached_module()
        class NotAModule:
            pass


# -- options -----------------------------------------------------------------------------------


def test_cache_dtype_serves_hits_and_misses_alike(store_path: Path) -> None:
    """torchcache (different dtype): with ``cache_dtype=torch.half`` both calls give the
    right values; ours returns float16 on the miss and on the hit (torchcache casts hits back
    to the input's dtype)."""
    model = cached_module(store=store_path, cache_dtype=torch.half)(Doubler)()
    x = torch.tensor([[1.0, 2.0, 3.0]])
    miss, hit = model(x), model(x)
    assert miss.dtype == hit.dtype == torch.float16
    assert torch.equal(miss, hit) and torch.equal(hit.float(), x * 2)
    fresh = cached_module(store=store_path, cache_dtype=torch.half, max_memory_bytes=0)(Doubler)()
    assert torch.equal(fresh(x), hit) and computed(fresh) == 0


def test_attributes_override_the_decorator_options(store_path: Path) -> None:
    """torchcache (override torchcache_ arguments): an attribute set in ``__init__`` switches
    the persistent tier on for that instance."""

    @cached_module()
    class Configured(Doubler):
        def __init__(self, store: Path) -> None:
            super().__init__()
            self.cachedfeatures_store = store

    model = Configured(store_path)
    x = torch.randn(5, 5, 5, 5)
    assert torch.equal(model(x), x * 2)
    assert model.module_cache.store is not None
    assert len(FeatureStore.open(store_path).entries) == 1


def test_caching_can_be_switched_off_per_instance() -> None:
    """torchcache (duplicate modules): ``torchcache_enabled = False`` on one instance leaves the
    other cached; ours is ``cachedfeatures_enabled``."""

    @cached_module()
    class Maybe(Doubler):
        def __init__(self, cache: bool = True) -> None:
            super().__init__()
            self.cachedfeatures_enabled = cache

    cached, uncached = Maybe(), Maybe(cache=False)
    for _ in range(2):
        assert torch.equal(cached(pair()), pair() * 2)
        assert torch.equal(uncached(pair()), pair() * 2)
    assert computed(cached) == 2 and cached.module_cache.hit_rows == 2
    assert uncached.module_cache.hit_rows == uncached.module_cache.miss_rows == 0
    assert uncached.module_cache.memory is not None and len(uncached.module_cache.memory) == 0


def multiplier(factor: float) -> type[nn.Module]:
    """A class ``Multiplier`` (one qualified name) whose forward multiplies by ``factor``."""

    class Multiplier(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * factor

    return Multiplier


def test_version_string_stands_in_for_the_module(store_path: Path) -> None:
    """torchcache (persistent_module_hash): with the same explicit hash, a module whose forward
    changed is served the first one's outputs, on purpose; ours is ``version=``, and another
    version computes afresh."""
    x = torch.tensor([[1.0, 2.0, 3.0]])
    cached_module(store=store_path, version="v1")(multiplier(2.0))()(x)
    same = cached_module(store=store_path, version="v1", max_memory_bytes=0)(multiplier(3.0))()
    assert torch.equal(same(x), x * 2)  # the user vouched: same version, same outputs
    newer = cached_module(store=store_path, version="v2", max_memory_bytes=0)(multiplier(3.0))()
    assert torch.equal(newer(x), x * 3)


def test_two_functions_on_one_store_keep_their_own_rows(store_path: Path) -> None:
    """torchcache (ensure unique function cache): two decorated functions on one store get two
    entries and their own outputs."""

    @cached_module(store=store_path)
    def plus_one(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    @cached_module(store=store_path)
    def plus_two(x: torch.Tensor) -> torch.Tensor:
        return x + 2

    x = torch.tensor([[1.0], [2.0]])
    assert torch.equal(plus_one(x), x + 1) and torch.equal(plus_one(x), x + 1)
    assert torch.equal(plus_two(x), x + 2)
    assert len(FeatureStore.open(store_path).entries) == 2


def test_pure_function_is_called_once_per_row() -> None:
    """torchcache (pure function basic): a second call with the same input does not run the
    function again."""
    calls = []

    @cached_module()
    def triple(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.clone())
        return x * 3

    x = torch.tensor([[1.0], [2.0]])
    assert torch.equal(triple(x), x * 3) and torch.equal(triple(x), x * 3)
    assert len(calls) == 1


# -- the persistent tier -----------------------------------------------------------------------

PERSISTENT_DEFAULT = """
import json, torch
from cachedfeatures import cached_module
from tests.test_torchcache_compat import Doubler
model = cached_module(persistent=True)(Doubler)()
out = model(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
print(json.dumps({"out": out.tolist(), "rows": model.module_cache.miss_rows}))
"""


@pytest.mark.slow  # fresh interpreters importing torch
def test_persistent_without_a_directory_serves_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchcache (persistent=True, no persistent_cache_dir): a cache that outlives the process
    with no directory given. Ours: modules.zarr in the user cache directory, or where
    CACHEDFEATURES_CACHE_DIR says."""
    monkeypatch.setenv("CACHEDFEATURES_CACHE_DIR", str(tmp_path / "cache"))
    first = run_script(PERSISTENT_DEFAULT)
    second = run_script(PERSISTENT_DEFAULT)
    assert first["rows"] == 2 and second["rows"] == 0
    assert first["out"] == second["out"] == (pair() * 2).tolist()
    assert len(FeatureStore.open(tmp_path / "cache" / "modules.zarr").entries) == 1


def test_the_default_store_is_in_the_user_cache_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CACHEDFEATURES_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # platformdirs' Linux cache home
    monkeypatch.setenv("CACHEDFEATURES_LOCK_DIR", str(tmp_path / "locks"))
    expected = Path(platformdirs.user_cache_path("cachedfeatures"))
    assert default_cache_dir() == expected and default_store_path() == expected / "modules.zarr"
    model = cached_module(persistent=True, max_memory_bytes=0)(Doubler)()
    model(pair())
    assert model.module_cache.store is not None
    assert len(FeatureStore.open(expected / "modules.zarr").entries) == 1
    monkeypatch.setenv("CACHEDFEATURES_CACHE_DIR", str(tmp_path / "mine"))  # read at the first call
    assert default_store_path() == tmp_path / "mine" / "modules.zarr"


def test_persistent_false_with_a_store_is_a_contradiction(store_path: Path) -> None:
    with pytest.raises(ValueError, match="Expected no store with persistent=False"):
        cached_module(store=store_path, persistent=False)(Doubler)
    model = cached_module(store=store_path, persistent=True)(Doubler)()  # the store given wins
    model(pair())
    assert len(FeatureStore.open(store_path).entries) == 1


PERSISTENT = """
import json, sys, torch
from cachedfeatures import cached_module
from tests.test_torchcache_compat import Doubler
store, compress = sys.argv[1], sys.argv[2] == "zstd"
options = {"compressor": __import__("zarr").codecs.ZstdCodec(level=3)} if compress else {}
model = cached_module(store=store, **options)(Doubler)()
x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
out = model(x)
print(json.dumps({"out": out.tolist(), "rows": model.module_cache.miss_rows}))
"""


@pytest.mark.slow  # fresh interpreters importing torch
@pytest.mark.parametrize("compressor", ["default", "zstd"])
def test_persistent_rows_serve_another_process(store_path: Path, compressor: str) -> None:
    """torchcache (persistent caching, compression): one file per row written by the first
    run; a new run loads them instead of computing. Ours: rows of one entry, read by a new
    process, with Blosc (lz4) by default or a plain zstd codec."""
    first = run_script(PERSISTENT, str(store_path), compressor)
    second = run_script(PERSISTENT, str(store_path), compressor)
    assert first["rows"] == 2 and second["rows"] == 0
    assert first["out"] == second["out"] == (pair() * 2).tolist()
    (entry,) = FeatureStore.open(store_path).entries
    codecs = [type(c).__name__ for c in zarr.open_array(entry.arrays["features"].store_path).compressors]
    assert ("ZstdCodec" if compressor == "zstd" else "BloscCodec") in codecs


def test_a_compressor_needs_a_persistent_store() -> None:
    """torchcache raises for ``zstd_compression=True`` without ``persistent=True``; ours raised
    nothing for a compressor with no store. Now the first call says what to do."""
    model = cached_module(compressor=zarr.codecs.ZstdCodec())(Doubler)()
    with pytest.raises(ValueError, match=r"compressor.*store="):
        model(pair())
    assert computed(model) == 0


@pytest.mark.parametrize("option", [{"max_bytes": 10_000}, {"chunk_rows": 8}])
def test_persistent_options_need_a_persistent_store(option: dict[str, Any]) -> None:
    """The same for the other options that only a persistent store uses: silently ignoring
    ``max_bytes`` would let a user believe the memory is bounded by it."""
    model = cached_module(**option)(Doubler)()
    with pytest.raises(ValueError, match=f"{next(iter(option))}.*store="):
        model(pair())


def test_the_memory_budget_keeps_a_stable_subset() -> None:
    """torchcache (cache size): a memory budget smaller than the batch stops caching once
    full; ours drops the most recently used rows (MRU), so repeated passes keep hitting the
    rows that fit."""
    row = 4 * 3  # bytes of one float32 output row of 3 values
    model = cached_module(max_memory_bytes=2 * row)(Doubler)()
    data = torch.randn(6, 3)
    for _ in range(3):
        assert torch.equal(model(data[:3]), data[:3] * 2)
        assert torch.equal(model(data[3:]), data[3:] * 2)
    memory = model.module_cache.memory
    assert memory is not None and memory.nbytes <= 2 * row and len(memory) == 2
    assert model.module_cache.hit_rows >= 4  # the rows kept hit on every later pass


def test_the_persistent_budget_keeps_a_stable_subset(store_path: Path) -> None:
    """torchcache (cache size): the persistent cache stops growing at its budget. Ours drops
    whole chunks, most recently used first, and keeps the stored bytes under the budget."""
    model = cached_module(store=store_path, chunk_rows=4, max_memory_bytes=0)(Doubler)()
    data = torch.randn(64, 32)
    model(data[:4])
    floor = FeatureStore.open(store_path).entries[0].nbytes_stored()
    budget = floor + 3 * 4 * 32 * 4  # metadata and about three chunks of raw rows
    model = cached_module(store=store_path, chunk_rows=4, max_memory_bytes=0, max_bytes=budget)(Doubler)()
    for _ in range(2):
        for start in range(0, 64, 8):
            assert torch.equal(model(data[start : start + 8]), data[start : start + 8] * 2)
    (entry,) = FeatureStore.open(store_path).entries
    assert entry.nbytes_stored() <= budget
    assert model.module_cache.hit_rows > 0  # a stable subset served the second pass


def test_a_budget_below_the_entry_metadata_is_a_clear_error(store_path: Path) -> None:
    """Defect found against the predecessor's suite: a ``max_bytes`` smaller than the entry's
    own metadata dropped every write (0 rows kept, no warning, the module re-run on every
    call). Now the first write says the budget is too small and what to set."""
    model = cached_module(store=store_path, max_bytes=100, max_memory_bytes=0)(Doubler)()
    with pytest.raises(BudgetError, match=r"max_bytes=100.*at least \d+"):
        model(pair())


# -- gradients ---------------------------------------------------------------------------------


def test_a_cached_module_inside_a_trained_model() -> None:
    """torchcache (training): a frozen cached module (weights kept as a plain tensor) inside a
    model whose head trains; backward works, twice, and the outputs are right."""

    @cached_module()
    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.randn(5, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight

    class Trained(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cached = Frozen()
            self.weight = nn.Parameter(torch.randn(5, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.cached(x) @ self.weight  # type: ignore[no-any-return]

    model = Trained()
    for _ in range(2):
        x = torch.randn(1, 5)
        out = model(x)
        out.sum().backward()
        assert torch.allclose(out, x @ model.cached.weight @ model.weight)
        assert model.weight.grad is not None


def test_parameters_that_require_grad_are_refused() -> None:
    """torchcache (fails with parameter): a trainable parameter in the cached module is an
    error (torchcache asserts at construction; ours raises at the first call)."""

    @cached_module()
    class Trainable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight

    with pytest.raises(RequiresGradError, match="requires_grad_"):
        Trainable()(torch.randn(2, 5))


# -- state changes within one process ----------------------------------------------------------


@cached_module()
class Stateful(nn.Module):
    """Weights as a plain tensor (torchcache's tests keep them so), a float, a submodule."""

    def __init__(self, value: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.proj = torch.full((4, 4), value)
        self.temperature = temperature
        self.act: nn.Module = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x @ self.proj) / self.temperature


def uncached(model: Stateful, x: torch.Tensor) -> torch.Tensor:
    return model.act(x @ model.proj) / model.temperature  # type: ignore[no-any-return]


def change_proj_attribute(model: Stateful) -> None:
    model.proj = torch.full((4, 4), 2.0)


def change_proj_in_place(model: Stateful) -> None:
    model.proj.mul_(3)


def change_temperature(model: Stateful) -> None:
    model.temperature = 2.0


def swap_activation(model: Stateful) -> None:
    model.act = nn.Tanh()


@pytest.mark.parametrize(
    "change", [change_proj_attribute, change_proj_in_place, change_temperature, swap_activation]
)
def test_state_changes_within_a_process_give_fresh_outputs(change: Any) -> None:
    """torchcache keys on source and init arguments only, so none of these changes is seen;
    ours re-fingerprints when any state of the module changes: a plain tensor attribute
    replaced or changed in place, a float set, a submodule swapped (ReLU for Tanh)."""
    model = Stateful()
    x = torch.randn(6, 4)
    before = model(x)
    assert torch.equal(model(x), before) and computed(model) == 6
    change(model)
    after = model(x)
    assert torch.equal(after, uncached(model, x))
    assert not torch.equal(after, before)
    assert computed(model) == 12
    assert torch.equal(model(x), after) and computed(model) == 12  # and cached again


def test_new_weights_loaded_give_fresh_outputs() -> None:
    """torchcache never sees a checkpoint loaded into a module of the same class; ours does."""
    model = cached_module()(nn.Linear)(4, 3).requires_grad_(False)
    x = torch.randn(5, 4)
    before = model(x)
    model.load_state_dict({"weight": torch.randn(3, 4), "bias": torch.randn(3)})
    after = model(x)
    assert torch.allclose(after, x @ model.weight.T + model.bias)
    assert not torch.equal(before, after)


def test_a_closure_value_changed_gives_fresh_outputs() -> None:
    """A decorated function reading a module-level (here: closure) setting that changes."""
    settings = {"scale": 2.0}

    @cached_module()
    def scaled(x: torch.Tensor) -> torch.Tensor:
        return x * settings["scale"]

    x = torch.randn(3, 2)
    assert torch.equal(scaled(x), x * 2.0)
    settings["scale"] = 5.0
    assert torch.equal(scaled(x), x * 5.0)


def test_the_state_token_is_cheap() -> None:
    """Checking the state on every call must cost little next to the call itself: on a model
    of 50 submodules it stays within a small multiple of a bare Python loop over them."""
    import time

    from cachedfeatures.compute.state_token import state_token

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.act, self.scale = nn.Linear(8, 8), nn.ReLU(), 1.0

    net = nn.Sequential(*[Block() for _ in range(16)])
    assert len(list(net.modules())) == 49
    token = state_token(net)
    assert state_token(net) == token
    start = time.perf_counter()
    for _ in range(200):
        state_token(net)
    per_call = (time.perf_counter() - start) / 200
    assert per_call < 2e-3  # measured about 70 us on a shared core; generous for CI


# -- state changes across processes: the persistent tier ---------------------------------------

MODELS = """
import dataclasses, torch
from torch import nn
import compat_helper

@dataclasses.dataclass
class Config:
    scale: float

class PlainTensor(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.proj = torch.full((4, 4), value)
    def forward(self, x):
        return x @ self.proj

class Temperature(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.temperature = value
    def forward(self, x):
        return x / self.temperature

class Helper(nn.Module):
    def __init__(self, value):
        super().__init__()
    def forward(self, x):
        return compat_helper.transform(x)

class Configured(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.config = Config(scale=value)
    def forward(self, x):
        return x * self.config.scale
"""

HELPER = """
def transform(x):
    return x * {value}
"""

CROSS = """
import json, sys, torch
sys.dont_write_bytecode = True  # the helper file is edited between runs, maybe within a second
sys.path.insert(0, sys.argv[1])
from cachedfeatures import cached_module
import compat_models
stores, value, results = sys.argv[2], float(sys.argv[3]), {}
for case in sys.argv[4].split(","):  # one store each
    model = cached_module(store=f"{stores}/{case}.zarr")(getattr(compat_models, case))(value)
    out = model.requires_grad_(False)(torch.arange(8.0).reshape(2, 4))
    results[case] = {"out": out.tolist(), "miss": model.module_cache.miss_rows}
print(json.dumps(results))
"""
CASES = ["PlainTensor", "Temperature", "Helper", "Configured"]


def expected(case: str, value: float) -> list[list[float]]:
    x = torch.arange(8.0).reshape(2, 4)
    if case == "PlainTensor":
        return (x @ torch.full((4, 4), value)).tolist()
    if case == "Temperature":
        return (x / value).tolist()
    return (x * value).tolist()  # Helper, Configured


@pytest.mark.slow  # three fresh interpreters importing torch
def test_a_new_process_with_other_state_serves_its_own_outputs(tmp_path: Path) -> None:
    """The staleness cases of issue 12 for the persistent tier, each as processes on one store
    (the four cases run side by side in each process, a store each): a plain tensor attribute
    (``self.proj = torch.full(...)``), a float set in ``__init__``, a helper function in another
    file edited between runs, a config object. The second run, with another value, must compute
    its own outputs; a third run with the first value again is served from the store."""
    code, stores = tmp_path / "code", tmp_path / "stores"
    code.mkdir()
    stores.mkdir()
    (code / "compat_models.py").write_text(textwrap.dedent(MODELS))
    helper = code / "compat_helper.py"
    runs = []
    for value in (2.0, 3.0, 2.0):  # the Helper case's edit is in the helper's file, not its arguments
        helper.write_text(textwrap.dedent(HELPER.format(value=value)))
        runs.append(run_script(CROSS, str(code), str(stores), str(value), ",".join(CASES)))
    for case in CASES:
        first, second, third = (run[case] for run in runs)
        assert first["out"] == expected(case, 2.0) and first["miss"] == 2, case
        assert second["out"] == expected(case, 3.0), (
            f"{case}: the second run was served the first run's outputs"
        )
        assert second["miss"] == 2, case
        assert third["out"] == expected(case, 2.0) and third["miss"] == 0, case


def test_outputs_of_hits_are_fresh_tensors() -> None:
    """torchcache returns a full hit as a view of an internal buffer that its next call
    overwrites (docs/performance.md, "cached_module against torchcache"); ours returns fresh tensors."""
    model = cached_module()(Doubler)()
    x = pair()
    model(x)
    kept = model(x)
    model(other_pair())
    model(x).add_(100)
    assert np.array_equal(kept.numpy(), (x * 2).numpy())
    assert torch.equal(model(x), x * 2)
