"""Keeping a store under a size budget by dropping whole chunks.

What goes first: chunks of entries other than the one in use, least recently used entry
first; then chunks of the entry in use. Within an entry the policy orders the chunks:

- ``"mru"`` (default) drops the most recently used chunk first. Training reads the data in
  repeated passes, and for cyclic access the chunk used last is the one needed furthest in
  the future, so MRU keeps a stable subset cached pass after pass.
- ``"lru"`` drops the least recently used chunk first: right for access that is not cyclic,
  and useless for repeated sequential passes (each pass evicts what the next one needs).

Dropping a chunk clears its rows' ``valid`` bits under the chunk's lock (by deleting the
chunk's key in ``valid``, whose fill value is ``False``) *before* deleting its bytes in every
array, so a concurrent reader gets either the right features or a miss (``Entry.read``
checks ``valid`` again after reading the bytes), and a crash in between leaves bytes that
nothing serves. The budget counts the store's actual bytes (every process's writes, earlier
sessions included), ignoring the ``*.partial`` temporary files that Zarr's local store leaves
behind when killed mid-write.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from zarr.core.sync import sync
from zarr.storage import LocalStore

from cachedfeatures.errors import BudgetError
from cachedfeatures.format.names import ragged_values_chunk
from cachedfeatures.reader.chunk_reader import RowsRead
from cachedfeatures.store.access import LAST, AccessLog, read_access
from cachedfeatures.store.chunk_bytes import (
    PARTIAL_SUFFIX,
    chunk_keys,
    delete_chunk_bytes,
    key_sizes,
    stored_bytes,
)
from cachedfeatures.store.feature_store import ACCESS, Entry, FeatureStore
from cachedfeatures.units import format_bytes, parse_bytes

__all__ = [
    "POLICIES",
    "Budget",
    "DroppedChunk",
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
    "serve_backed_rows",
    "stored_bytes",
]

logger = logging.getLogger(__name__)

Policy = Literal["mru", "lru"]


@dataclass(frozen=True)
class PolicySpec:
    """What a policy needs: whether the most recently used chunk of an entry goes first."""

    most_recent_first: bool
    summary: str


# Policies as data: adding one is adding an entry here and a name to ``Policy``.
POLICIES: Mapping[Policy, PolicySpec] = {
    "mru": PolicySpec(True, "drop the most recently used chunk first (repeated passes)"),
    "lru": PolicySpec(False, "drop the least recently used chunk first (non-cyclic access)"),
}
STALE_PARTIAL_SECONDS = 3600.0


def parse_policy(value: object) -> Policy:
    """``value`` if it names a policy, else a ``ValueError`` listing the valid names."""
    if isinstance(value, str) and value in POLICIES:
        return value  # type: ignore[return-value]
    names = ", ".join(repr(name) for name in get_args(Policy))
    raise ValueError(f"Expected policy to be one of {names}. Got {value!r}.")


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class StoreUsage:
    """Bytes of a store as found on disk (or in the store) now.

    ``total`` counts every key except ``*.partial`` temporaries; ``entries[name]`` the part
    under one entry (metadata included); ``chunks[name][chunk]`` the bytes of one row-chunk
    across the entry's arrays (``valid`` included, ``access`` excluded), which is what
    dropping it frees; ``orphans`` are the ``*.partial`` keys.
    """

    total: int = 0
    entries: dict[str, int] = field(default_factory=dict)
    chunks: dict[str, dict[int, int]] = field(default_factory=dict)
    orphans: list[str] = field(default_factory=list)
    measured_at: float = field(default_factory=time.monotonic)


def measure(store: FeatureStore) -> StoreUsage:
    """What ``store`` occupies now, from one listing of its keys and their sizes."""
    usage = StoreUsage()
    for key, size in key_sizes(store.root.store, store.root.path):
        if key.endswith(PARTIAL_SUFFIX):
            usage.orphans.append(key)
            continue
        usage.total += size
        parts = key.split("/")
        if len(parts) > 1:
            usage.entries[parts[0]] = usage.entries.get(parts[0], 0) + size
        # <entry>/<array>/c/<row chunk>[/<other dims>...], or a ragged array's values of one
        # row chunk: <entry>/<name>.values/<row chunk>/... (metadata and chunk)
        chunk = None
        if len(parts) >= 4 and parts[2] == "c" and parts[1] != ACCESS and parts[3].isdigit():
            chunk = int(parts[3])
        elif len(parts) >= 3:
            chunk = ragged_values_chunk("/".join(parts[1:]))
        if chunk is not None:
            per_entry = usage.chunks.setdefault(parts[0], {})
            per_entry[chunk] = per_entry.get(chunk, 0) + size
    return usage


def remove_orphans(store: FeatureStore, older_than: float = STALE_PARTIAL_SECONDS) -> list[str]:
    """Delete ``*.partial`` files older than ``older_than`` seconds (a live write's are new)."""
    if not isinstance(store.root.store, LocalStore):
        return []
    root = Path(store.root.store.root) / store.root.path
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
    latest = float(stats[:, LAST].max(initial=0.0))
    if latest:
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


def drop_chunk(entry: Entry, chunk: int) -> None:
    """Make ``chunk``'s rows misses, then delete its bytes in every array.

    Deleting the chunk's key in ``valid`` clears all its rows at once (the fill value is
    ``False``); the data keys go after it. Both run under the chunk's lock, so no writer can
    mark rows valid in between.
    """
    with entry.locks.chunk(entry.name, chunk):
        delete_chunk_bytes(entry, chunk)


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
        log: AccessLog | None = None,
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
                f"{format_bytes(chunk_bytes // entry.chunk_rows)}), so nothing could stay cached. "
                "Raise max_bytes or pass a smaller chunk_rows."
            )
        self._others: dict[str, Entry] = {}
        self.skipped: dict[str, str] = {}  # entries it cannot read (reported once): name -> why

    def enforce(self) -> PruneReport | None:
        """Measure the store and prune it if it is over budget (one pruner at a time)."""
        with self.store.locks.lock("prune"):
            usage = measure(self.store)
            if usage.total <= self.max_bytes:
                return None
            stats = {self.entry.name: self.log.stats()} if self.log is not None else None
            entries = self._entries(usage)
            chosen = plan(entries, usage, self.max_bytes, self.policy, self.entry.name, stats)
            by_name = {entry.name: entry for entry in entries}
            for item in chosen:
                drop_chunk(by_name[item.entry], item.chunk)
        after = usage.total - sum(item.nbytes for item in chosen)
        logger.debug(
            "cachedfeatures: pruned %d chunks (%s) to stay under %s",
            len(chosen),
            format_bytes(usage.total - after),
            format_bytes(self.max_bytes),
        )
        return PruneReport(self.max_bytes, usage.total, after, chosen)

    def after_write(self, chunk: int) -> PruneReport | None:
        """Call after writing ``chunk``: prunes if the store is now over budget."""
        return self.enforce()

    def _entries(self, usage: StoreUsage) -> list[Entry]:
        """The entry in use and every entry with chunks on disk (opened once, then reused)."""
        found = [self.entry]
        for name in sorted(usage.chunks):
            if name == self.entry.name:
                continue
            if name in self.skipped:
                continue
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


