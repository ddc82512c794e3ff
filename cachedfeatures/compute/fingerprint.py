"""Fingerprints of the module, the dataset and the options: never serve stale features.

An entry in the store is keyed by all three.

- The module's fingerprint covers its class, the code of every user-defined class in it (and the
  helpers that code reaches), every weight and buffer, and every other value reachable from each
  submodule (:mod:`cachedfeatures.compute.state_hash`): a fine-tuned checkpoint, a plain tensor attribute or
  a ``self.temperature`` changed give a new entry. A callable that is not a module (a bound method,
  a ``functools.partial``, a function) is hashed with what it reads: ``self``, arguments, closure
  cells, defaults and globals.
- The dataset's covers its class, its length, its own state (arrays, file lists with each file's
  size and modification time, small values; attributes that change by merely loading samples,
  such as counters and caches, are left out) and probe samples spread over the index range. The
  probes are reloaded under fixed seeds of torch's, NumPy's and Python's generators, so random
  augmentation is caught with near certainty.

Comments, docstrings and formatting are not part of any fingerprint: a fingerprint changes only
when something that affects values changes. What no fingerprint can see (a file edited in place,
an object that neither has a ``__dict__`` nor pickles) is named in a :class:`FingerprintWarning`,
and the run-time spot checks are the safety net for it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cachedfeatures.compute import hashing as _hashing
from cachedfeatures.compute.state_hash import StateHasher, excluded_attributes, module_name, unwrap_compiled
from cachedfeatures.compute.views import Generator, seeded_generators
from cachedfeatures.errors import FingerprintWarning, NonDeterministicDatasetError
from cachedfeatures.format.names import ENTRY_KEY_VERSION, FORMAT_VERSION_KEY

NUM_PROBES = 8
# Augmentation check: this many probes are each reloaded under this many fixed seeds. A transform
# that flips with p = 0.5 agrees across the 4 loads of a probe with p = 1/8, so it escapes all four
# probes with p = 1/8**4 < 0.0003.
NUM_RELOADED_PROBES = 4
RELOAD_SEEDS = (1234, 56789, 987654321)
_STATE_DEPTH = 3  # attribute levels of the dataset tracked one by one (for volatile attributes)
_WARN_LIST = 4


@dataclass(frozen=True)
class Fingerprint:
    """A digest plus the words and details that explain it (stored in the entry's attrs)."""

    digest: str
    description: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "description": self.description, **self.details}


