"""In-model caching: ``@cached_module`` for ``nn.Module`` classes and functions of tensors.

For models whose expensive part sits inside a larger model, or whose inputs are made on
the fly, so that the dataset cannot be wrapped::

    @cached_module(store="features.zarr")       # or store=None for memory only
    class Backbone(nn.Module): ...

    @cached_module(persistent=True)             # a store in the user cache directory
    class Encoder(nn.Module): ...

    @cached_module()
    def embed(x: torch.Tensor) -> torch.Tensor: ...

Each batch row is looked up by a content key of its inputs (:mod:`cachedfeatures.format.row_keys`):
first in a byte-budgeted memory tier (:mod:`cachedfeatures.compute.memory_tier`), then in a
content-addressed entry of a Zarr feature store (:mod:`cachedfeatures.store.keyed_entry`). Only the
missing rows go through the module; a fully cached batch never calls it. Entries are scoped
by the module's fingerprint (class, code and state), taken again whenever a cheap token of the
state changes (:mod:`cachedfeatures.compute.state_token`), so loading a fine-tuned checkpoint, setting
``self.scale`` or swapping a submodule never serves the old outputs.

Every instance of a decorated class has its own cache, created on its first call, with the
decorator's options overridden by instance (or class) attributes named
``cachedfeatures_<option>``, e.g. ``self.cachedfeatures_store = path`` in ``__init__``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import platformdirs
import torch
from torch import nn
from zarr.abc.store import Store

from cachedfeatures._version import __version__
from cachedfeatures.compute import hashing as _hashing
from cachedfeatures.compute.fingerprint import Fingerprint, module_fingerprint, options_json
from cachedfeatures.compute.layout import OutputLayout, cast_for_storage
from cachedfeatures.compute.memory_tier import MemoryTier, Row
from cachedfeatures.compute.modes import mode_dependent_submodules, training_mode_message
from cachedfeatures.compute.state_token import state_token
from cachedfeatures.errors import (
    InputBatchError,
    OptionWithoutStoreError,
    RequiresGradError,
    TrainingModeError,
)
from cachedfeatures.format.row_keys import KEY_ALGORITHM, KEY_BYTES, CallInputs, gather_inputs, row_keys
from cachedfeatures.parse import parse_float_dtype, parse_int
from cachedfeatures.pruning import KeyedBudget
from cachedfeatures.store.feature_store import Compressor, FeatureStore, StoreLike
from cachedfeatures.store.keyed_entry import KeyedEntry, keyed_chunk_rows
from cachedfeatures.units import parse_bytes

__all__ = [
    "CACHE_DIR_ENV",
    "OPTION_PREFIX",
    "CacheOptions",
    "ModuleCache",
    "cached_module",
    "default_cache_dir",
    "default_store_path",
]

logger = logging.getLogger(__name__)

OPTION_PREFIX = "cachedfeatures_"
DEFAULT_MAX_MEMORY_BYTES = 1 << 30
CACHE_DIR_ENV = "CACHEDFEATURES_CACHE_DIR"
DEFAULT_STORE_NAME = "modules.zarr"
T = TypeVar("T")


def default_cache_dir() -> Path:
    """The directory of the caches made without a store: ``$CACHEDFEATURES_CACHE_DIR`` if set,
    else the user cache directory (``~/.cache/cachedfeatures`` on Linux,
    ``~/Library/Caches/cachedfeatures`` on macOS, ``%LOCALAPPDATA%\\cachedfeatures\\Cache`` on
    Windows; from ``platformdirs``)."""
    configured = os.environ.get(CACHE_DIR_ENV, "").strip()
    return Path(configured).expanduser() if configured else platformdirs.user_cache_path("cachedfeatures")


def default_store_path() -> Path:
    """The store ``cached_module(persistent=True)`` uses when no ``store`` is given:
    ``modules.zarr`` in :func:`default_cache_dir` (read when a cache makes its first call)."""
    return default_cache_dir() / DEFAULT_STORE_NAME


@dataclass(frozen=True)
class CacheOptions:
    """The options of one cache (see :func:`cached_module` for their meaning)."""

    store: StoreLike = None
    enabled: bool = True
    max_bytes: int | None = None
    max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES
    cache_dtype: torch.dtype | None = None
    version: str | None = None
    chunk_rows: int | None = None
    compressor: Compressor = "default"
    persistent: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.store, (str, os.PathLike, Store, type(None))):
            raise TypeError(f"Expected store to be a path, a zarr Store or None. Got {self.store!r}.")
        if self.persistent not in (None, True, False):
            raise TypeError(f"Expected persistent to be True, False or None. Got {self.persistent!r}.")
        if self.persistent is False and self.store is not None:
            raise ValueError(
                f"Expected no store with persistent=False (memory only). Got store={self.store!r}; "
                "drop persistent=False to use that store, or drop the store."
            )
        if not isinstance(self.enabled, bool):
            raise TypeError(f"Expected enabled to be True or False. Got {self.enabled!r}.")
        for name in ("max_bytes", "max_memory_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(
                    f"Expected {name} to be a number of bytes (int >= 0) or None. Got {value!r}."
                )
        if self.chunk_rows is not None:
            parse_int("chunk_rows", self.chunk_rows, minimum=1, what="a positive int or None")
        parse_float_dtype(self.cache_dtype, "cache_dtype")
        if self.version is not None and not isinstance(self.version, str):
            raise TypeError(f"Expected version to be a str or None. Got {self.version!r}.")

    @classmethod
    def names(cls) -> list[str]:
        return [field.name for field in fields(cls)]

    def overridden_by(self, owner: object) -> CacheOptions:
        """These options with ``cachedfeatures_<option>`` attributes of ``owner`` applied."""
        names = self.names()
        changes: dict[str, Any] = {}
        for attribute in dir(owner):
            if not attribute.startswith(OPTION_PREFIX) or attribute == f"{OPTION_PREFIX}cache":
                continue
            name = attribute[len(OPTION_PREFIX) :]
            if name not in names:
                raise ValueError(
                    f"{type(owner).__name__}.{attribute} does not name a cache option; the options "
                    f"are {', '.join(OPTION_PREFIX + n for n in names)}."
                )
            changes[name] = getattr(owner, attribute)
        return replace(self, **changes) if changes else self

    def resolved(self) -> CacheOptions:
        """These options with the default store filled in for ``persistent=True`` without one."""
        if self.persistent and self.store is None:
            return replace(self, store=default_store_path())
        return self


def cached_module(
    store: StoreLike = None,
    *,
    enabled: bool = True,
    max_bytes: int | float | str | None = None,
    max_memory_bytes: int | float | str | None = DEFAULT_MAX_MEMORY_BYTES,
    cache_dtype: torch.dtype | None = None,
    version: str | None = None,
    chunk_rows: int | None = None,
    compressor: Compressor = "default",
    persistent: bool | None = None,
) -> Callable[[T], T]:
    """Cache the outputs of an ``nn.Module`` class or a function of tensors, row by row.

    Args:
        store: where the persistent tier lives: a local path (``"features.zarr"``), a zarr
            Store, or ``None`` (default) for the memory tier only.
        enabled: ``False`` turns caching off: every call runs the module. Default ``True``.
        max_bytes: budget for the bytes of the whole persistent store (an int or ``"10GB"``),
            like ``CachedFeatureDataset(max_bytes=)``; over it, whole chunks are dropped: of other
            entries first (least recently used entry first), then of this module's entry, most
            recently used first. ``None`` (default): no budget.
        max_memory_bytes: budget of the memory tier per instance (default 1 GiB); ``0``
            turns the memory tier off, ``None`` leaves it unbounded.
        cache_dtype: store and return floating-point outputs in this dtype (e.g.
            ``torch.float16``), on hits and misses alike. Default: the module's own dtype.
        version: a string that stands in for hashing the module's weights and code; change
            it whenever they change. Default: hash them (on the first call, and again
            whenever the module's state changes between calls: a tensor replaced or modified
            in place, an attribute set, a submodule swapped).
        chunk_rows: rows per chunk of the persistent entry; default gives about 256 KiB,
            smaller than a dataset entry's, since rows are found by content in any order.
        compressor: a Zarr bytes-to-bytes codec, ``"default"`` (Blosc lz4) or ``None``.
        persistent: ``True`` keeps the outputs across processes and runs even without a
            ``store``: they go to :func:`default_store_path` (``modules.zarr`` in the user cache
            directory, or in ``$CACHEDFEATURES_CACHE_DIR`` when set), as torchcache's
            ``persistent=True`` does. ``False``: memory only. Default ``None``: persistent
            exactly when a ``store`` is given.

    ``compressor``, ``max_bytes`` and ``chunk_rows`` need a ``store``: without one the first
    call raises :class:`OptionWithoutStoreError`.

    Each tensor argument must have the batch as its first dimension (a 1-D tensor is a batch
    of scalars; the first such call checks the module treats it so, else
    :class:`InputBatchError`); other arguments must be int, float, str, bool or None (they are
    part of the key). Calls are bound to the forward's signature first, defaults filled in,
    so ``f(x, 3)`` and ``f(x, scale=3)`` share their rows. The module must be frozen:
    parameters that require grad raise :class:`RequiresGradError`, and a module in training
    mode with active dropout or batch norm raises :class:`TrainingModeError`. Outputs are
    detached, on the input's device, in the module's dtype (or ``cache_dtype``).

    The cached call runs eagerly under ``torch.compile`` of a surrounding model (a graph
    break): the rest of the model compiles, and the module itself runs uncompiled on misses.
    """
    options = CacheOptions(
        store,
        enabled,
        _parse_budget(max_bytes, "max_bytes"),
        _parse_budget(max_memory_bytes, "max_memory_bytes"),
        cache_dtype,
        version,
        chunk_rows,
        compressor,
        persistent,
    )

    def decorate(target: T) -> T:
        if inspect.isclass(target) and issubclass(target, nn.Module):
            return cast(T, _decorate_class(target, options))
        if inspect.isfunction(target) or inspect.ismethod(target):
            return cast(T, _decorate_function(target, options))
        raise TypeError(
            f"cached_module decorates nn.Module subclasses and plain functions of tensors; got "
            f"{target!r}. Write @cached_module() (with parentheses) above the class or function."
        )

    return decorate


def _decorate_class(cls: type[nn.Module], options: CacheOptions) -> type[nn.Module]:
    class Cached(cls):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # Created here, so that DataParallel replicas (shallow copies of __dict__) share
            # it; configured from cachedfeatures_<option> attributes on its first call.
            self.module_cache  # noqa: B018

        @property
        def module_cache(self) -> ModuleCache:
            """This instance's cache: statistics, tiers, and ``enabled`` to switch it."""
            cache = self.__dict__.get(_ATTRIBUTE)
            if cache is None:  # first use, possibly a call from inside the class's __init__
                cache = ModuleCache(options, cls.__name__)
                cache._owner = weakref.ref(self)
                self.__dict__[_ATTRIBUTE] = cache
            return cast(ModuleCache, cache)

        @torch.compiler.disable  # type: ignore[untyped-decorator]
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.module_cache(self, super().forward, args, kwargs)

    Cached.__name__ = cls.__name__
    Cached.__qualname__ = cls.__qualname__
    Cached.__module__ = cls.__module__
    Cached.__doc__ = cls.__doc__
    Cached.__wrapped__ = cls  # type: ignore[attr-defined]
    return Cached


