"""Content hashes of everything that can change what a module, a callable or a dataset computes.

:class:`StateHasher` walks an object graph and feeds what it finds to one XXH3-128 hash:

- values: tensors and arrays (every byte), Python scalars, strings, enums, dataclasses and
  other objects (through their ``__dict__`` / ``__slots__``), tuples, lists, sets and dicts;
- ``nn.Module`` trees: each submodule's class, parameters, buffers, and every other attribute
  (a plain tensor ``self.proj``, a float ``self.temperature``), skipping torch's bookkeeping;
- code: functions by their syntax tree (comments, docstrings and formatting do not count), each
  lambda by its own node, closure cells, defaults, the module-level globals the code reads, and
  the classes and functions of *user code* they reach (anything not installed in the Python
  environment: a helper in another file of your project, a custom base class's ``forward``);
  ``functools.partial`` arguments; bound methods' ``self``.

What it cannot see into (an object that neither has a ``__dict__`` nor pickles) is recorded in
:attr:`StateHasher.unhashed`, so callers can name it in a warning. Paths to existing files can
be recorded with their size and modification time (``stat_files=True``), for datasets whose
state is a file list. XXH3 streams at over 10 GB/s, so a 100M-parameter model hashes in well
under a second; it is not a cryptographic hash (a cache is not a security boundary).
"""

from __future__ import annotations

import ast
import contextlib
import dis
import enum
import functools
import inspect
import io
import logging
import os
import pathlib
import pickle
import random
import site
import sys
import sysconfig
import textwrap
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from stat import S_ISREG
from typing import Any

import numpy as np
import torch
import xxhash
from torch import nn

__all__ = [
    "StateHasher",
    "all_names",
    "code_digest",
    "excluded_attributes",
    "is_user_code",
    "module_state_digests",
    "module_tree_items",
    "unwrap_compiled",
]

# nn.Module attributes that are torch's bookkeeping, not state that changes outputs. Parameters,
# buffers and submodules are walked separately; hooks that change outputs are kept (below).
_MODULE_INTERNALS = frozenset(
    {
        "training",
        "_parameters",
        "_buffers",
        "_modules",
        "_non_persistent_buffers_set",
        "_backward_pre_hooks",
        "_backward_hooks",
        "_is_full_backward_hook",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks_with_kwargs",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
        "_compiled_call_impl",
        "_cachedfeatures_module_cache",
        "call_super_init",
        "dump_patches",
    }
)
_HOOKS = ("_forward_pre_hooks", "_forward_hooks")
_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_MAX_OBJECTS = 2_000_000  # past this many objects, stop and report the rest as not hashed
_MAX_DEPTH = 200  # past this nesting, report instead of recursing (a long linked list)
_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()), threading.Condition, threading.Event)
_MAX_STATS = 4096  # files stat'ed per hasher; longer file lists are sampled evenly
_OWN_PACKAGE = __name__.split(".")[0]


def _library_dirs() -> tuple[str, ...]:
    """Directories whose code is installed software (stdlib, site-packages), not user code."""
    dirs = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs.update(site.getsitepackages())
    dirs.add(site.getusersitepackages())
    dirs.update(p for p in sys.path if p.rstrip(os.sep).endswith(("site-packages", "dist-packages")))
    return tuple(sorted(os.path.realpath(d) + os.sep for d in dirs if d))


_LIBRARY_DIRS = _library_dirs()


@functools.lru_cache(maxsize=4096)
def _is_user_module(name: str) -> bool:
    if name == "__main__":
        return True
    if name.split(".")[0] == _OWN_PACKAGE:
        return False
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if not file:
        return False  # built-in or namespace module
    return not os.path.realpath(file).startswith(_LIBRARY_DIRS)


_OWN_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__))) + os.sep  # the package root