# -- rows whose bytes are gone -----------------------------------------------------------------


def missing_chunks(entry: Entry, chunks: Iterable[int]) -> list[int]:
    """The chunks among ``chunks`` whose key is absent in one of the module's output arrays.

    Only output arrays are checked: Zarr may skip writing a chunk that equals the fill
    value, which is common for fields (a chunk of labels that are all 0) and which a real
    feature chunk (float, fill an odd sentinel) never is.
    """
    chunks = [int(chunk) for chunk in chunks]
    if not chunks:
        return []
    store = entry.group.store
    # A ragged output's offsets are always written (its values may be empty).
    arrays = [
        (array, (0,) * (len(array.shape) - 1))
        for array in (
            entry.ragged[name].offsets if name in entry.ragged else entry.arrays[name]
            for name in entry.feature_names
        )
    ]
    per_chunk = [
        [f"{array.path}/{array.metadata.encode_chunk_key((chunk, *rest))}" for array, rest in arrays]
        for chunk in chunks
    ]
    if isinstance(store, LocalStore):  # the hot read path: plain stat calls
        root = f"{store.root}/"
        return [
            chunk
            for chunk, keys in zip(chunks, per_chunk, strict=True)
            if not all(os.path.exists(root + key) for key in keys)
        ]

    async def check() -> list[bool]:
        found = await asyncio.gather(*(store.exists(key) for keys in per_chunk for key in keys))
        width = len(arrays)
        return [all(found[i * width : (i + 1) * width]) for i in range(len(chunks))]

    return [chunk for chunk, present in zip(chunks, sync(check()), strict=True) if not present]