def _decorate_function(function: Callable[..., Any], options: CacheOptions) -> Callable[..., Any]:
    cache = ModuleCache(options, function.__name__)

    @functools.wraps(function)
    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return cache(function, function, args, kwargs)

    wrapper.module_cache = cache  # type: ignore[attr-defined]
    return wrapper


_ATTRIBUTE = "_cachedfeatures_module_cache"


@dataclass
class _Scope:
    """The fingerprint of one module object, and the state it was taken from."""

    token: list[Any]
    fingerprint: Fingerprint


class ModuleCache:
    """The cache of one module instance (or one decorated function).

    ``enabled`` switches it at any time; ``module_calls``, ``hit_rows`` and ``miss_rows``
    count what it did; ``memory`` is the memory tier (or ``None``) and ``store`` the opened
    persistent store (or ``None``).
    """

    def __init__(self, options: CacheOptions, name: str) -> None:
        self.options = options
        self.name = name
        self.enabled = options.enabled
        self.module_calls = 0
        self.hit_rows = 0
        self.miss_rows = 0
        self._configured = False
        self._owner: weakref.ref[nn.Module] | None = None  # the module replicas are made from
        self._init_state()

    def _configure(self, owner: object) -> None:
        """Apply ``owner``'s ``cachedfeatures_<option>`` attributes, once, at the first call."""
        with self._lock:
            if self._configured:
                return
            options = self.options.overridden_by(owner).resolved()
            _check_store_options(options, self.name)
            if options != self.options:
                self.options = options
                self.enabled = options.enabled
                self._init_state()
            self._configured = True

    def _init_state(self) -> None:
        limit = self.options.max_memory_bytes
        self.memory: MemoryTier | None = None if limit == 0 else MemoryTier(limit)
        self.store: FeatureStore | None = None
        self._lock = threading.RLock()
        self._scopes: dict[int, _Scope] = {}
        self._memory_digest: str | None = None
        self._entries: dict[str, KeyedEntry] = {}
        self._budgets: dict[str, KeyedBudget] = {}  # entry name -> its store-wide budget
        self._layouts: dict[str, OutputLayout] = {}
        self._contexts: dict[str, tuple[Fingerprint, str]] = {}
        self._signatures: dict[Any, inspect.Signature | None] = {}
        self._vectors_checked: set[str] = set()  # contexts whose 1-D inputs proved a batch
        self._running = 0  # forwards in flight (threads of DataParallel replicas)

    # A module holding a cache must survive copy.deepcopy and pickling (DataLoader workers,
    # checkpoints): the copy keeps the options and starts with empty tiers.
    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options, "name": self.name, "enabled": self.enabled}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["options"], state["name"])  # type: ignore[misc]
        self.enabled = state["enabled"]

    def __repr__(self) -> str:
        memory = "off" if self.memory is None else f"{len(self.memory)} rows, {self.memory.nbytes} bytes"
        return (
            f"ModuleCache({self.name}, enabled={self.enabled}, memory={memory}, "
            f"store={self.options.store!r}, hits={self.hit_rows}, misses={self.miss_rows})"
        )

    # -- the call --------------------------------------------------------------------------------

    def __call__(
        self,
        module: Callable[..., Any],
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """``forward(*args, **kwargs)``, served row by row from the cache where possible."""
        if not self._configured:
            self._configure(module)
        if not self.enabled:
            return forward(*args, **kwargs)
        fingerprint = self._fingerprint(module)
        args, kwargs = self._bind(forward, args, kwargs)
        inputs = gather_inputs(args, kwargs)
        if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in inputs.tensors):
            raise RequiresGradError(
                f"an input of the cached {self.name} requires grad, but cached outputs carry no "
                "gradient: the layers that made the input would silently stop training. Cache a "
                "module whose inputs come from frozen layers or data, or pass input.detach() if "
                "cutting the graph there is intended."
            )
        if inputs.batch_size == 0:
            return forward(*args, **kwargs)
        keys = row_keys(inputs)
        context = self._context(fingerprint, inputs)
        rows = self._lookup(context, keys)
        missing = [i for i, row in enumerate(rows) if row is None]
        computed: dict[str, torch.Tensor] = {}
        first: list[int] = []
        layout = self._layouts.get(context)
        if missing:
            layout, computed, first = self._compute(
                module, forward, args, kwargs, inputs, missing, keys, context
            )
        if layout is None:  # unreachable: a full hit means the layout was seen
            raise AssertionError("cachedfeatures: output layout unknown after a full hit")
        self.hit_rows += inputs.batch_size - len(missing)
        self.miss_rows += len(missing)
        device = inputs.tensors[0].device
        if len(missing) == inputs.batch_size and len(set(first)) == len(first):  # all computed, in order
            return layout.join({name: tensor.to(device) for name, tensor in computed.items()})
        return layout.join(self._assemble(layout, rows, missing, computed, first, device))

    def _assemble(
        self,
        layout: OutputLayout,
        rows: Sequence[Row | None],
        missing: Sequence[int],
        computed: Mapping[str, torch.Tensor],
        first: Sequence[int],
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        """Full-batch outputs on ``device`` from cached rows and the computed ones."""
        hits = [i for i, row in enumerate(rows) if row is not None]
        out: dict[str, torch.Tensor] = {}
        for position, spec in enumerate(layout.arrays):
            dtype = getattr(torch, spec.torch_dtype or "float32")
            if not missing:
                out[spec.name] = torch.stack([cast(Row, row)[position] for row in rows]).to(device)
                continue
            result = torch.empty((len(rows), *spec.shape), dtype=dtype, device=device)
            if hits:
                stacked = torch.stack([cast(Row, rows[i])[position] for i in hits]).to(device)
                result[torch.tensor(hits, device=device)] = stacked
            fresh = computed[spec.name].to(device)
            result[torch.tensor(missing, device=device)] = fresh[torch.tensor(first, device=device)]
            out[spec.name] = result
        return out

    def _compute(
        self,
        module: Callable[..., Any],
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        inputs: CallInputs,
        missing: list[int],
        keys: Sequence[bytes],
        context: str,
    ) -> tuple[OutputLayout, dict[str, torch.Tensor], list[int]]:
        """Run ``forward`` once on the distinct missing rows and store what it returns.

        Returns the layout, the outputs (one row per distinct missing key, cast to the
        storage dtype, on the module's device) and, for each missing row, its output row.
        """
        distinct: dict[bytes, int] = {}
        unique: list[int] = []  # the first missing row of each distinct key
        first: list[int] = []  # for each missing row, the output row of its key
        for i in missing:
            if keys[i] not in distinct:
                distinct[keys[i]] = len(unique)
                unique.append(i)
            first.append(distinct[keys[i]])
        select = torch.tensor(unique, dtype=torch.long)
        vectors = [
            slot for slot, tensor in zip(inputs.slots, inputs.tensors, strict=True) if tensor.ndim == 1
        ]
        if vectors and context not in self._vectors_checked:
            # The first call with a 1-D input runs the batch as given and checks that the
            # module takes it as a batch of scalars (not as one sample without a batch dim).
            output = self._run(module, forward, args, kwargs)
            self._check_vector_batch(module, forward, args, kwargs, inputs, vectors, output)
            if inputs.batch_size > 1:
                self._vectors_checked.add(context)
            if len(unique) != inputs.batch_size:
                output = _select_rows(output, select)
        elif len(unique) == inputs.batch_size:
            output = self._run(module, forward, args, kwargs)
        else:
            output = self._run(module, forward, *inputs.select(args, kwargs, select))
        dtype = self.options.cache_dtype
        layout = self._layouts.get(context) or OutputLayout.from_output(output, len(unique), dtype)
        split = layout.split(output, len(unique), dtype)  # CPU copies for storage
        on_device = _output_tensors(layout, output, dtype)
        self._store_rows(context, [keys[i] for i in unique], layout, split)
        return layout, on_device, first

    def _run(
        self,
        module: Callable[..., Any],
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Call the forward (counted), then take the state token again: what the module's own
        forward changed (a call counter, a list of batch sizes) is not a new state; what
        changes between calls is."""
        with self._lock:
            self.module_calls += 1
            self._running += 1
        try:
            if torch.is_inference_mode_enabled():
                return forward(*args, **kwargs)
            with torch.no_grad():  # not inference_mode: the outputs must stay usable by autograd
                return forward(*args, **kwargs)
        finally:
            with self._lock:
                self._running -= 1
                subject = self._subject(module)
                scope = self._scopes.get(id(subject))
                if not self._running and scope is not None:
                    scope.token = state_token(subject)

    def _check_vector_batch(
        self,
        module: Callable[..., Any],
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        inputs: CallInputs,
        vectors: Sequence[int | str],
        output: Any,
    ) -> None:
        """Raise :class:`InputBatchError` unless the module treats 1-D inputs as a batch of
        scalars: its outputs have as many rows, and the first row alone gives the same output."""
        size = inputs.batch_size
        names = " and ".join(f"argument {slot!r}" for slot in vectors)

        def fail(reason: str) -> InputBatchError:
            return InputBatchError(
                f"{names} of the cached {self.name} is a 1-D tensor of {size} values, which a cached "
                f"call takes as a batch of {size} scalars, but the module does not: {reason}. If it "
                "is one sample, give it a batch dimension (x[None] is a batch of one); a batch of "
                "scalars needs a module that computes each row on its own."
            )

        tensors = _tensors_of(output)
        shapes = [tuple(t.shape) for t in tensors]
        if not tensors or any(len(shape) == 0 or shape[0] != size for shape in shapes):
            raise fail(f"it returned outputs of shape {', '.join(map(str, shapes)) or 'none'}")
        if size == 1:
            return
        try:
            alone = _tensors_of(self._run(module, forward, *inputs.select(args, kwargs, torch.tensor([0]))))
        except Exception as error:
            raise fail(f"it fails on the first row alone ({type(error).__name__}: {error})") from error
        for batch, single in zip(tensors, alone, strict=False):
            if single.shape != (1, *batch.shape[1:]) or not _close(single[0], batch[0]):
                raise fail("its output for the first row alone differs from that row's output in the batch")

    def _bind(
        self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call bound to ``forward``'s signature: ``f(x, 3)``, ``f(x, scale=3)`` and, where
        ``scale`` defaults to 3, ``f(x)`` become one call (one key). Parameters are passed by
        position where they can be, defaults that are keyable values are filled in (others
        are left to the forward). A call that does not bind is passed on as it is, for the
        forward to raise its own error."""
        function = getattr(forward, "__func__", forward)
        if function in self._signatures:
            signature = self._signatures[function]
        else:
            try:
                signature = inspect.signature(forward)
            except (TypeError, ValueError):
                signature = None
            self._signatures[function] = signature
        if signature is None:
            return args, kwargs
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return args, kwargs
        for name, parameter in signature.parameters.items():
            default = parameter.default
            if name not in bound.arguments and type(default) in _KEYABLE_DEFAULTS:
                bound.arguments[name] = default
        return bound.args, bound.kwargs

    # -- the tiers -------------------------------------------------------------------------------

    def _lookup(self, context: str, keys: Sequence[bytes]) -> list[Row | None]:
        rows: list[Row | None] = (
            list(self.memory.get(keys)) if self.memory is not None else [None] * len(keys)
        )
        if self.options.store is None:
            return rows
        missing = [i for i, row in enumerate(rows) if row is None]
        if not missing:
            return rows
        with self._lock:
            entry = self._entry(context)
            if entry is None:
                return rows
            found = entry.lookup([keys[i] for i in missing])
            known = found >= 0
            if not known.any():
                return rows
            hit, columns = entry.read(found[known])
        layout = self._layouts[context]
        positions = [i for i, ok in zip(np.asarray(missing)[known].tolist(), hit.tolist(), strict=True) if ok]
        tensors = [spec.numpy_to_tensor(columns[spec.name]) for spec in layout.arrays]
        # Views of freshly read arrays; the memory tier gets its own compact copies.
        loaded: list[Row] = [tuple(t[j] for t in tensors) for j in range(len(positions))]
        for i, row in zip(positions, loaded, strict=True):
            rows[i] = row
        if self.memory is not None and loaded:
            self.memory.put([keys[i] for i in positions], [tuple(t.clone() for t in row) for row in loaded])
        return rows

    def _store_rows(
        self,
        context: str,
        keys: Sequence[bytes],
        layout: OutputLayout,
        split: Mapping[str, torch.Tensor],
    ) -> None:
        if self.memory is not None:
            # Private copies (never views of what the caller gets), made outside inference
            # mode so that rows cached in an inference_mode block serve autograd callers.
            with torch.inference_mode(False):
                columns = [split[spec.name] for spec in layout.arrays]
                rows = [tuple(column[j].clone() for column in columns) for j in range(len(keys))]
            self.memory.put(keys, rows)
        if self.options.store is None:
            self._layouts.setdefault(context, layout)
            return
        arrays = {spec.name: spec.tensor_batch_to_numpy(split[spec.name]) for spec in layout.arrays}
        with self._lock:
            entry = self._entry(context) or self._create_entry(context, layout)
            entry.append(keys, arrays)
            budget = self._budgets.get(entry.name)
            if budget is not None:
                budget.after_append(sum(column.nbytes for column in arrays.values()) + KEY_BYTES * len(keys))

    def _entry(self, context: str) -> KeyedEntry | None:
        """The persistent entry for ``context``, if this or another process created it."""
        entry = self._entries.get(context)
        if entry is not None:
            return entry
        store = self._open_store()
        found = store.entry(self._entry_name(context))
        if found is None:
            return None
        self._layouts[context] = OutputLayout.from_json(found.meta["outputs"])
        entry = KeyedEntry(store, found)
        self._entries[context] = entry
        self._budget_for(store, entry)
        return entry

    def _create_entry(self, context: str, layout: OutputLayout) -> KeyedEntry:
        store = self._open_store()
        row_nbytes = sum(spec.row_nbytes for spec in layout.arrays) + 16
        chunk_rows = self.options.chunk_rows or keyed_chunk_rows(row_nbytes)
        fingerprint, call = self._contexts[context]
        meta = {
            "kind": "module_cache",
            "module": fingerprint.to_json(),
            "dataset": {
                "digest": _hashing.hash_strings(call),
                "description": f"content-addressed rows of calls ({call})",
                "call": call,
            },
            "options": self._options_json(),
            "outputs": layout.to_json(),
            "library_version": __version__,
        }
        entry = KeyedEntry.open(
            store,
            self._entry_name(context),
            meta,
            layout.arrays,
            chunk_rows=chunk_rows,
            compressor=self.options.compressor,
        )
        self._layouts[context] = OutputLayout.from_json(entry.entry.meta["outputs"])
        self._entries[context] = entry
        self._budget_for(store, entry)
        return entry

    def _budget_for(self, store: FeatureStore, entry: KeyedEntry) -> None:
        if self.options.max_bytes is not None and entry.name not in self._budgets:
            self._budgets[entry.name] = KeyedBudget(store, entry, self.options.max_bytes)

    def _open_store(self) -> FeatureStore:
        if self.store is None:
            self.store = FeatureStore.open(self.options.store, mode="a")
        return self.store

    # -- scoping: fingerprints and contexts -----------------------------------------------------

    def _fingerprint(self, module: Callable[..., Any]) -> Fingerprint:
        """The module's fingerprint, taken again whenever its state may have changed.

        A cheap token of the state (:mod:`cachedfeatures.compute.state_token`: the module tree, every
        submodule's ``__dict__``, tensors by pointer and version counter) is compared on every
        call; a new token means a new fingerprint and an empty memory tier.

        DataParallel builds fresh replicas (fresh weight tensors) on every forward; they share
        this cache, and their weights are copies of the original module's. So a replica is
        checked for being frozen, but fingerprinted through the original: the weights are
        hashed once, not once per replica per step, and a new checkpoint loaded into the
        original is still seen.
        """
        _check_frozen(module)
        subject = self._subject(module)
        owned = self._owner is not None and self._owner() is module
        if isinstance(module, nn.Module) and subject is module and not owned:
            self._owner = weakref.ref(module)
        with self._lock:
            scope = self._scopes.get(id(subject))
            # While a forward of this cache runs (DataParallel threads), the state it changes
            # itself is not a new state; it is taken again when the last one returns.
            token = scope.token if scope is not None and self._running else state_token(subject)
            if scope is None or scope.token != token:
                fresh = _Scope(token, module_fingerprint(subject, self.options.version))
                self._scopes[id(subject)] = fresh
                if scope is not None and self.memory is not None:
                    # The state changed between calls: rows made before may be stale, even
                    # where the fingerprint cannot tell (the persistent tier relies on it).
                    self.memory.clear()
                scope = fresh
            if scope.fingerprint.digest != self._memory_digest:
                if self._memory_digest is not None and self.memory is not None:
                    self.memory.clear()  # new state: the old rows are stale
                self._memory_digest = scope.fingerprint.digest
            return scope.fingerprint

    def _subject(self, module: Callable[..., Any]) -> Callable[..., Any]:
        """What to fingerprint: the module, or for a DataParallel replica its original."""
        if getattr(module, "_is_replica", False):
            return (self._owner() if self._owner is not None else None) or module
        return module

    def _context(self, fingerprint: Fingerprint, inputs: CallInputs) -> str:
        """A short id for (module fingerprint, options, call signature): one persistent entry."""
        context = _hashing.hash_strings(fingerprint.digest, self._options_json(), inputs.context)[:16]
        if context not in self._contexts:
            self._contexts[context] = (fingerprint, inputs.context)
        return context

    def _options_json(self) -> str:
        dtype = self.options.cache_dtype
        return options_json({"cache_dtype": None if dtype is None else str(dtype), "key": KEY_ALGORITHM})

    def _entry_name(self, context: str) -> str:
        return f"{self.name}-{context}"


def _parse_budget(value: object, name: str) -> int | None:
    """A byte budget as a dataset takes it (``10e9``, ``"10GB"``, ``"512MiB"``), or ``None``."""
    return None if value is None else parse_bytes(value, name)


def _output_tensors(layout: OutputLayout, output: Any, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The module's outputs per array, detached and cast to the storage dtype, where they are."""
    if isinstance(output, torch.Tensor):
        values = [output]
    elif isinstance(output, Mapping):
        values = list(output.values())
    else:
        values = list(output)
    return {spec.name: cast_for_storage(v, dtype) for spec, v in zip(layout.arrays, values, strict=True)}


_KEYABLE_DEFAULTS = frozenset({bool, int, float, str, type(None)})


def _tensors_of(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, Mapping) else output
    if isinstance(output, (Mapping, tuple, list)):
        return [v for v in values if isinstance(v, torch.Tensor)]
    return []


def _select_rows(output: Any, rows: torch.Tensor) -> Any:
    """``output`` (a tensor, or a tuple/list/dict of them) cut down to ``rows``."""
    if isinstance(output, torch.Tensor):
        return output.index_select(0, rows.to(output.device))
    if isinstance(output, Mapping):
        return {key: _select_rows(value, rows) for key, value in output.items()}
    if isinstance(output, (tuple, list)):
        return tuple(_select_rows(value, rows) for value in output)
    return output


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, up to the rounding of a batch of one against a bigger batch for floats."""
    if a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        loose = a.dtype in (torch.float16, torch.bfloat16)
        rtol, atol = (1e-2, 1e-3) if loose else (1e-4, 1e-6)
        return bool(torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))
    return bool(torch.equal(a, b))


def _check_store_options(options: CacheOptions, name: str) -> None:
    """Options that only a persistent store uses are an error without one, not ignored."""
    if options.store is not None:
        return
    given = [
        option
        for option, unused in (
            ("compressor", options.compressor not in ("default", None)),
            ("max_bytes", options.max_bytes is not None),
            ("chunk_rows", options.chunk_rows is not None),
        )
        if unused
    ]
    if given:
        raise OptionWithoutStoreError(
            f"the cache of {name} has no persistent store, but {', '.join(given)} only applies to "
            "a persistent store. Pass store=... (a path or a zarr Store) or persistent=True, or drop "
            f"{', '.join(option + '=' for option in given)}"
            + (" (the memory tier's budget is max_memory_bytes=)." if "max_bytes" in given else ".")
        )


def _check_frozen(module: Callable[..., Any]) -> None:
    """Raise unless ``module`` is frozen: no parameter requires grad, and no submodule whose
    output depends on the mode (dropout, batch norm, code reading ``self.training``) in training mode."""
    if not isinstance(module, nn.Module):
        return
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    if trainable:
        raise RequiresGradError(
            f"{type(module).__name__} has parameters that require grad ({', '.join(trainable[:4])}"
            f"{', ...' if len(trainable) > 4 else ''}); cached outputs carry no gradient, so they "
            "would silently stop training these. Freeze the cached module with "
            "module.requires_grad_(False), and keep the trainable layers outside it."
        )
    active = mode_dependent_submodules(module)
    if active:
        raise TrainingModeError(
            training_mode_message(
                module, active, "Call .eval() on the cached module (again after model.train())."
            )
        )