def is_user_code(obj: Any) -> bool:
    """Whether ``obj`` (a function or class) is defined in code you may edit, not installed code.

    User code is ``__main__`` and every module whose file lies outside the standard library and
    site-packages (a script, the files beside it, an editable install of your project). Classes
    this library makes (``cached_module``'s subclass, which takes its base's name) are not.
    """
    name = getattr(obj, "__module__", None)
    if not (isinstance(name, str) and _is_user_module(name)):
        return False
    members = vars(obj).values() if isinstance(obj, type) else (obj,)
    for member in members:
        code = getattr(getattr(member, "__func__", member), "__code__", None)
        if code is not None and os.path.realpath(code.co_filename).startswith(_OWN_DIR):
            return False
    return True


@functools.cache
def _main_module_name() -> str:
    """The name ``import`` would give the running script, or ``"__main__"`` when none can be told.

    ``python -m pkg.tool`` says it in ``__main__.__spec__``; ``python tool.py`` is named after its
    file, with the packages (directories holding an ``__init__.py``) above it: ``pkg/tool.py``
    is ``pkg.tool``. A REPL, ``python -c`` and notebooks have no file: they stay ``__main__``.
    """
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if isinstance(spec_name, str) and spec_name:
        return spec_name
    file = getattr(main, "__file__", None)
    if not isinstance(file, str) or not file.endswith(".py"):
        return "__main__"
    path = pathlib.Path(os.path.realpath(file))
    parts = [path.stem]
    directory = path.parent
    while (directory / "__init__.py").is_file() and directory.parent != directory:
        parts.insert(0, directory.name)
        directory = directory.parent
    return ".".join(parts) if all(part.isidentifier() for part in parts) else "__main__"


def module_name(name: str) -> str:
    """The name code from module ``name`` goes by in fingerprints.

    A class or function defined in the running script is named as the script's module
    (``script.Model``, not ``__main__.Model``), so running ``python script.py`` and later
    ``import script`` give the same fingerprint and reuse the cache. Two different classes that
    share a name this way are still told apart: user code is fingerprinted by its code too.
    """
    # A spawned worker (multiprocessing, DataLoader workers) runs the script as ``__mp_main__``.
    return _main_module_name() if name in ("__main__", "__mp_main__") else name


def qualified_name(obj: Any) -> str:
    module = getattr(obj, "__module__", "?")
    qualname = getattr(obj, "__qualname__", type(obj).__qualname__)
    return f"{module_name(module) if isinstance(module, str) else module}.{qualname}"