def repair_missing(entry: Entry, chunk: int) -> bool:
    """Clear ``chunk``'s rows if a data array lacks its bytes while rows are still valid.

    Returns whether it did: a chunk a pruner emptied meanwhile needs nothing. Run under
    the chunk's lock so a writer's rewrite in progress is never mistaken for damage.
    """
    start = chunk * entry.chunk_rows
    stop = min(start + entry.chunk_rows, entry.num_rows)
    with entry.locks.chunk(entry.name, chunk):
        if not np.asarray(entry.valid[start:stop], dtype=bool).any():
            return False
        if not missing_chunks(entry, [chunk]):
            return False
        delete_chunk_bytes(entry, chunk)
        return True


def _fill_value(entry: Entry, name: str) -> object | None:
    """The fill value of output array ``name``, or ``None`` where it is NaN (older entries)."""
    fill = entry.arrays[name].fill_value
    return None if np.isnan(fill) else fill


def serve_backed_rows(entry: Entry, rows: np.ndarray, read: RowsRead) -> RowsRead:
    """``read`` less the hits that would serve fill values instead of stored features.

    Two cases: a chunk marked valid whose output bytes are missing (damage: its rows are
    cleared so they are recomputed, logged once), and hits whose floating-point outputs
    all equal the fill value (a finite sentinel; NaN in entries made before it), which is
    what a read that raced a pruner and a rewrite of the same rows sees. Both become misses.

    A chunk's files are looked at once per process (``entry.backed_chunks``), not on every
    batch: that stat per chunk was half the cost of a hit. Bytes that vanish later while
    their rows stay valid read as the fill value, which the second check catches.
    """
    if not read.hits:
        return read
    chunks: list[int] = read.hit_chunks(rows, entry.chunk_rows).tolist()
    missing: list[int] = []
    if not entry.backed_chunks.issuperset(chunks):
        unchecked = [chunk for chunk in chunks if chunk not in entry.backed_chunks]
        missing = missing_chunks(entry, unchecked)
        entry.backed_chunks.update(chunk for chunk in unchecked if chunk not in missing)
    for chunk in missing:
        if repair_missing(entry, chunk) and chunk not in entry.reported_chunks:
            entry.reported_chunks.add(chunk)
            logger.warning(
                "cachedfeatures: rows of chunk %d of %s were marked valid but the chunk's bytes "
                "are missing; recomputing them (run 'cachedfeatures verify --repair' to check the store)",
                chunk,
                entry.name,
            )
    bad = np.isin(rows[read.hit] // entry.chunk_rows, missing) if missing else None
    for name in entry.feature_names:
        column = read.arrays.get(name)
        if column is not None and column.dtype.kind in "fc" and column.size:
            flat = column.reshape(len(column), -1)
            fill = _fill_value(entry, name)
            # All fill needs a fill first: test few rows. Entries made before the fill sentinel
            # have NaN, the old fill value (fill is None).
            first = np.isnan(flat[:, 0]) if fill is None else flat[:, 0] == fill
            if first.any():
                maybe = np.flatnonzero(first)
                if bad is None:
                    bad = np.zeros(len(column), dtype=bool)
                same = np.isnan(flat[maybe]) if fill is None else flat[maybe] == fill
                bad[maybe[same.all(axis=1)]] = True
    if bad is None or not bad.any():
        return read
    hit = read.hit.copy()
    hit[np.flatnonzero(read.hit)[bad]] = False
    return RowsRead(hit, {name: column[~bad] for name, column in read.arrays.items()})
