"""``EntryBinding``: a dataset's hold on its store and entry, from opening to every read and write.

:func:`open_store` opens the store (falling back to read-only, or to a scratch store in memory,
where it cannot be written); :class:`EntryBinding` finds or creates the entry in it, reopens it
after a fork, reads hits through the store's integrity check, stores owned rows under the size
budget and records chunk access. A binding always has its entry: an empty dataset has none.

Misses computed on the map-style path (``cached[i]``, a plain DataLoader, in this process or a
worker) are held per process in a write-back buffer and stored per chunk
(:class:`~cachedfeatures.store.writer.ChunkBuffer`): a shuffled batch touches every chunk, and
writing each batch at once would rewrite every compressed, checksummed chunk once per batch.
Held rows are served from the buffer when asked for again and become valid only when written,
so a killed process loses its buffer (a recompute), never leaves a wrong row. The buffer is
written when a chunk's missing rows are all in, past ``WRITE_BACK_BYTES``, after the hold time,
on :meth:`EntryBinding.flush_writes`, and when the process exits (a threading exit hook in
the main process, a multiprocessing finalizer in DataLoader workers, where ``atexit`` does not
run). A worker also writes it at SIGTERM (persistent workers end so at program exit), after
``IDLE_FLUSH_SECONDS`` without a miss, from a thread (the buffer's lock keeps that thread and
the worker's own batches apart), and when asked again for a row it holds (a new epoch).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from torch.utils.data import get_worker_info

from cachedfeatures.compute.layout import OutputLayout, SampleLayout
from cachedfeatures.format.specs import ArraySpec
from cachedfeatures.options import DatasetOptions
from cachedfeatures.pruning import Budget
from cachedfeatures.reader.chunk_reader import ChunkReader, RowsRead
from cachedfeatures.store.access import AccessLog
from cachedfeatures.store.exit_hooks import at_exit, exit_on_terminate
from cachedfeatures.store.faults import WriteGuard, is_store_fault
from cachedfeatures.store.feature_store import Entry, FeatureStore, StoreLike
from cachedfeatures.store.integrity import CheckedReader
from cachedfeatures.store.ownership import ChunkOwnership, ranks_ownership
from cachedfeatures.store.remote import is_url
from cachedfeatures.store.writer import DEFAULT_MAX_HOLD_SECONDS, ChunkBuffer, default_write_back_bytes

__all__ = ["EntryBinding", "NewEntry", "OpenedStore", "open_store"]

logger = logging.getLogger(__name__)

# Bytes of computed rows each process holds for coalescing before the fullest chunk is
# written early; ``0`` writes every batch at once. Per process: each DataLoader worker has one.
# ``None``: a sixteenth of physical memory, split between workers (``default_write_back_bytes``).
WRITE_BACK_BYTES: int | None = None


@dataclass
class OpenedStore:
    """A store as opened for a dataset.

    Args:
        store: the feature store.
        guard: the write guard of every write to it.
        read_only: this process does not write to it (asked for, or it refused writes).
        scratch: ``store`` is an in-memory stand-in for one that could not be opened at all.
    """

    store: FeatureStore
    guard: WriteGuard
    read_only: bool
    scratch: bool


def open_store(store: StoreLike, options: DatasetOptions, write_guard: WriteGuard | None) -> OpenedStore:
    """Open ``store``; one that cannot be created (full disk, permissions) becomes a scratch one.

    A store that exists but refuses writes is opened read-only, so its hits are still served.
    Without ``write_guard``, a new one named after the store's location.
    """
    guard = write_guard or WriteGuard(str(store), read_only=options.read_only)
    if options.read_only and not guard.read_only:
        guard.set_read_only("the store was opened read-only")
    mode: Literal["r", "a"] = "r" if options.read_only else "a"
    try:
        opened = OpenedStore(
            FeatureStore.open(store, mode=mode, storage_options=options.storage_options),
            guard,
            options.read_only,
            scratch=False,
        )
    except Exception as error:
        if options.read_only or not is_store_fault(error):
            raise
        reason = f"the store could not be opened for writing ({type(error).__name__}: {error})"
        guard.set_read_only(f"{reason}, so caching is off for this run", error)
        try:
            opened = OpenedStore(
                FeatureStore.open(store, mode="r", storage_options=options.storage_options),
                guard,
                read_only=True,
                scratch=False,
            )
        except Exception:
            opened = OpenedStore(FeatureStore.open(None, mode="a"), guard, read_only=True, scratch=True)
    if write_guard is None:
        guard.location = opened.store.location
    return opened


@dataclass(frozen=True)
class NewEntry:
    """What creating an entry takes, made from one probe sample (the module run on it once).

    Args:
        meta: the entry's attrs (fingerprints, options, sample and output layouts).
        specs: its arrays.
        num_rows / chunk_rows: its shape along rows.
        row / columns: the probe's row and its stored columns, written once the entry exists.
    """

    meta: Mapping[str, Any]
    specs: Sequence[ArraySpec]
    num_rows: int
    chunk_rows: int
    row: int
    columns: Mapping[str, np.ndarray]


class EntryBinding:
    """A dataset's entry in its store: found or created, read, written, reopened after a fork.

    Args:
        opened: the store, from :func:`open_store`.
        store: the ``store=`` argument, to reopen a URL store after a fork.
        options: the dataset's options (storage, budget, chunk cache, ownership).
        name: the entry's name.
        new_entry: makes what creating the entry takes; called only if it does not exist.

    Where the store cannot take the entry (read-only, full disk), the entry is a scratch one in
    memory that is never written: every row is computed on demand, and the guard warns once.
    """

    def __init__(
        self,
        opened: OpenedStore,
        store: StoreLike,
        options: DatasetOptions,
        name: str,
        new_entry: Callable[[], NewEntry],
    ) -> None:
        self.store = opened.store
        self.guard = opened.guard
        self.read_only = opened.read_only
        self.scratch = opened.scratch
        self.name = name
        self._store_arg = store
        self._options = options
        # The chunks this process stores: the option's, or set for a while by prefill() across
        # ranks (each rank stores its own chunks, even with distributed=False's whole range).
        self.owned_chunks: ChunkOwnership | None = options.owned_chunks
        self._pid = os.getpid()
        self._access: AccessLog | None = None  # none while creating, nor on a store not written
        self._held: ChunkBuffer | None = None  # this process's write-back buffer, made lazily
        self._held_pid = 0
        self._held_lock: threading.Lock | None = None  # made with it: threads may share a process
        self._active = 0.0  # time.monotonic() of the last batch that held rows or checked them
        self._in_worker = False  # the buffer is a DataLoader worker's
        self._repeat_flushed = 0.0  # time.monotonic() of the last flush for a row asked for again
        self._budget: Budget | None = None
        entry = self.store.entry(name) or self._create(new_entry())
        entry.check_metadata()  # a damaged array: a clear error naming the repair, now
        chunk_rows = options.chunk_rows
        if chunk_rows is not None and entry.chunk_rows != chunk_rows and not self.scratch:
            _say_chunking_once(self.store.location, entry, chunk_rows)
        self._bind(entry, enforce=True)
        meta, specs = entry.meta, {spec.name: spec for spec in entry.specs}
        self.output_layout = OutputLayout.from_json(meta["outputs"])
        self.sample_layout = SampleLayout.from_json(meta["sample"], specs, options.input_key)

    # -- the entry ----------------------------------------------------------------------------

    @property
    def entry(self) -> Entry:
        """The entry, reopened after a fork for URL stores (fsspec file systems are not fork-safe)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            if is_url(self._store_arg) and not self.scratch:
                self.store = FeatureStore.open(
                    self._store_arg,
                    mode="r" if self.read_only else "a",
                    storage_options=self._options.storage_options,
                )
                self._bind(self.store.entry(self.name) or self._entry, enforce=False)
        return self._entry

    @property
    def hits(self) -> CheckedReader:
        """The entry's reads, less hits whose feature bytes are gone; records nothing."""
        _ = self.entry  # reopened after a fork
        return self._checked

    def _bind(self, entry: Entry, enforce: bool) -> None:
        """Read ``entry`` from now on: its chunk reader and integrity check, access log and budget."""
        self._entry = entry
        entry.reader = ChunkReader(
            entry, cache_bytes=self._options.chunk_cache_bytes, route=self._options.read_route
        )
        self._checked = CheckedReader(entry)
        self._access = None
        self._budget = None
        if self.scratch or self.guard.read_only:  # nothing to record on a store not written
            return
        self._access = AccessLog(entry)
        if self._options.max_bytes is not None:
            self._budget = Budget(
                self.store, entry, self._options.max_bytes, self._options.policy, self._access
            )
            if enforce:  # a store left over budget by an earlier session
                self.guard.run(self._budget.enforce)

    def _create(self, new: NewEntry) -> Entry:
        """Create the entry and store the probe's row; a scratch entry where the store cannot."""
        if not self.read_only:
            try:
                entry = self._create_in(self.store, new)
                self._store(entry, np.array([new.row]), new.columns)  # the probe is already paid for
                return entry
            except Exception as error:
                if not is_store_fault(error):
                    raise
                self.guard.set_read_only(
                    f"the store could not create entry {self.name} ({type(error).__name__}: "
                    f"{error}), so caching is off for this run",
                    error,
                )
        elif not self.scratch:
            self.guard.set_read_only(f"the store was opened read-only and has no entry {self.name}")
        self.scratch = True
        return self._create_in(FeatureStore.open(None, mode="a"), new)

    def _create_in(self, store: FeatureStore, new: NewEntry) -> Entry:
        return store.create_entry(
            self.name,
            new.meta,
            new.specs,
            num_rows=new.num_rows,
            chunk_rows=new.chunk_rows,
            compressor=self._options.compressor,
            checksum=self._options.checksum,
        )

    # -- reads and writes -----------------------------------------------------------------------

    def read(self, rows: np.ndarray) -> RowsRead:
        """The rows at ``rows`` that the store serves (see :class:`CheckedReader`); records the
        chunks hit."""
        read = self.hits.read(rows)
        if self._access is not None:
            self._record(read.hit_chunks(rows, self._entry.chunk_rows))
        return read

    def write(self, rows: np.ndarray, columns: Mapping[str, np.ndarray]) -> bool:
        """Store ``rows`` (see :meth:`_store`); whether all of them were stored."""
        return self._store(self.entry, rows, columns)

    def write_back(self, rows: np.ndarray, columns: Mapping[str, np.ndarray]) -> None:
        """Store ``rows`` soon, coalesced per chunk in this process's buffer (see the module).

        Where nothing can be stored (read-only, scratch) or ``WRITE_BACK_BYTES`` is 0, at once.
        """
        held = self._buffer_here()
        if held is None:
            self.write(rows, columns)
            return
        assert self._held_lock is not None
        with self._held_lock:
            self._active = time.monotonic()
            held.add(np.asarray(rows, dtype=np.int64), dict(columns))
            _with_held.add(self)

    def held(self, rows: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Which of ``rows`` this process holds unwritten, and their columns (see ``ChunkBuffer.held``)."""
        held, lock = (self._held, self._held_lock) if self._held_pid == os.getpid() else (None, None)
        if held is None or lock is None:
            return np.zeros(len(rows), dtype=bool), {}
        with lock:
            found, columns = held.held(rows)
            if found.any() and self._in_worker and self._may_flush_on_repeat():
                # A held row asked for again: a new epoch (persistent workers), whose other
                # workers would compute again every row this one holds. Store them all now.
                held.write_all()
                _with_held.discard(self)
            return found, columns

    def _may_flush_on_repeat(self) -> bool:
        """At most one flush for rows asked for again per ``IDLE_FLUSH_SECONDS`` (a sampler that
        draws with replacement repeats rows within an epoch)."""
        now = time.monotonic()
        if now - self._repeat_flushed < IDLE_FLUSH_SECONDS:
            return False
        self._repeat_flushed = now
        return True

    def write_aged(self) -> None:
        """Store the held rows that have waited their hold time (cheap when nothing is due).

        Called for every batch: it also tells the idle flush that this process is busy.
        """
        held, lock = self._held, self._held_lock
        if held is not None and lock is not None and self._held_pid == os.getpid():
            with lock:
                self._active = time.monotonic()
                held.write_aged()

    def flush_writes(self) -> None:
        """Store every row this process holds in its write-back buffer now."""
        held, lock = self._held, self._held_lock
        if held is not None and lock is not None and self._held_pid == os.getpid():
            with lock:
                held.write_all()
                _with_held.discard(self)  # nothing held: nothing to store at exit

    def idle_seconds(self) -> float:
        """Seconds since this process last held a row or served a batch through this binding."""
        return time.monotonic() - self._active

    @property
    def held_bytes(self) -> int:
        """Bytes of computed rows this process holds, not yet stored."""
        held = self._held
        return held.held_bytes if held is not None and self._held_pid == os.getpid() else 0

    def _buffer_here(self) -> ChunkBuffer | None:
        """This process's write-back buffer: made at its first use in each process (fork-safe)."""
        if self.scratch or self.guard.read_only or (WRITE_BACK_BYTES is not None and WRITE_BACK_BYTES <= 0):
            return None
        pid = os.getpid()
        if self._held is None or self._held_pid != pid:
            entry = self.entry  # reopened after a fork
            self._held_lock = threading.Lock()
            self._held = ChunkBuffer(
                entry,
                self.write,
                max_buffer_bytes=default_write_back_bytes() if WRITE_BACK_BYTES is None else WRITE_BACK_BYTES,
                max_hold_seconds=DEFAULT_MAX_HOLD_SECONDS,
            )
            self._held_pid = pid
            self._active = time.monotonic()
            _flush_at_exit(self)
            self._in_worker = get_worker_info() is not None
            if self._in_worker:
                _flush_in_worker()
        return self._held

    def __getstate__(self) -> dict[str, Any]:
        """Pickled into a spawned worker without this process's held rows (they stay here)."""
        state = self.__dict__.copy()
        state["_held"], state["_held_pid"], state["_held_lock"] = None, 0, None
        return state

    def record_hits(self, rows: np.ndarray) -> None:
        """Count reads of ``rows`` served from the store elsewhere (the pipeline's workers)."""
        if len(rows):
            self._record(rows // self._entry.chunk_rows)

    def flush_access(self) -> None:
        """Write this process's pending chunk access statistics to the store now."""
        if self._access is not None:
            # Through the guard: a store that turned out read-only gives its one warning.
            self.guard.run(self._access.flush)

    def _store(self, entry: Entry, rows: np.ndarray, columns: Mapping[str, np.ndarray]) -> bool:
        """Store ``rows`` through the write guard, only those in chunks this process owns.

        Under a budget, chunk by chunk, so pruning follows every chunk. On a store without
        cross-process locks (object storage), DataLoader workers split this process's chunks
        between them, so that no two workers ever write one chunk. Whether all rows were stored.
        """
        ownership = self.owned_chunks
        if ownership is None and self._needs_chunk_ownership():
            ownership = ranks_ownership()  # one rank of several (DDP): only its own chunks
        worker = get_worker_info()
        if worker is not None and self._needs_chunk_ownership():
            ownership = (ownership or ChunkOwnership(0, 1)).split(worker.id, worker.num_workers)
        if ownership is not None:
            mine = ownership.owned_rows(rows, entry.chunk_rows)
            if not mine.all():
                rows, columns = rows[mine], {name: column[mine] for name, column in columns.items()}
        if len(rows) == 0:
            return True
        chunks = rows // entry.chunk_rows
        if self._budget is None:
            stored = self.guard.write(entry, rows, columns)
            if stored:
                self._record(chunks)
            return stored
        stored = True
        for chunk in np.unique(chunks):
            pick = chunks == chunk
            if not self.guard.write(entry, rows[pick], {name: c[pick] for name, c in columns.items()}):
                stored = False
                continue
            self._record([chunk])
            self.guard.run(self._budget.after_write)
        return stored

    def _record(self, chunks: Sequence[int] | np.ndarray) -> None:
        """Count chunk accesses for pruning; statistics are advisory, so a store fault is not fatal."""
        if self._access is None:
            return
        try:
            self._access.record(chunks)
        except Exception as error:
            if not is_store_fault(error):
                raise
            logger.debug("cachedfeatures: could not record access statistics: %s", error)

    def _needs_chunk_ownership(self) -> bool:
        """Whether processes writing this store must own disjoint chunks (no file locks)."""
        store = self.store
        return store.backend.needs_chunk_ownership


# -- writing held rows at process exit --------------------------------------------------------
# One hook per process stores every binding's held rows (cachedfeatures.store.exit_hooks says
# where it runs), before the access log's hook, so that their access is recorded too.

# A strong set: a binding that holds rows must be flushed even when its dataset is gone (it sits
# in a reference cycle with its buffer, which a weak set would let the collector drop first).
_with_held: set[EntryBinding] = set()


def _flush_at_exit(binding: EntryBinding) -> None:
    at_exit(_flush_all_held, priority=110)


def _flush_all_held() -> None:
    for binding in list(_with_held):
        try:
            binding.flush_writes()
        except Exception as error:  # an exit is no place to fail: the rows are recomputed later
            logger.warning("cachedfeatures: could not store computed rows at exit: %s", error)


# -- DataLoader workers -----------------------------------------------------------------------
# A worker is ended by SIGTERM where the program exits with persistent workers (multiprocessing
# terminates daemonic children) or where it outstays _shutdown_workers' join: there the exit
# hooks run first (exit_on_terminate). And a worker idle this long (the end of an epoch, a slow
# consumer) stores what it holds from a thread, so that its rows are stored, and seen by the
# other workers and processes, long before the program exits.
IDLE_FLUSH_SECONDS = 1.0

_idle_flusher_pid = 0


def _flush_in_worker() -> None:
    """In a DataLoader worker: the exit hooks at SIGTERM, and the idle flush (once per process)."""
    global _idle_flusher_pid
    exit_on_terminate()
    if _idle_flusher_pid == os.getpid():
        return
    _idle_flusher_pid = os.getpid()
    threading.Thread(target=_flush_when_idle, name="cachedfeatures-idle-flush", daemon=True).start()


def _flush_when_idle() -> None:
    """Store the rows of every binding that has been idle ``IDLE_FLUSH_SECONDS`` (a thread)."""
    while True:
        time.sleep(max(0.05, IDLE_FLUSH_SECONDS / 4))
        for binding in list(_with_held):
            if binding.idle_seconds() < IDLE_FLUSH_SECONDS:
                continue
            try:
                binding.flush_writes()
            except Exception as error:  # that chunk's rows stay missing: recomputed later
                logger.warning("cachedfeatures: could not store computed rows: %s", error)


_CHUNKING_SAID: set[tuple[str, str, int]] = set()


def _say_chunking_once(location: str, entry: Entry, chunk_rows: int) -> None:
    """Log (once per store, entry and value) that ``chunk_rows`` does not apply to ``entry``."""
    key = (location, entry.name, chunk_rows)
    if key in _CHUNKING_SAID:
        return
    _CHUNKING_SAID.add(key)
    logger.warning(
        "cachedfeatures: chunk_rows=%d is ignored: entry %s of %s already exists with chunks of "
        "%d rows, which stay (the chunking is fixed when an entry is created). To rechunk, "
        "'cachedfeatures rm' the entry and fill it again.",
        chunk_rows,
        entry.name,
        location,
        entry.chunk_rows,
    )