class StateHasher:
    """Feeds objects, recursively, to one XXH3-128 hash (see the module docstring).

    Args:
        stat_files: for strings and paths that name existing files, also hash their size and
            modification time (so a file list sees files that changed on disk).
    """

    def __init__(self, *, stat_files: bool = False) -> None:
        self._hash = xxhash.xxh3_128()
        self.stat_files = stat_files
        self.unhashed: list[str] = []  # "path (type)" of objects not seen into
        self.num_objects = 0
        self.num_stats = 0
        self._seen: dict[int, int] = {}
        self._alive: list[Any] = []  # keeps visited objects alive, so their ids stay unique
        self._code: dict[int, str] = {}
        self._depth = 0

    @property
    def code_digests(self) -> Mapping[int, str]:
        """The code digest of each user-code class and function hashed so far, by ``id``."""
        return self._code

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def feed(self, *parts: str | bytes) -> None:
        for part in parts:
            data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part
            self._hash.update(len(data).to_bytes(8, "little"))
            self._hash.update(data)

    # -- values ---------------------------------------------------------------------------------

    def update(self, obj: Any, path: str = "") -> None:
        """Feed ``obj`` and everything reachable from it; ``path`` names it in reports."""
        self.num_objects += 1
        if self.num_objects > _MAX_OBJECTS:
            if self.num_objects == _MAX_OBJECTS + 1:
                self.unhashed.append(f"{path} (more than {_MAX_OBJECTS:,} objects)")
            return
        if self._depth >= _MAX_DEPTH:
            self.unhashed.append(f"{path or 'object'} (nested more than {_MAX_DEPTH} levels deep)")
            return
        self._depth += 1
        try:
            self._update(obj, path)
        finally:
            self._depth -= 1

    def _update(self, obj: Any, path: str) -> None:
        kind = type(obj)
        if kind in _SCALARS:
            self._update_scalar(obj)
            return
        if isinstance(obj, torch.Tensor):
            self._update_tensor(obj, path)
            return
        if isinstance(obj, np.ndarray):
            self._update_array(obj)
            return
        if isinstance(obj, (np.generic, torch.dtype, torch.device, enum.Enum)):
            self.feed("V", qualified_name(kind), repr(obj))
            return
        if isinstance(obj, os.PathLike):  # the same as its string: Path("a") and "a" agree
            self._update_scalar(os.fspath(obj))
            return
        if isinstance(obj, nn.Module):
            obj = unwrap_compiled(obj)
        if self._update_special(obj, path):
            return
        seen = self._seen.get(id(obj))
        if seen is not None:  # shared or cyclic reference: its place, not its contents again
            self.feed("ref", str(seen))
            return
        self._seen[id(obj)] = len(self._seen)
        self._alive.append(obj)
        if isinstance(obj, (str, int, float, bytes)):  # subclasses of scalars (IntEnum handled above)
            self.feed("S", qualified_name(kind))
            self._update_scalar(kind.__mro__[-2](obj))
        elif isinstance(obj, nn.Module):  # reached from a method, a global, a list: all of it
            self.update_module(obj, path)
            self.update_weights(obj)
        elif isinstance(obj, (list, tuple)):
            self._update_sequence(obj, path)
        elif isinstance(obj, (set, frozenset)):
            digests = sorted(self._digest_of(item, f"{path}{{}}") for item in obj)
            self.feed("set", qualified_name(kind), *digests)
        elif isinstance(obj, Mapping):
            self.feed("map", qualified_name(kind), str(len(obj)))
            items = list(obj.items())
            if kind is dict:  # equal dicts hash alike, whatever order they were built in
                items.sort(key=lambda item: self._digest_of(item[0], path))
            for key, value in items:
                self.update(key, f"{path}[key]")
                self.update(value, f"{path}[{key!r}]")
        elif isinstance(obj, type):
            self.update_class(obj)
        elif callable(obj) and isinstance(
            obj,
            (
                types.FunctionType,
                types.MethodType,
                types.BuiltinFunctionType,
                functools.partial,
                staticmethod,
                classmethod,
            ),
        ):
            self.update_callable(obj, path)
        elif isinstance(obj, types.ModuleType):
            self.feed("module", obj.__name__)
        else:
            self._update_object(obj, path)

    def _update_special(self, obj: Any, path: str) -> bool:
        """Objects whose state is outside their ``__dict__`` or does not change values."""
        if isinstance(obj, (logging.Logger, logging.Handler, logging.Filter)):
            self.feed("logger", type(obj).__qualname__, str(getattr(obj, "name", "")))
        elif isinstance(obj, _LOCK_TYPES):
            self.feed("lock", type(obj).__qualname__)
        elif isinstance(obj, io.IOBase):  # an open file: by its name (and size and time, if asked)
            name = getattr(obj, "name", None)
            self.feed("file", type(obj).__qualname__, repr(name))
            if isinstance(name, str):
                self._stat(name)
        elif isinstance(obj, torch.Generator):
            self.feed("generator", str(obj.device))
            self._update_tensor(obj.get_state(), path)
        elif isinstance(obj, random.Random):
            self.feed("random", qualified_name(type(obj)))
            self.update(obj.getstate(), path)
        else:
            return False
        return True

    def _update_scalar(self, obj: Any) -> None:
        if isinstance(obj, float):
            self.feed("f", obj.hex())
        elif isinstance(obj, str):
            self.feed("s", obj)
            self._stat(obj)
        elif isinstance(obj, bytes):
            self.feed("b", obj)
        else:
            self.feed(type(obj).__name__, repr(obj))

    def _update_tensor(self, tensor: torch.Tensor, path: str) -> None:
        try:
            self.feed("T", str(tensor.dtype), repr(tuple(tensor.shape)))
            self._hash.update(tensor_bytes(tensor))
        except (RuntimeError, NotImplementedError, TypeError, ValueError):  # lazy, meta, sparse, ...
            self.feed("T?", type(tensor).__qualname__)
            self.unhashed.append(f"{path} ({type(tensor).__name__})")

    def _update_array(self, array: np.ndarray) -> None:
        self.feed("A", array.dtype.str, repr(array.shape))
        if array.dtype.hasobject:
            self._update_sequence(array.tolist(), "array")
        else:
            self._hash.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)

    def _update_sequence(self, items: list[Any] | tuple[Any, ...], path: str) -> None:
        self.feed("seq", qualified_name(type(items)), str(len(items)))
        if len(items) > 64 and all(_plain(item) or _plain_tuple(item) for item in items):
            # A long list of plain values (a file list, labels): one pickle instead of a Python
            # walk per item; files are stat'ed for an evenly spread sample.
            self.feed(pickle.dumps(items, protocol=5))
            if self.stat_files:
                stride = max(1, len(items) // max(1, _MAX_STATS - self.num_stats))
                for item in items[::stride]:
                    for value in item if isinstance(item, tuple) else (item,):
                        if isinstance(value, (str, pathlib.PurePath)):
                            self._stat(os.fspath(value))
            return
        for position, item in enumerate(items):
            self.update(item, f"{path}[{position}]")

    def _stat(self, value: str) -> None:
        if not self.stat_files or self.num_stats >= _MAX_STATS or not 0 < len(value) < 4096:
            return
        if os.sep not in value and "." not in value:
            return  # not path-like: skip the system call
        try:
            stat = os.stat(value)
        except (OSError, ValueError):
            return
        if not S_ISREG(stat.st_mode):  # a directory's time changes with every file made in it
            return
        self.num_stats += 1
        self.feed("stat", str(stat.st_size), str(stat.st_mtime_ns))

    def _update_object(self, obj: Any, path: str) -> None:
        kind = type(obj)
        self.update_class(kind)
        hf_fingerprint = _safe_getattr(obj, "_fingerprint")
        if kind.__module__.startswith("datasets.") and isinstance(hf_fingerprint, str):
            # A Hugging Face datasets.Dataset: its own fingerprint tracks every transform, where
            # pickling its Arrow table could cost gigabytes. Its format changes the samples; it is
            # walked like any value, so a ``with_transform`` function counts by its code (its repr
            # holds an address that changes from process to process).
            self.feed("hf", hf_fingerprint)
            self.update(getattr(obj, "format", None), f"{path}.format")
            return
        to_bytes = _safe_getattr(obj, "tobytes")
        if callable(to_bytes):  # PIL images and similar buffers: their pixels live outside __dict__
            with contextlib.suppress(Exception):  # else the attributes alone
                self.feed("B", to_bytes())
        state = _object_state(obj)
        if state is not None:
            for name, value in state:
                self.update(value, f"{path}.{name}")
            return
        try:
            self.feed("P", pickle.dumps(obj, protocol=5))
        except Exception:  # anything unpicklable is reported, not raised
            self.unhashed.append(f"{path or 'object'} ({qualified_name(kind)})")

    def _digest_of(self, obj: Any, path: str) -> str:
        sub = StateHasher(stat_files=self.stat_files)
        sub._code = self._code
        sub.update(obj, path)
        self.unhashed += sub.unhashed
        return sub.hexdigest()

    # -- modules --------------------------------------------------------------------------------

    def update_module(self, module: nn.Module, path: str = "") -> None:
        """Feed a module tree: classes, hooks and every other attribute (not the weights)."""
        module = unwrap_compiled(module)
        for name, sub in module.named_modules(remove_duplicate=False):
            where = f"{path}.{name}" if name else (path or type(module).__name__)
            self.feed("mod", name)
            self.update_class(type(sub))
            for key, value in module_tree_items(sub):
                self.update(value, f"{where}.{key}")
            for hooks in _HOOKS:
                for hook in getattr(sub, hooks, {}).values():
                    self.feed(hooks)
                    self.update_callable(hook, f"{where}.{hooks}")

    def update_weights(self, module: nn.Module) -> int:
        """Feed every parameter and buffer by name; returns how many values they hold."""
        count = 0
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            self.feed("w", name)
            self._update_tensor(tensor, name)
            with contextlib.suppress(ValueError, RuntimeError):  # an uninitialised lazy parameter
                count += tensor.numel()
        return count

    # -- code -----------------------------------------------------------------------------------

    def update_class(self, cls: type) -> None:
        """A class by name; user-code classes (and their user-code bases) also by their code."""
        self.feed("cls", qualified_name(cls))
        for klass in cls.__mro__:
            if klass is object or not is_user_code(klass) or id(klass) in self._code:
                continue
            self._code[id(klass)] = code_digest(klass)
            self.feed("code", qualified_name(klass), self._code[id(klass)])
            for name, member in sorted(vars(klass).items()):
                function = getattr(member, "__func__", member)
                if isinstance(function, types.FunctionType):
                    self._update_code_context(function, f"{klass.__qualname__}.{name}")
                elif isinstance(member, property) and isinstance(member.fget, types.FunctionType):
                    self._update_code_context(member.fget, f"{klass.__qualname__}.{name}")

    def update_callable(self, fn: Any, path: str = "") -> None:
        """A function, lambda, partial, bound method or built-in, with what its code reads."""
        if isinstance(fn, functools.partial):
            self.feed("partial")
            self.update(fn.func, f"{path}.func")
            self.update(fn.args, f"{path}.args")
            self.update(fn.keywords, f"{path}.keywords")
        elif isinstance(fn, types.MethodType):
            self.feed("method")
            self.update(fn.__func__, f"{path}.__func__")
            self.update(fn.__self__, f"{path}.__self__")
        elif isinstance(fn, (staticmethod, classmethod)):
            self.update(fn.__func__, path)
        elif isinstance(fn, types.FunctionType):
            self.feed("fn", qualified_name(fn))
            if id(fn.__code__) not in self._code:
                self._code[id(fn.__code__)] = code_digest(fn)
            self.feed(self._code[id(fn.__code__)])
            self._update_code_context(fn, path or fn.__qualname__)
        elif isinstance(fn, types.BuiltinFunctionType):
            owner = fn.__self__
            self.feed("builtin", qualified_name(fn))
            if owner is not None and not isinstance(owner, (types.ModuleType, type)):
                self.update(owner, f"{path}.__self__")  # a bound method of a C object
        elif isinstance(fn, type):
            self.update_class(fn)
        else:
            self.update(fn, path)

    def _update_code_context(self, fn: types.FunctionType, path: str) -> None:
        """What a function's code depends on besides its text: cells, defaults, globals read."""
        if fn.__closure__:
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__, strict=True):
                try:
                    value = cell.cell_contents
                except ValueError:  # an empty cell (a name bound later)
                    continue
                if value is not fn:
                    self.update(value, f"{path}.<{name}>")
        if fn.__defaults__:
            self.update(fn.__defaults__, f"{path}.__defaults__")
        if fn.__kwdefaults__:
            self.update(fn.__kwdefaults__, f"{path}.__kwdefaults__")
        namespace = fn.__globals__
        attributes = sorted(all_names(fn.__code__))
        for name in sorted(_global_names(fn.__code__)):
            if name not in namespace:
                continue
            value = namespace[name]
            if isinstance(value, types.ModuleType):
                if _is_user_module(value.__name__):  # `helpers.transform(x)`: what it names there
                    for attribute in attributes:
                        member = vars(value).get(attribute)
                        if member is not None and not isinstance(member, types.ModuleType):
                            self.feed("global", f"{name}.{attribute}")
                            self.update(member, f"{value.__name__}.{attribute}")
                continue
            if (isinstance(value, (types.FunctionType, type))) and not is_user_code(value):
                self.feed("global", name, qualified_name(value))  # installed code: by name
                continue
            self.feed("global", name)
            self.update(value, f"{fn.__module__}.{name}")


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """What ``torch.compile`` wraps: the compiled wrapper's own attributes are per process."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else module


def module_tree_items(module: nn.Module) -> Iterator[tuple[str, Any]]:
    """A submodule's own attributes that can change its outputs (not parameters, buffers,
    submodules, torch's bookkeeping or names in ``__cachedfeatures_exclude__``), in a stable order."""
    excluded = excluded_attributes(module)
    for key, value in sorted(vars(module).items()):
        if key not in _MODULE_INTERNALS and key not in _HOOKS and key not in excluded:
            if key.startswith("cachedfeatures_"):
                continue  # cached_module's options set on the instance (its store, ...)
            yield key, value