def qualified_name(obj: object) -> str:
    """``module.Class`` of ``obj`` (or of the class ``obj``); the running script by its module name."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{module_name(cls.__module__)}.{cls.__qualname__}"


def module_fingerprint(module: Callable[..., Any], version: str | None = None) -> Fingerprint:
    """Fingerprint ``module``: an ``nn.Module``, a bound method, a ``partial`` or any callable.

    With ``version``, the user vouches for the weights and code: only the class and the
    version string are hashed, which skips hashing a very large model at start-up.
    """
    if isinstance(module, torch.nn.Module):
        module = unwrap_compiled(module)
    name = _callable_name(module)
    if version is not None:
        kind = "module" if isinstance(module, torch.nn.Module) else "fn"
        digest = _hashing.hash_strings(kind, name, version)
        return Fingerprint(digest, f"{name} (version {version!r})", {"class": name, "version": version})
    if not isinstance(module, torch.nn.Module):
        state = StateHasher()
        state.update_callable(module, name)
        code = state.hexdigest()
        _warn_unhashed(state.unhashed, f"the module {name}", "module_version")
        return Fingerprint(
            _hashing.hash_strings("fn", name, code),
            f"{_callable_kind(module)} {name}, state {code[:12]}",
            {"class": name, "code": code, "unhashed": state.unhashed[:20]},
        )

    weights_hasher = StateHasher()
    num_params = weights_hasher.update_weights(module)
    weights = weights_hasher.hexdigest()
    state = StateHasher()
    state.update_module(module)  # classes and their code, hooks, every non-weight attribute
    config = state.hexdigest()
    classes = sorted({type(m) for m in module.modules()}, key=qualified_name)
    code = _hashing.hash_strings(  # the class code the walk above hashed, not parsed again
        *(f"{qualified_name(c)}:{state.code_digests[id(c)]}" for c in classes if id(c) in state.code_digests)
    )
    _warn_unhashed([*weights_hasher.unhashed, *state.unhashed], f"the module {name}", "module_version")
    digest = _hashing.hash_strings("module", name, config, weights)
    description = (
        f"{name}, {_count(num_params)} weights and buffers, weights {weights[:12]}, "
        f"state {config[:12]}, code {code[:12]}"
    )
    details = {
        "class": name,
        "config": config,
        "code": code,
        "weights": weights,
        "num_weights": num_params,
        "repr": repr(module)[:2000],
        "unhashed": state.unhashed[:20],
    }
    return Fingerprint(digest, description, details)


def callable_digest(value: Any) -> str:
    """A digest of a callable option (``collate_fn``, a callable ``input_key``) and all it reads."""
    state = StateHasher()
    state.update_callable(value, _callable_name(value))
    _warn_unhashed(state.unhashed, f"{_callable_name(value)}", "module_version")
    return state.hexdigest()


def probe_indices(length: int, num_probes: int = NUM_PROBES) -> list[int]:
    """Spread probes over the dataset: first, evenly spaced middles, last."""
    if length == 0 or num_probes == 0:
        return []
    if num_probes == 1:
        return [0]
    step = (length - 1) / (num_probes - 1)
    return sorted({round(i * step) for i in range(num_probes)})


@dataclass(frozen=True)
class DatasetProbe:
    """A dataset's fingerprint and the probe samples it loaded (reused to create the entry)."""

    fingerprint: Fingerprint
    samples: dict[int, Any]
    loads: int  # raw samples loaded to take it


