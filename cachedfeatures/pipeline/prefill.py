"""``prefill()``: compute every missing row ahead of training, resumably, on one or many ranks.

It drains the miss pipeline over the rows that are not valid yet, in row order, so chunks
complete one after another and the writer stores each chunk once, as soon as it is complete.
After an interruption (Ctrl-C, or the process killed), a second call finds the stored chunks
valid and recomputes only the rest: at most the rows of the chunks that were unfinished.

Under ``torch.distributed`` each rank owns whole chunks (chunk ``c`` belongs to rank
``c % world_size``), computes and writes only the missing rows of its chunks, so no chunk has
two writers even where the store has no locks; all ranks meet at a barrier at the end and
then every rank sees every row.

A lost rank: under ``torchrun`` a rank that dies (SIGKILL, out of memory) ends the job, since
the agent stops the other ranks. A rank that hangs (or is far slower) keeps the others at
the final barrier for at most ``timeout`` seconds (the process group's own timeout by
default), after which they raise :class:`~cachedfeatures.errors.RankLostError`. Either way
every chunk written before is valid, and the restarted job computes only the rest.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch.distributed as dist
import torchdata.nodes as tn
from tqdm import tqdm

from cachedfeatures.errors import RankLostError, RankMismatchError
from cachedfeatures.parse import parse_nonnegative_int, parse_timeout
from cachedfeatures.pipeline.nodes import (
    CachedSource,
    ComputedBatch,
    ComputeMisses,
    IOBatch,
    ReadOrLoad,
    WorkerFailure,
    WorkerMethod,
    parse_worker_method,
)
from cachedfeatures.store.feature_store import Entry
from cachedfeatures.store.integrity import CheckedReader
from cachedfeatures.store.ownership import ChunkOwnership
from cachedfeatures.store.ranks import discover_rank
from cachedfeatures.store.writer import Writer

__all__ = ["PrefillResult", "build_on_ranks", "owned_chunks", "owned_valid", "prefill"]

T = TypeVar("T")

logger = logging.getLogger(__name__)
READ_CHUNKS = 16  # chunks read at a time when checking that valid rows can be served


@dataclass(frozen=True)
class PrefillResult:
    """What one ``prefill()`` call did on this rank.

    Args:
        computed: rows run through the module and stored.
        skipped: rows of this rank's chunks that were already cached.
        seconds: wall time of the call, barrier included.
        rank: this process's rank in the process group (0 without one).
        world_size: the number of ranks (1 without a process group).
        chunks: the chunks this rank owned.
    """

    computed: int
    skipped: int
    seconds: float
    rank: int
    world_size: int
    chunks: int


def owned_chunks(num_chunks: int, rank: int, world_size: int) -> np.ndarray:
    """The chunks ``rank`` computes and writes: every ``world_size``-th, starting at ``rank``.

    Depends only on the chunk index, so every rank agrees without communicating, whatever it
    sees in the store when it starts.
    """
    return np.arange(rank, num_chunks, world_size, dtype=np.int64)


def _process_group(distributed: bool | None) -> tuple[int, int]:
    found = discover_rank(environment=False)  # ranks meet at a barrier: the group is needed
    active = found.from_process_group
    if distributed is None:
        distributed = active
    if distributed and not active:
        raise RuntimeError(
            "prefill(distributed=True) needs an initialised process group; call "
            "torch.distributed.init_process_group() first (torchrun sets up the environment)."
        )
    if not distributed:
        return 0, 1
    return found.rank, found.world_size


def _progress_bar_class() -> Any:
    """tqdm's widget bar in a Jupyter kernel that can draw it (ipywidgets installed), else the
    text bar. ``tqdm.auto`` itself would warn "IProgress not found" in a kernel without ipywidgets,
    so it is only imported where that cannot happen."""
    if importlib.util.find_spec("ipywidgets") is None:
        return tqdm
    from tqdm.auto import tqdm as auto_tqdm  # optional: the notebook bar

    return auto_tqdm


def _meet(what: str, timeout: float | None) -> None:
    """Every rank of the process group waits here for the others.

    With ``timeout`` on gloo, a ``monitored_barrier`` that names the ranks that did not arrive
    in time; else a plain barrier, under the process group's own timeout. A failed barrier
    (a peer gone, or out of time) is a :class:`RankLostError`.
    """
    try:
        if timeout is not None and dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=timeout), wait_all_ranks=True)
        else:
            dist.barrier()
    except RuntimeError as error:
        limit = f"{timeout:g}s" if timeout is not None else "the process group's timeout"
        raise RankLostError(
            f"rank {dist.get_rank()} of {dist.get_world_size()} waited {what} and not every rank "
            f"arrived within {limit} (a rank died, hung or is far slower): {error}. The rows this "
            "rank computed are stored; restart the job and prefill computes only the rows not "
            "valid yet. If ranks legitimately finish far apart, pass a longer prefill(timeout=...)."
        ) from error


def _check_same_entry(entry: Entry | None, rank: int) -> None:
    """Raise on every rank unless all ranks fill one entry of one shape (rank 0's)."""
    mine = None if entry is None else (entry.name, entry.num_rows, entry.chunk_rows)
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    differ = [other for other, theirs in enumerate(everyone) if theirs != everyone[0]]
    if differ:
        raise RankMismatchError(
            f"the ranks of this prefill do not fill one entry: rank 0 fills {everyone[0]!r} "
            f"(name, rows, chunk_rows), rank {differ[0]} fills {everyone[differ[0]]!r} (ranks "
            f"{differ} differ from rank 0; this is rank {rank}). Every rank "
            "must wrap the same dataset and module (same weights, options and chunk_rows, "
            "module_version/dataset_version if given); check what each rank loads."
        )


def build_on_ranks(make: Callable[[], T], *, timeout: float | timedelta | None = None) -> T:
    """``make()`` on every rank of the process group, rank 0 first.

    Rank 0 calls ``make`` (which creates the store entry: one writer of its metadata, one
    probe of the dataset); the others wait at a barrier, then call it and open the entry.
    Entry creation is safe without this (idempotent, also on object stores), but with many
    ranks it spares the store their concurrent metadata writes. Without an initialised process
    group, just ``make()``. Collective: every rank must call it.

    Args:
        make: builds the dataset, e.g. ``lambda: CachedFeatureDataset(data, model, url)``.
        timeout: how long the other ranks wait for rank 0 (seconds); default the process
            group's timeout. Raises :class:`~cachedfeatures.errors.RankLostError` past it.
    """
    seconds = parse_timeout("timeout", timeout)
    found = discover_rank(environment=False)
    if not found.from_process_group or found.world_size == 1:
        return make()
    if found.rank == 0:
        built = make()
        _meet("for rank 0 to create the entry", seconds)
        return built
    _meet("for rank 0 to create the entry", seconds)
    return make()


@contextmanager
def _storing(cached: CachedSource, rank: int, world_size: int) -> Iterator[None]:
    """Store the chunks this prefill computes: ``rank``'s of ``world_size`` (all of them with
    ``distributed=False``, even in one rank of several), unless ``owned_chunks`` was given."""
    if cached.owned_chunks is not None:
        yield
        return
    cached.owned_chunks = ChunkOwnership(rank, world_size)
    try:
        yield
    finally:
        cached.owned_chunks = None


def _count(batch: ComputedBatch) -> int:
    return batch.computed


def owned_valid(entry: Entry, owned: np.ndarray, world_size: int) -> np.ndarray:
    """``valid`` where ``owned`` (this rank's rows), ``False`` elsewhere.

    Across ranks only this rank's chunks of ``valid`` are read: a ``world_size``-th of the
    requests of the whole mask, which at 100M rows is one object per chunk for every rank at
    every start (see the Scaling page of the docs).
    """
    if world_size == 1:
        return entry.valid_mask()
    mask = np.zeros(entry.num_rows, dtype=bool)
    rows = np.flatnonzero(owned)
    if len(rows):
        mask[rows] = np.asarray(entry.valid.get_orthogonal_selection((rows,)), dtype=bool)
    return mask


def _unreadable_rows(hits: CheckedReader, rows: np.ndarray) -> np.ndarray:
    """The rows among ``rows`` (valid ones) that a read does not serve: damaged chunks."""
    lost = []
    step = hits.entry.chunk_rows * READ_CHUNKS
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        read = hits.read(part)
        if not read.all_hit:
            lost.append(part[~read.hit])
    return np.concatenate(lost) if lost else np.zeros(0, dtype=np.int64)


def prefill(
    cached: CachedSource,
    *,
    num_workers: int = 0,
    progress: bool = True,
    worker_method: WorkerMethod = "thread",
    distributed: bool | None = None,
    check_valid: bool = True,
    timeout: float | timedelta | None = None,
    rows: np.ndarray | None = None,
) -> PrefillResult:
    """Compute and store every missing row of ``cached``, with a progress bar.

    Args:
        cached: the dataset to fill.
        num_workers: workers that load raw samples; the module runs in this process, in
            batches of ``cached.batch_size``. Default 0 (load inline).
        progress: show a tqdm bar (rows/s, rows already cached, ETA). Default ``True``.
        worker_method: ``"thread"`` (default) or ``"process"`` workers.
        distributed: split the chunks across ``torch.distributed`` ranks; default: when a
            process group is initialised.
        check_valid: read each valid chunk this rank owns once and compute the rows of those
            that no longer read back (torn, garbage, deleted). Default ``True``; ``False`` skips
            valid rows unread (a store known to be sound, too big to read through).
        timeout: across ranks, how long (seconds, or a ``timedelta``) a rank that has written
            its chunks waits at the final barrier for the others before it raises
            :class:`~cachedfeatures.errors.RankLostError`: the bound on a hang when a rank is
            lost. On gloo it is checked by ``monitored_barrier``; on other backends (NCCL) the
            process group's own timeout applies (``init_process_group(timeout=...)``). Default
            ``None``: the process group's timeout (torch's default: 30 minutes). Set it above
            the longest gap you expect between ranks finishing.
        rows: fill only these entry rows (for example some views' rows); default all.

    Across ranks, all ranks first check that they fill one entry (rank 0's) and raise
    :class:`~cachedfeatures.errors.RankMismatchError` on every rank if not.

    Before computing anything, ``cached.spot_check()`` recomputes a few random rows of this
    rank's chunks that were cached before the call (``spot_check=`` rows; none when 0) and
    raises :class:`~cachedfeatures.errors.StaleFeaturesError` if they differ from the store.

    Returns:
        a :class:`PrefillResult` for this rank.
    """
    started = time.perf_counter()
    num_workers = parse_nonnegative_int("num_workers", num_workers)
    worker_method = parse_worker_method(worker_method)
    wait = parse_timeout("timeout", timeout)
    rank, world_size = _process_group(distributed)
    if world_size > 1:
        _check_same_entry(cached.hit_reader().entry if len(cached) else None, rank)
    if len(cached) == 0:  # nothing to fill, and no entry
        return PrefillResult(0, 0, time.perf_counter() - started, rank, world_size, 0)
    hits = cached.hit_reader()
    entry = hits.entry

    chunks = owned_chunks(entry.num_chunks, rank, world_size)
    owned = np.zeros(entry.num_rows, dtype=bool)
    for chunk in chunks:
        owned[chunk * entry.chunk_rows : (chunk + 1) * entry.chunk_rows] = True
    if rows is not None:
        chosen = np.zeros(entry.num_rows, dtype=bool)
        chosen[np.asarray(rows, dtype=np.int64)] = True
        owned &= chosen
    mask = owned_valid(entry, owned, world_size)
    rows = np.flatnonzero(owned & ~mask)
    # Valid rows are only skipped if they can be served: rows of chunks that are torn,
    # garbage or missing (found by reading each valid chunk once) are computed too.
    damaged = _unreadable_rows(hits, np.flatnonzero(owned & mask)) if check_valid else np.zeros(0, np.int64)
    if len(damaged):
        rows = np.union1d(rows, damaged)
    skipped = int((owned & mask).sum()) - len(damaged)
    if skipped:  # rows cached before this call: stale ones raise before any new row is computed
        cached.spot_check(among=np.setdiff1d(np.flatnonzero(owned & mask), damaged))

    computed = 0
    if len(rows):
        writer = Writer(entry, write=cached.write)
        batches = tn.Batcher(tn.IterableWrapper(rows.tolist()), cached.batch_size, drop_last=False)
        io = ReadOrLoad(
            hits,
            cached.row_loader(),
            read_hits=False,
            in_processes=num_workers > 0 and worker_method == "process",
        )
        read: tn.BaseNode[IOBatch | WorkerFailure] = (
            tn.ParallelMapper(batches, io, num_workers=num_workers, method=worker_method)
            if num_workers > 0
            else tn.Mapper(batches, io)
        )
        node = ComputeMisses(read, cached, writer, _count)
        bar = _progress_bar_class()(
            total=len(rows),
            unit="rows",
            desc=f"prefill {entry.name}" + (f" [rank {rank}/{world_size}]" if world_size > 1 else ""),
            disable=not progress,
            dynamic_ncols=True,
        )
        bar.set_postfix(cached=skipped)
        try:
            with _storing(cached, rank, world_size), writer:  # flushes even on Ctrl-C: a rerun skips it
                for count in node:
                    computed += count
                    bar.update(count)
        finally:
            bar.close()
    if world_size > 1:
        _meet("at the end of prefill", wait)
    seconds = time.perf_counter() - started
    logger.info(
        "prefill %s: computed %d rows, %d already cached, in %.1fs (rank %d/%d)",
        entry.name,
        computed,
        skipped,
        seconds,
        rank,
        world_size,
    )
    return PrefillResult(computed, skipped, seconds, rank, world_size, len(chunks))