def excluded_attributes(obj: Any) -> frozenset[str]:
    """Attribute names ``obj``'s class asks to leave out of fingerprints.

    A class lists in ``__cachedfeatures_exclude__`` the attributes that change as it runs
    without changing what it computes: call counters, logs, lazily built caches.
    """
    names = getattr(type(obj), "__cachedfeatures_exclude__", ())
    return frozenset((names,) if isinstance(names, str) else names)


def module_state_digests(module: nn.Module) -> dict[str, str]:
    """A digest per submodule attribute (not weights): to tell which ones a forward changed."""
    digests = {}
    for name, sub in module.named_modules():
        for key, value in module_tree_items(sub):
            hasher = StateHasher()
            hasher.update(value, key)
            digests[f"{name}.{key}" if name else key] = hasher.hexdigest()
    return digests


def _safe_getattr(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name, None)
    except Exception:  # a __getattr__ that raises something else than AttributeError
        return None


def _object_state(obj: Any) -> list[tuple[str, Any]] | None:
    """An object's attributes from ``__dict__`` and ``__slots__``, or ``None`` if it has none."""
    state: dict[str, Any] = {}
    found = False
    try:
        state.update(vars(obj))
        found = True
    except Exception:  # no __dict__, or an odd __getattribute__
        pass
    for name in excluded_attributes(obj):
        state.pop(name, None)
    for klass in type(obj).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot in ("__dict__", "__weakref__"):
                continue
            found = True
            value = _safe_getattr(obj, slot)
            if value is not None:
                state[slot] = value
    if not found or (not state and _custom_reduce(obj)):
        return None  # no Python-level state: let pickle (a C extension's own) try
    return sorted(state.items())


