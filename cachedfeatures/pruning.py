"""Keeping a store under a size budget by dropping whole chunks.

What goes first: chunks of entries other than the one in use, least recently used entry
first; then chunks of the entry in use. Within an entry the policy orders the chunks:

- ``"mru"`` (default) drops the most recently used chunk first. Training reads the data in
  repeated passes, and for cyclic access the chunk used last is the one needed furthest in
  the future, so MRU keeps a stable subset cached pass after pass.
- ``"lru"`` drops the least recently used chunk first: right for access that is not cyclic,
  and useless for repeated sequential passes (each pass evicts what the next one needs).

The policies are the in-memory caches' (:mod:`cachedfeatures.reader.bounded_cache`, where they
are declared). A chunk is dropped by :func:`cachedfeatures.store.chunk_bytes.drop_chunk`, the
store's one protocol for it (``valid`` first, then the bytes, then the checksum record, under
the chunk's lock), so a concurrent reader gets either the right features or a miss, and a crash
in between leaves bytes that nothing serves. The budget counts the store's actual bytes (every
process's writes, earlier sessions included), ignoring the ``*.partial`` temporary files that
Zarr's local store leaves behind when killed mid-write.
"""

from __future__ import annotations

import datetime as _dt
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from zarr.core.sync import sync

from cachedfeatures.errors import BudgetError
from cachedfeatures.format.chunk_keys import parse_chunk_key
from cachedfeatures.format.names import NOT_ROW_CHUNKED, ragged_values_chunk
from cachedfeatures.reader.bounded_cache import POLICIES, Policy, parse_policy
from cachedfeatures.store.access import LAST, AccessLog, last_used, read_access
from cachedfeatures.store.chunk_bytes import (
    PARTIAL_SUFFIX,
    chunk_keys,
    delete_chunk_bytes,
    drop_chunk,
    key_sizes,
    stored_bytes,
)
from cachedfeatures.store.feature_store import Entry, FeatureStore
from cachedfeatures.store.integrity import missing_chunks  # its old home: the import path stays
from cachedfeatures.store.keyed_entry import KeyedEntry
from cachedfeatures.units import format_bytes, parse_bytes

__all__ = [
    "POLICIES",
    "AccessStats",
    "Budget",
    "DroppedChunk",
    "KeyedBudget",
    "Policy",
    "PruneReport",
    "StoreUsage",
    "chunk_keys",
    "delete_chunk_bytes",
    "drop_chunk",
    "measure",
    "missing_chunks",
    "open_entries",
    "parse_policy",
    "plan",
    "prune",
    "remove_orphans",
    "stored_bytes",
]

logger = logging.getLogger(__name__)

STALE_PARTIAL_SECONDS = 3600.0


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class StoreUsage:
    """Bytes of a store as found on disk (or in the store) now.

    ``total`` counts every key except ``*.partial`` temporaries; ``entries[name]`` the part
    under one entry (metadata included); ``chunks[name][chunk]`` the bytes of one row-chunk
    across the entry's arrays (``valid`` included, ``access`` excluded), which is what
    dropping it frees; ``array_chunks[name][array, chunk]`` the bytes of one chunk file (only
    when measured ``per_array``); ``orphans`` are the ``*.partial`` keys.
    """

    total: int = 0
    entries: dict[str, int] = field(default_factory=dict)
    chunks: dict[str, dict[int, int]] = field(default_factory=dict)
    array_chunks: dict[str, dict[tuple[str, int], int]] = field(default_factory=dict)
    orphans: list[str] = field(default_factory=list)
    measured_at: float = field(default_factory=time.monotonic)


def measure(store: FeatureStore, *, per_array: bool = False) -> StoreUsage:
    """What ``store`` occupies now, from one listing of its keys and their sizes.

    ``per_array`` also fills ``array_chunks`` (for the compression ratio of ``describe_store``);
    budgets, which measure after every chunk written, leave it out.
    """
    usage = StoreUsage()
    for key, size in key_sizes(store.root.store, store.root.path, store.backend):
        if key.endswith(PARTIAL_SUFFIX):
            usage.orphans.append(key)
            continue
        usage.total += size
        name, slash, relative = key.partition("/")
        if slash:
            usage.entries[name] = usage.entries.get(name, 0) + size
            # A ragged array's values of one row chunk (<entry>/<name>.values/<chunk>/..., its
            # metadata and its chunk) belong to that row chunk: they go when it is dropped.
            values_chunk = ragged_values_chunk(relative)
            if values_chunk is not None:
                per_entry = usage.chunks.setdefault(name, {})
                per_entry[values_chunk] = per_entry.get(values_chunk, 0) + size
                continue
        found = parse_chunk_key(key)  # <entry>/<array>/c/<row chunk>[/<other dims>...]
        if found is None:
            continue
        entry_name, _, array = found.path.partition("/")
        if array and "/" not in array and array not in NOT_ROW_CHUNKED:
            per_entry = usage.chunks.setdefault(entry_name, {})
            per_entry[found.chunk] = per_entry.get(found.chunk, 0) + size
            if per_array:
                usage.array_chunks.setdefault(entry_name, {})[array, found.chunk] = size
    return usage


