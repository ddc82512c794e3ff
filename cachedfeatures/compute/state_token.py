"""A cheap token of a module's state, taken on every cached call to know when to fingerprint again.

Hashing a module (:func:`cachedfeatures.compute.fingerprint.module_fingerprint`) reads every weight:
far too slow for every call. The token reads no tensor data, only what tells whether the
state may have changed since the last call:

- the module tree: each submodule's class, and its children's names and identities (swapping
  a ``ReLU`` for a ``Tanh`` changes it);
- every entry of each submodule's ``__dict__``: scalars, strings and ``None`` by value,
  tensors (parameters, buffers, plain attributes) by identity, storage pointer and version
  counter (``copy_``, ``load_state_dict``, ``.to()`` and reassignment change one of them),
  small NumPy arrays by a hash of their bytes, and small lists, tuples, dicts and plain
  objects (config objects, dataclasses) entry by entry, two levels deep; anything else by
  identity;
- the module-level globals named by the code of the module's own classes (a config object
  read in ``forward``), and for a plain function its code, defaults, closure cells and the
  globals its code names, by the same rules.

What the token cannot see within one process: a large NumPy array or a big container changed
in place, objects nested more than two levels deep changed in place, and globals read by
helper functions. The fingerprint, taken afresh by every new process, covers what it hashes.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import xxhash
from torch import nn

from cachedfeatures.compute.state_hash import all_names

__all__ = ["state_token"]

_VALUE_TYPES = frozenset({int, float, str, bool, bytes, type(None), complex})
_LIBRARIES = frozenset({"torch", "builtins", "cachedfeatures", "abc", "typing"})
_MAX_ITEMS = 64  # containers and objects up to this size are read entry by entry
_MAX_DEPTH = 2
_MAX_ARRAY_BYTES = 1 << 16  # NumPy arrays up to this size are hashed (no version counter)
# nn.Module internals that the fingerprint does not hash (hooks), the cache itself, and the
# mode: a frozen module's outputs do not depend on it (the cache refuses active dropout and
# batch norm), so model.train()/.eval() need not hash the weights again.
_SKIP = frozenset(
    {
        "training",
        "_cachedfeatures_module_cache",
        "_is_full_backward_hook",
        "_backward_pre_hooks",
        "_backward_hooks",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
        "_non_persistent_buffers_set",
    }
)


def state_token(module: Callable[..., Any]) -> list[Any]:
    """A flat list that changes whenever ``module``'s state may have changed (see module doc).

    Compare tokens with ``==``: equal tokens mean the state the fingerprint hashes is the same,
    up to the limits above.
    """
    parts: list[Any] = []
    if isinstance(module, nn.Module):
        _tree_parts(module, parts)
    elif isinstance(module, (types.FunctionType, types.MethodType)):
        _function_parts(module, parts)
    else:
        parts.append(type(module))
        _value_parts(module, parts, 0)
    return parts


def _tree_parts(root: nn.Module, parts: list[Any]) -> None:
    """Every submodule once, depth first (what ``modules()`` yields, without its overhead),
    then the module-level globals named by the code of their own (non-torch) classes."""
    seen = {id(root)}
    stack = [root]
    classes: dict[type, None] = {}
    while stack:
        sub = stack.pop()
        classes[type(sub)] = None
        _module_parts(sub, parts)
        for child in reversed(sub._modules.values()):
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    for cls in classes:
        for namespace, names in _class_globals(cls):
            for name in names:
                if name in namespace:
                    parts.append(name)
                    _value_parts(namespace[name], parts, 1)


_CLASS_GLOBALS: weakref.WeakKeyDictionary[type, list[tuple[dict[str, Any], tuple[str, ...]]]] = (
    weakref.WeakKeyDictionary()
)


def _class_globals(cls: type) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """For the user-defined classes in ``cls``'s MRO: each module namespace their methods
    read, with the names their code uses (found once per class)."""
    found = _CLASS_GLOBALS.get(cls)
    if found is not None:
        return found
    names: dict[int, tuple[dict[str, Any], set[str]]] = {}
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] in _LIBRARIES:
            continue
        for value in vars(klass).values():
            function = getattr(value, "__func__", getattr(value, "fget", value))
            if not isinstance(function, types.FunctionType):
                continue
            if function.__module__ is None or function.__module__.split(".")[0] in _LIBRARIES:
                continue  # the cache's own wrapper class
            namespace = function.__globals__
            names.setdefault(id(namespace), (namespace, set()))[1].update(all_names(function.__code__))
    found = [(namespace, tuple(sorted(used))) for namespace, used in names.values()]
    _CLASS_GLOBALS[cls] = found
    return found


def _module_parts(sub: nn.Module, parts: list[Any]) -> None:
    append = parts.append
    append(type(sub))
    attributes = sub.__dict__
    # A set difference is much faster than testing each name; its order is fixed for a
    # given dict in one process (a different order would only cost one fingerprint).
    for name in attributes.keys() - _SKIP:
        value = attributes[name]
        kind = type(value)
        if kind in _VALUE_TYPES:
            append(name)
            append(kind)
            append(value)
        elif name == "_parameters" or name == "_buffers":
            append(name)
            for key, tensor in value.items():
                append(key)
                append(None if tensor is None else _tensor_part(tensor))
        elif name == "_modules":
            append(name)
            for key, child in value.items():
                append(key)
                append(id(child))
        else:
            append(name)
            _value_parts(value, parts, 0)


def _tensor_part(tensor: torch.Tensor) -> tuple[int, int, int]:
    """Identity, storage pointer and version counter: replacing, ``copy_``, ``.to()`` change it."""
    try:
        version = tensor._version
    except RuntimeError:  # inference tensors have no version counter (nor in-place changes)
        version = -1
    return (id(tensor), tensor.data_ptr(), version)


def _value_parts(value: Any, parts: list[Any], depth: int) -> None:
    kind = type(value)
    if kind in _VALUE_TYPES:
        parts.append(kind)
        parts.append(value)
    elif isinstance(value, torch.Tensor):
        parts.append(_tensor_part(value))
    elif isinstance(value, np.ndarray):
        parts.append(id(value))
        parts.append(value.shape)
        parts.append(value.dtype.str)
        if value.nbytes <= _MAX_ARRAY_BYTES:
            parts.append(xxhash.xxh3_64_intdigest(np.ascontiguousarray(value).tobytes()))
    elif isinstance(value, nn.Module) or depth >= _MAX_DEPTH:
        parts.append(id(value))
    elif isinstance(value, (list, tuple)):
        parts.append(id(value))
        parts.append(len(value))
        if len(value) <= _MAX_ITEMS:
            for item in value:
                _value_parts(item, parts, depth + 1)
    elif isinstance(value, dict):
        parts.append(id(value))
        parts.append(len(value))
        if len(value) <= _MAX_ITEMS:
            for key, item in value.items():
                parts.append(key if type(key) in _VALUE_TYPES else id(key))
                _value_parts(item, parts, depth + 1)
    elif isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, type)):
        parts.append(id(value))
    else:  # a config object, a dataclass, an enum: its attributes
        parts.append(id(value))
        attributes = getattr(value, "__dict__", None)
        if isinstance(attributes, dict) and len(attributes) <= _MAX_ITEMS:
            for key, item in attributes.items():
                parts.append(key)
                _value_parts(item, parts, depth + 1)


def _function_parts(function: Callable[..., Any], parts: list[Any]) -> None:
    if isinstance(function, types.MethodType):
        owner = function.__self__
        if isinstance(owner, nn.Module):
            _tree_parts(owner, parts)
        else:
            _value_parts(owner, parts, 0)
        function = function.__func__
    if not isinstance(function, types.FunctionType):
        parts.append(id(function))
        return
    code = function.__code__
    parts.append(id(code))
    _value_parts(function.__defaults__, parts, 0)
    _value_parts(function.__kwdefaults__, parts, 0)
    for cell in function.__closure__ or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            contents = None
        _value_parts(contents, parts, 0)
    globals_ = function.__globals__
    for name in code.co_names:
        if name in globals_:
            parts.append(name)
            _value_parts(globals_[name], parts, 1)