def dataset_fingerprint(
    dataset: Any,
    load: Callable[[int], Any],
    extract_input: Callable[[Any], Any],
    *,
    version: str | None = None,
    allow_nondeterministic: bool = False,
    seeded: Sequence[Generator] = (),
) -> DatasetProbe:
    """Fingerprint ``dataset`` from its class, length, own state and probe samples.

    ``seeded``: generators of the dataset that every load reseeds (``view_generators``); their
    state is hashed as seeded with 0, since the state they are in now changes nothing.

    ``load(i)`` loads sample ``i``. Each of the first :data:`NUM_RELOADED_PROBES` probes is
    loaded again under each of :data:`RELOAD_SEEDS` (torch's, NumPy's and Python's global
    generators seeded, then restored); if an input differs between loads, the dataset draws
    random augmentations, and caching would freeze one draw: that raises
    :class:`NonDeterministicDatasetError` unless ``allow_nondeterministic`` is set, in which
    case only the non-input fields of the probes are hashed.
    """
    cls_name = qualified_name(dataset)
    length = len(dataset)
    if version is not None:
        digest = _hashing.hash_strings("dataset", cls_name, str(length), version)
        fingerprint = Fingerprint(
            digest,
            f"{cls_name} of {length} samples (version {version!r})",
            {"class": cls_name, "length": length, "version": version},
        )
        return DatasetProbe(fingerprint, {}, 0)

    with seeded_generators(0, seeded):
        before, unhashed_before = _state_digests(dataset)
    indices = probe_indices(length)
    with _preserved_generators():  # probing leaves the caller's random streams as they were
        probes = {i: load(i) for i in indices}
        loads = len(probes)
        differs: int | None = None
        for index in indices[:: max(1, len(indices) // NUM_RELOADED_PROBES)][:NUM_RELOADED_PROBES]:
            first = _hashing.hash_value(extract_input(probes[index]))
            for seed in RELOAD_SEEDS:
                with _seeded_generators(seed + index):
                    again = load(index)
                loads += 1
                if _hashing.hash_value(extract_input(again)) != first:
                    differs = index
                    break
            if differs is not None:
                break
    deterministic = differs is None
    if not deterministic and not allow_nondeterministic:
        raise NonDeterministicDatasetError(
            f"sample {differs} of {cls_name} loaded twice gave two different inputs: the "
            "dataset applies random augmentation (or reads changing data). Caching would "
            "freeze one random draw and serve it every epoch. Pass views=K to cache K reproducible "
            "draws of every sample and serve one per epoch, or cache the dataset without its "
            "random transforms and apply them after the cache, or pass "
            "allow_nondeterministic=True to cache one draw on purpose.",
            sample=differs,
        )

    with seeded_generators(0, seeded):
        after, unhashed_after = _state_digests(dataset)
    volatile = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    state_hasher = _hashing.new_hasher()
    for path in sorted(before.keys() - set(volatile)):
        state_hasher.update(f"{path}={before[path]};".encode())
    state = state_hasher.hexdigest()
    unhashed = [u for u in unhashed_before if not any(u.startswith(f"{v}") for v in volatile)]
    _warn_unhashed(unhashed, f"the dataset {cls_name}", "dataset_version")
    del unhashed_after

    hasher = _hashing.new_hasher()
    for index, sample in probes.items():
        hasher.update(str(index).encode())
        if deterministic:
            _hashing.update_value(hasher, sample)
        else:  # only the fields that do not change from load to load
            _hashing.update_value(hasher, _without_input(sample, extract_input))
    samples = hasher.hexdigest()
    digest = _hashing.hash_strings("dataset", cls_name, str(length), state, samples)
    description = f"{cls_name} of {length} samples, state {state[:12]}, probes {indices} hash {samples[:12]}"
    if not deterministic:
        description += " (non-deterministic inputs, not hashed)"
    details = {
        "class": cls_name,
        "length": length,
        "state": state,
        "state_attributes": sorted(before.keys() - set(volatile))[:50],
        "volatile_attributes": volatile[:50],
        "unhashed": unhashed[:20],
        "probes": indices,
        "samples": samples,
        "deterministic": deterministic,
    }
    return DatasetProbe(Fingerprint(digest, description, details), probes, loads)


def source_state(source: Any) -> tuple[str, str, list[str]]:
    """Digests of a stream source's own state (a few attribute levels deep): its identity, the
    state of the files it names, and what was not hashed.

    The identity covers the source's attributes with file names but not their sizes or mtimes,
    so it stays the same when the files are gone. The files digest covers only the attributes
    that name existing files, with their sizes and mtimes: a cheap "did a shard change" that a
    counter the source keeps (records read, shards opened) does not move.
    """
    plain, unhashed = _state_digests(source, stat_files=False)
    stat, _ = _state_digests(source, stat_files=True)
    files = sorted((path, digest) for path, digest in stat.items() if plain.get(path) != digest)
    identity = _hashing.hash_strings(*(f"{path}={digest}" for path, digest in sorted(plain.items())))
    return identity, _hashing.hash_strings(*(f"{path}={digest}" for path, digest in files)), unhashed


def _state_digests(dataset: Any, *, stat_files: bool = True) -> tuple[dict[str, str], list[str]]:
    """A digest per attribute path of ``dataset`` (a few levels deep), and what was not hashed."""
    digests: dict[str, str] = {}
    unhashed: list[str] = []

    def visit(obj: Any, path: str, depth: int) -> None:
        attributes = _plain_attributes(obj) if depth < _STATE_DEPTH else None
        if attributes is None:
            hasher = StateHasher(stat_files=stat_files)
            hasher.update(obj, path)
            digests[path] = hasher.hexdigest()
            unhashed.extend(hasher.unhashed)
            return
        digests[f"{path}.__class__"] = _hashing.hash_strings(qualified_name(obj))
        for name, value in attributes:
            visit(value, f"{path}.{name}" if path else name, depth + 1)

    visit(dataset, "", 0)
    return digests, unhashed


# Hashed whole by the state hasher, never split into attributes.
_LEAVES = (
    torch.Tensor,
    np.ndarray,
    np.generic,
    torch.nn.Module,
    type,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    types.ModuleType,
    functools.partial,
    Mapping,
    list,
    tuple,
    set,
    frozenset,
    str,
    bytes,
    int,
    float,
    os.PathLike,
)


def _plain_attributes(obj: Any) -> list[tuple[str, Any]] | None:
    """The attributes of a plain object (a dataset, a wrapped dataset, a config), else ``None``."""
    if isinstance(obj, _LEAVES) or type(obj).__module__ == "builtins":
        return None
    if type(obj).__module__.startswith("datasets."):
        return None  # Hugging Face datasets: hashed through their own fingerprint
    try:
        state = vars(obj)
    except TypeError:
        return None
    excluded = excluded_attributes(obj)
    return sorted((name, value) for name, value in state.items() if name not in excluded)


@contextlib.contextmanager
def _preserved_generators() -> Iterator[None]:
    """Restore torch's, NumPy's and Python's global random states on exit."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # type: ignore[no-untyped-call]
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextlib.contextmanager
def _seeded_generators(seed: int) -> Iterator[None]:
    """Seed torch's, NumPy's and Python's global generators with ``seed``; restore on exit.

    Under the lock that seeded view loads take, so that another thread's seeded load cannot
    interleave with a probe's reload (and make a deterministic dataset look random).
    """
    with _preserved_generators(), seeded_generators(seed):
        yield


def _warn_unhashed(unhashed: Sequence[str], subject: str, option: str) -> None:
    if not unhashed:
        return
    listed = ", ".join(unhashed[:_WARN_LIST])
    if len(unhashed) > _WARN_LIST:
        listed += f" and {len(unhashed) - _WARN_LIST} more"
    warnings.warn(
        f"cachedfeatures cannot see into {listed} of {subject}, so a change there does not give "
        f"a new cache entry. Pass {option}='...' and change it whenever that state changes, or "
        "make the object picklable; the run-time spot checks still compare a few cached rows "
        "with fresh ones every epoch.",
        FingerprintWarning,
        stacklevel=4,
    )


def _callable_name(value: Any) -> str:
    if isinstance(value, torch.nn.Module):
        return qualified_name(value)
    func = getattr(value, "func", None) or getattr(value, "__func__", None)
    if func is not None and not hasattr(value, "__qualname__"):
        return f"partial({_callable_name(func)})"
    name = getattr(value, "__qualname__", None)
    module = getattr(value, "__module__", None)
    if isinstance(name, str):
        return f"{module_name(module)}.{name}" if isinstance(module, str) else name
    return qualified_name(value)


def _callable_kind(value: Any) -> str:
    if hasattr(value, "__self__") and hasattr(value, "__func__"):
        return "bound method"
    if hasattr(value, "func") and hasattr(value, "keywords"):
        return "partial"
    return "function" if hasattr(value, "__code__") else "callable"


def _without_input(sample: Any, extract_input: Callable[[Any], Any]) -> Any:
    target = extract_input(sample)
    if sample is target:
        return None
    if isinstance(sample, Mapping):
        return {k: v for k, v in sample.items() if v is not target}
    if isinstance(sample, (tuple, list)):
        return [v for v in sample if v is not target]
    return None


def options_json(options: Mapping[str, Any]) -> str:
    return json.dumps({FORMAT_VERSION_KEY: ENTRY_KEY_VERSION, **options}, sort_keys=True, default=str)


def entry_id(module: Fingerprint, dataset: Fingerprint, options: Mapping[str, Any]) -> str:
    """The entry key: one entry per (module, dataset, options) triple."""
    return _hashing.hash_strings(module.digest, dataset.digest, options_json(options))[:16]


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