def remove_orphans(store: FeatureStore, older_than: float = STALE_PARTIAL_SECONDS) -> list[str]:
    """Delete ``*.partial`` files older than ``older_than`` seconds (a live write's are new)."""
    if store.backend.root is None:  # only zarr's LocalStore leaves *.partial files
        return []
    root = store.backend.root / store.root.path
    removed = []
    for key in measure(store).orphans:
        path = root / key
        try:
            if time.time() - path.stat().st_mtime >= older_than:
                path.unlink()
                removed.append(key)
        except FileNotFoundError:
            continue
    return removed


def open_entries(store: FeatureStore) -> tuple[list[Entry], dict[str, str]]:
    """The store's entries, and the child groups that cannot be opened as one (name -> why).

    Unlike ``FeatureStore.entries``, one damaged entry does not hide the others.
    """
    zarr_store = store.root.store
    prefix = f"{store.root.path}/" if store.root.path else ""

    async def listing() -> list[str]:
        return [name async for name in zarr_store.list_dir(prefix)]

    entries, broken = [], {}
    for name in sorted(sync(listing())):
        if name == "zarr.json" or name.endswith(PARTIAL_SUFFIX):
            continue
        try:
            entry = store.entry(name)
        except Exception as error:
            broken[name] = f"metadata unreadable: {error}"
            continue
        if entry is None:
            broken[name] = "not a complete entry (its creator died?)"
        else:
            entries.append(entry)
    return entries, broken


# -- choosing and dropping ---------------------------------------------------------------------


@dataclass(frozen=True)
class DroppedChunk:
    """One chunk chosen for (or removed by) pruning."""

    entry: str
    chunk: int
    nbytes: int
    last_access: float


@dataclass
class PruneReport:
    """What a prune did (or, with ``dry_run``, would do)."""

    max_bytes: int
    bytes_before: int
    bytes_after: int
    dropped: list[DroppedChunk]
    dry_run: bool = False
    skipped: dict[str, str] = field(default_factory=dict)  # entries it could not read: name -> why

    @property
    def within_budget(self) -> bool:
        return self.bytes_after <= self.max_bytes


def entry_last_used(entry: Entry, stats: np.ndarray) -> float:
    """Latest access of any chunk, or the entry's creation time if never recorded."""
    latest = last_used(entry, stats)
    if latest is not None:
        return latest
    try:
        return _dt.datetime.fromisoformat(entry.created).timestamp()
    except ValueError:
        return 0.0


def plan(
    entries: Iterable[Entry],
    usage: StoreUsage,
    max_bytes: int,
    policy: Policy = "mru",
    in_use: str | None = None,
    stats: Mapping[str, np.ndarray] | None = None,
) -> list[DroppedChunk]:
    """The chunks to drop, in order, to bring ``usage.total`` down to ``max_bytes``.

    ``stats`` overrides the stored access statistics of some entries (the entry in use
    passes its stored statistics merged with what it has not flushed yet).
    """
    if usage.total <= max_bytes:
        return []
    spec = POLICIES[policy]
    ordered: list[tuple[float, Entry, np.ndarray]] = []
    current: tuple[Entry, np.ndarray] | None = None
    for entry in entries:
        entry_stats = (stats or {}).get(entry.name)
        if entry_stats is None:
            try:
                entry_stats = read_access(entry)
            except Exception:  # damaged statistics ('verify' reports them): as if never recorded
                entry_stats = np.zeros((entry.num_chunks, 2), dtype=np.float64)
        if entry.name == in_use:
            current = (entry, entry_stats)
        else:
            ordered.append((entry_last_used(entry, entry_stats), entry, entry_stats))
    ordered.sort(key=lambda item: (item[0], item[1].name))
    queue = [(entry, entry_stats) for _, entry, entry_stats in ordered]
    if current is not None:
        queue.append(current)

    chosen: list[DroppedChunk] = []
    excess = usage.total - max_bytes
    for entry, entry_stats in queue:
        stored = usage.chunks.get(entry.name, {})
        candidates = [chunk for chunk in stored if chunk < len(entry_stats)]
        candidates.sort(
            key=lambda chunk: (float(entry_stats[chunk, LAST]), chunk), reverse=spec.most_recent_first
        )
        for chunk in candidates:
            chosen.append(DroppedChunk(entry.name, chunk, stored[chunk], float(entry_stats[chunk, LAST])))
            excess -= stored[chunk]
            if excess <= 0:
                return chosen
    return chosen


