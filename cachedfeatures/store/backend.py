"""What a feature store's zarr backend can do, asked once when the store is opened.

Callers ask the :class:`Backend` what the store can do (as zarr's ``Store`` ABC states
``supports_writes``, ``supports_listing``), never ``isinstance`` of a concrete store class, so
that a ``zarr.storage.WrapperStore`` behaves like the store it wraps.

The rule for wrappers (``WrapperStore`` layers are unwrapped through their ``_store``):

- **Where the bytes live is seen through every wrapper.** A wrapper around a ``LocalStore``
  is local: file locks keyed by the directory (so it shares locks with a plain ``LocalStore``
  on the same path), ``*.partial`` cleanup, and the directory as the store's location.
- **A file operation that stands in for a Store method is used only where no layer overrides
  that method.** Direct ``pread`` chunk reads and ``stat`` signatures of ``valid`` stand in for
  ``get`` (and ``get_partial_values``, ``_get_many``); ``stat`` existence checks for ``exists``;
  the directory walk for ``list``, ``list_prefix``, ``list_dir``, ``getsize`` and
  ``getsize_prefix``. A wrapper that changes one of them (fault injection, logging, caching,
  decryption) is then asked through zarr, so what it does is never bypassed; a wrapper that
  leaves them alone (one that only fails writes) gets the same route as the plain store. A
  subclass of ``LocalStore`` is held to the same rule.
- **Chunk writes of plain arrays** (:mod:`cachedfeatures.store.chunk_files`: a new file renamed
  into place, as ``LocalStore.set`` writes it) stand in for ``set``, only where no layer
  overrides ``set`` (or its relatives) and the store is writable. **Everything else that
  writes, and every delete, goes through zarr**, and so through every wrapper.

Wrappers must keep the wrapped store's keys (zarr's ``WrapperStore`` contract); a wrapper that
renames keys must override the read methods above, and is then read through zarr.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore, MemoryStore, WrapperStore

from cachedfeatures.store.locks import FileLocks, Locks, ThreadLocks

__all__ = ["Backend", "BackendKind"]

BackendKind = Literal["local", "memory", "fsspec", "other"]

# The Store methods that a file operation of this library stands in for on a local backend.
_READS = ("get", "get_partial_values", "_get_many")
_EXISTS = ("exists",)
_LISTING = ("list", "list_prefix", "list_dir", "getsize", "getsize_prefix")
_WRITES = ("set", "set_if_not_exists", "_set_many", "set_partial_values")
_WATCHED = (*_READS, *_EXISTS, *_LISTING, *_WRITES)


@dataclass(frozen=True)
class Backend:
    """The capabilities of one opened store, seen through any ``WrapperStore`` layers.

    Args:
        kind: the innermost store: ``"local"`` (a ``LocalStore``), ``"memory"`` (a
            ``MemoryStore``, private to this process), ``"fsspec"`` (object storage through a
            URL) or ``"other"``.
        location: readable text naming the store in messages: the directory, the URL, or
            ``"<memory>"``.
        root: the directory of a local store, else ``None``.
        wrappers: the class names of the wrapper layers, outermost first.
        intercepted: the watched Store methods some layer overrides (see the module docstring).
    """

    kind: BackendKind
    location: str
    root: Path | None = None
    wrappers: tuple[str, ...] = ()
    intercepted: frozenset[str] = frozenset()

    @classmethod
    def of(cls, store: Store, location: str | None = None) -> Backend:
        """The backend of ``store``, unwrapping ``WrapperStore`` layers; ``location`` overrides the text."""
        wrappers: list[str] = []
        intercepted: set[str] = set()
        inner = store
        while isinstance(inner, WrapperStore):
            wrappers.append(type(inner).__name__)
            intercepted |= _overridden(type(inner), WrapperStore)
            inner = inner._store
        kind: BackendKind
        root = None
        if isinstance(inner, LocalStore):
            kind, root = "local", Path(inner.root)
            intercepted |= _overridden(type(inner), LocalStore)
        elif isinstance(inner, MemoryStore):
            kind = "memory"
        elif isinstance(inner, FsspecStore):
            kind = "fsspec"
        else:
            kind = "other"
        if location is None:
            location = str(root) if root is not None else repr(store)
        return cls(kind, location, root, tuple(wrappers), frozenset(intercepted))

    @property
    def is_local(self) -> bool:
        """Whether the chunks are files in a directory of a local file system (``root``)."""
        return self.root is not None

    @property
    def is_memory(self) -> bool:
        """Whether the store lives in this process's memory (a DataLoader worker has its own copy)."""
        return self.kind == "memory"

    @property
    def supports_file_locks(self) -> bool:
        """Whether processes on this machine serialise chunk writes with OS file locks."""
        return self.is_local

    @property
    def needs_chunk_ownership(self) -> bool:
        """Whether writers in several processes must own disjoint chunks (shared, but no file locks)."""
        return not self.supports_file_locks and not self.is_memory

    @property
    def direct_reads(self) -> bool:
        """Whether chunk files may be read with ``pread`` and signed with ``stat`` instead of ``get``."""
        return self.is_local and self.intercepted.isdisjoint(_READS)

    @property
    def direct_writes(self) -> bool:
        """Whether whole chunk files may be written in place of ``set`` (a new file renamed in)."""
        return self.is_local and self.intercepted.isdisjoint(_WRITES)

    @property
    def direct_exists(self) -> bool:
        """Whether a chunk's presence may be asked of the file system instead of ``exists``."""
        return self.is_local and self.intercepted.isdisjoint(_EXISTS)

    @property
    def direct_listing(self) -> bool:
        """Whether key sizes may come from a directory walk instead of ``list_prefix``/``getsize``."""
        return self.is_local and self.intercepted.isdisjoint(_LISTING)

    def new_locks(self) -> Locks:
        """The chunk and entry locks for this store: file locks where the store is local."""
        return FileLocks(self.root) if self.root is not None else ThreadLocks()


def _overridden(cls: type[Store], base: type[Store]) -> set[str]:
    """The watched methods that ``cls`` defines differently from ``base``."""
    return {name for name in _WATCHED if getattr(cls, name, None) is not getattr(base, name, None)}