def _custom_reduce(obj: Any) -> bool:
    """Whether ``obj``'s class pickles itself (a C extension type's own state)."""
    reduce: Any = type(obj).__reduce_ex__
    return reduce is not object.__reduce_ex__


def _plain(value: Any) -> bool:
    return type(value) in _SCALARS or isinstance(value, pathlib.PurePath)


def _plain_tuple(item: Any) -> bool:
    return type(item) is tuple and len(item) <= 8 and all(_plain(value) for value in item)


@functools.lru_cache(maxsize=8192)
def _global_names(code: types.CodeType) -> frozenset[str]:
    """The global names ``code`` (and code nested in it) loads: not attribute names."""
    names = {
        str(instruction.argval)
        for instruction in dis.get_instructions(code)
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME")
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return frozenset(names)


@functools.lru_cache(maxsize=8192)
def all_names(code: types.CodeType) -> frozenset[str]:
    """Every name ``code`` (and code nested in it) uses, attributes included (``helpers.transform``)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= all_names(const)
    return frozenset(names)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of ``tensor`` on the CPU, without a copy where it is already dense there."""
    source = tensor.detach()
    if source.device.type != "cpu":
        source = source.to("cpu")
    if source.numel() == 0:
        return memoryview(b"")
    if not source.is_contiguous() or source.storage_offset() < 0:
        source = source.contiguous()
    flat = source.reshape(-1)
    if flat.stride(0) != 1:  # size-1 dims can keep odd strides; view(uint8) needs stride 1
        flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.view(torch.uint8).numpy().data


# -- code digests -------------------------------------------------------------------------------


def code_digest(obj: Callable[..., Any] | type) -> str:
    """A hash of what ``obj``'s code says, blind to comments, docstrings and formatting.

    Functions and classes are hashed by their syntax tree without docstrings; a lambda by its
    own node (two lambdas in one statement differ); code without source (built by ``exec``) by
    its compiled instructions.
    """
    code = getattr(obj, "__code__", None)
    try:
        lines, start = inspect.getsourcelines(obj)
        source = textwrap.dedent("".join(lines))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return _compiled_digest(obj)
    if code is not None and code.co_name == "<lambda>":
        indent = len(lines[0]) - len(source.splitlines(keepends=True)[0])
        node = _lambda_node(tree, code, start, indent)
        if node is None:
            return _compiled_digest(obj)
        return xxhash.xxh3_128_hexdigest(ast.dump(node).encode())
    _strip_docstrings(tree)
    return xxhash.xxh3_128_hexdigest(ast.dump(tree).encode())


def _lambda_node(tree: ast.AST, code: types.CodeType, start: int, indent: int) -> ast.Lambda | None:
    """The lambda node of ``tree`` (parsed from source lines from ``start`` on, dedented by
    ``indent`` columns) whose body holds ``code``'s instructions."""
    lambdas = [node for node in ast.walk(tree) if isinstance(node, ast.Lambda)]
    if len(lambdas) == 1:
        return lambdas[0]
    positions = [
        (line - start + 1, col - indent)
        for line, end_line, col, end_col in code.co_positions()
        if line is not None and col is not None and (line, col) != (end_line, end_col)
    ]
    if not positions:
        return None
    first = min(positions)
    best: ast.Lambda | None = None
    for node in lambdas:
        body = (node.body.lineno, node.body.col_offset)
        end = (node.end_lineno or 0, node.end_col_offset or 0)
        inner = best is None or (node.lineno, node.col_offset) > (best.lineno, best.col_offset)
        if body <= first <= end and inner:
            best = node
    return best


def _strip_docstrings(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            del body[0]


def _compiled_digest(obj: Any) -> str:
    hasher = xxhash.xxh3_128()
    for part in _compiled_parts(obj):
        hasher.update(part.encode())
        hasher.update(b"\x00")
    return hasher.hexdigest()


def _compiled_parts(obj: Any) -> list[str]:
    """The compiled code of a function, or of every function defined in a class body."""
    code = getattr(obj, "__code__", None)
    if code is not None:
        return _code_parts(code)
    parts = [getattr(obj, "__qualname__", repr(type(obj)))]
    if isinstance(obj, type):
        for name, member in sorted(vars(obj).items()):
            function = getattr(member, "__func__", member)  # staticmethod/classmethod
            if hasattr(function, "__code__"):
                parts += [name, *_code_parts(function.__code__)]
    return parts


def _code_parts(code: Any) -> list[str]:
    parts = [code.co_code.hex(), repr(code.co_names)]
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            parts.extend(_code_parts(const))
        elif isinstance(const, frozenset):  # `x in {...}`: its repr follows the hash seed
            parts.append(repr(sorted(repr(item) for item in const)))
        else:
            parts.append(repr(const))
    return parts