def prune(
    store: FeatureStore,
    max_bytes: int | float | str,
    policy: Policy = "mru",
    *,
    in_use: str | None = None,
    logs: Iterable[AccessLog] = (),
    dry_run: bool = False,
) -> PruneReport:
    """Drop chunks until ``store`` holds at most ``max_bytes``; one pruner at a time per store.

    ``in_use`` names the entry being trained on (dropped last); ``logs`` are access logs
    of this process, flushed first so the choice sees the latest accesses.
    """
    budget = parse_bytes(max_bytes)
    policy = parse_policy(policy)
    with store.locks.lock("prune"):
        for log in logs:
            log.flush()
        usage = measure(store)
        found, skipped = open_entries(store)
        entries = []
        for entry in found:
            try:
                entry.check_metadata()
            except Exception as error:
                skipped[entry.name] = str(error)
                continue
            entries.append(entry)
        chosen = plan(entries, usage, budget, policy, in_use)
        if not dry_run:
            by_name = {entry.name: entry for entry in entries}
            for item in chosen:
                drop_chunk(by_name[item.entry], item.chunk)
    freed = sum(item.nbytes for item in chosen)
    return PruneReport(budget, usage.total, usage.total - freed, chosen, dry_run, skipped)


# -- the budget of a dataset -------------------------------------------------------------------


class AccessStats(Protocol):
    """What a budget needs of the entry in use: its chunks' access statistics, ``(chunks, 2)``
    (an ``AccessLog``, or a ``KeyedEntry``'s in-process ticks)."""

    def stats(self) -> np.ndarray: ...


class Budget:
    """Keeps ``store`` under ``max_bytes`` while ``entry`` is being filled.

    Call :meth:`after_write` after each chunk written: it measures the whole store (every
    process's writes count) and prunes if it is over. So the store exceeds its budget by at
    most the chunks being written at that moment (one per writing process), and MRU drops
    the chunk just written first. Measuring lists the store once per chunk written: small
    next to computing a chunk of features (about 2 MiB by default).
    """

    def __init__(
        self,
        store: FeatureStore,
        entry: Entry,
        max_bytes: int | float | str,
        policy: Policy = "mru",
        log: AccessStats | None = None,
    ) -> None:
        self.store = store
        self.entry = entry
        self.max_bytes = parse_bytes(max_bytes)
        self.policy = parse_policy(policy)
        self.log = log
        chunk_bytes = entry.chunk_rows * sum(spec.row_nbytes for spec in entry.specs)
        if self.max_bytes < chunk_bytes:
            raise BudgetError(
                f"max_bytes={self.max_bytes} ({format_bytes(self.max_bytes)}) is smaller than one "
                f"chunk of this entry ({format_bytes(chunk_bytes)}: {entry.chunk_rows} rows of "
                f"{format_bytes(chunk_bytes // entry.chunk_rows)}), so nothing could stay cached: it "
                f"needs at least {chunk_bytes} bytes, and more for the store's metadata. Raise "
                "max_bytes or pass a smaller chunk_rows."
            )
        self._others: dict[str, Entry] = {}
        self.skipped: dict[str, str] = {}  # entries it cannot read (reported once): name -> why
        self.measured: int | None = None  # the store's bytes at the last enforce(), after pruning
        self.usage: StoreUsage | None = None  # what the last enforce() measured, before pruning

    def enforce(self) -> PruneReport | None:
        """Measure the store and prune it if it is over budget (one pruner at a time)."""
        with self.store.locks.lock("prune"):
            usage = self.usage = measure(self.store)
            self.measured = usage.total
            if usage.total <= self.max_bytes:
                return None
            stats = {self.entry.name: self.log.stats()} if self.log is not None else None
            entries = self._entries(usage)
            chosen = plan(entries, usage, self.max_bytes, self.policy, self.entry.name, stats)
            by_name = {entry.name: entry for entry in entries}
            for item in chosen:
                drop_chunk(by_name[item.entry], item.chunk)
        after = self.measured = usage.total - sum(item.nbytes for item in chosen)
        logger.debug(
            "cachedfeatures: pruned %d chunks (%s) to stay under %s",
            len(chosen),
            format_bytes(usage.total - after),
            format_bytes(self.max_bytes),
        )
        return PruneReport(self.max_bytes, usage.total, after, chosen)

    def after_write(self) -> PruneReport | None:
        """Call after writing a chunk: prunes if the store is now over budget."""
        return self.enforce()

    def _entries(self, usage: StoreUsage) -> list[Entry]:
        """The entry in use and every entry with chunks on disk (opened once, then reused)."""
        found = [self.entry]
        for name in sorted(usage.chunks):
            if name == self.entry.name:
                continue
            if name in self.skipped:
                continue
            known = self._others.get(name)
            if known is not None and max(usage.chunks[name]) >= known.num_chunks:
                del self._others[name]  # grown since opened (a keyed entry): open it afresh
            if name not in self._others:
                try:
                    entry = self.store.entry(name)
                    if entry is not None:
                        entry.check_metadata()
                except Exception as error:  # damaged metadata: its bytes stay, counted, unpruned
                    self.skipped[name] = f"{type(error).__name__}: {error}"
                    logger.warning(
                        "cachedfeatures: the size budget skips entry %s, whose metadata cannot be read "
                        "(%s); its chunks are counted but not pruned. Run 'cachedfeatures verify "
                        "--repair %s' to rebuild or drop it.",
                        name,
                        self.skipped[name],
                        self.store.location,
                    )
                    continue
                if entry is None:  # an incomplete entry or a stray group: not ours to prune
                    continue
                self._others[name] = entry
            found.append(self._others[name])
        return found


# -- keyed entries (cached_module, CachedIterableDataset) ---------------------------------------


class _Appended:
    """Bytes appended by every cached module of this process, to any store: a budget's
    estimate of its store's size counts them all (over-counting other stores' bytes only
    makes it measure sooner), so two modules sharing one store keep it within its budget."""

    def __init__(self) -> None:
        self.total = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> int:
        with self._lock:
            self.total += nbytes
            return self.total


_APPENDED = _Appended()


class KeyedBudget:
    """A keyed entry's store within ``max_bytes`` (``cached_module(max_bytes=)``, and
    ``CachedIterableDataset(max_bytes=)``), as a dataset's is.

    After an append it prunes the store with :class:`~cachedfeatures.pruning.Budget` (other
    entries first, least recently used first, then this entry's chunks, most recently used
    first by their use in this process). Measuring lists the store, so it measures every
    ``MEASURE_EVERY`` appends, or sooner when the bytes this process appended since (by any
    cached module) could cross the budget; other processes' appends show at the next measurement.
    """

    MEASURE_EVERY = 64

    def __init__(self, store: FeatureStore, entry: KeyedEntry, max_bytes: int) -> None:
        self.entry = entry
        self.budget = Budget(store, entry.entry, max_bytes, "mru", entry)
        self.appends = 0
        self.appended_at_measure = 0  # _APPENDED.total when the store was last measured
        # Stored bytes per byte appended, as last seen (chunk files hold checksums, and each new
        # chunk adds a valid mask and a checksum record): starts high, so it measures early.
        self.growth = 2.0

    def after_append(self, nbytes: int) -> None:
        self.appends += 1
        appended = _APPENDED.add(nbytes)
        since = appended - self.appended_at_measure
        budget = self.budget
        before = budget.measured
        if (
            before is not None
            and self.appends % self.MEASURE_EVERY
            and before + self.growth * since <= budget.max_bytes
        ):
            return
        self.appended_at_measure = appended
        budget.entry = self.entry.entry  # the entry as it is now (it grows)
        report = budget.enforce()
        if before is not None and since > 0 and budget.usage is not None:
            self.growth = max(1.0, (budget.usage.total - before) / since)
        if report is None:
            return
        name = self.entry.name
        dropped = {item.chunk for item in report.dropped if item.entry == name}
        for chunk in dropped:
            self.entry.forget(chunk)
        stored = set(budget.usage.chunks.get(name, {})) if budget.usage is not None else set()
        if dropped and stored <= dropped:
            # Nothing is left: every write would be dropped as soon as it is made, and the
            # module re-run on every call. Say so instead of caching nothing in silence.
            largest = max(item.nbytes for item in report.dropped if item.entry == name)
            need = report.bytes_after + largest
            raise BudgetError(
                f"max_bytes={budget.max_bytes} cannot hold a single chunk of entry {name}: the "
                f"store's metadata (and what cannot be pruned) takes {report.bytes_after} bytes and "
                f"one chunk about {largest}, so every row written was dropped at once. Set max_bytes "
                f"to at least {need} (better: room for the rows you want cached), lower chunk_rows, "
                "or pass max_bytes=None."
            )
