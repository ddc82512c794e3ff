"""The miss pipeline on ``torchdata.nodes``: workers do I/O, the module runs in this process.

::

    indices (shuffled per epoch, resumable)
      -> Batcher                      batches of row indices (drop_last=False by default)
      -> ParallelMapper(ReadOrLoad)   workers read hits from the store, load raw misses
      -> ComputeMisses                the module on the device, this process only;
                                      results go to the background Writer
      -> PinMemory (CUDA)             pinned batches for non_blocking copies
      -> Prefetcher                   keeps batches ready

Every stage is a ``BaseNode`` whose state is a plain dict, so :class:`Loader` resumes
mid-epoch from ``state_dict()`` with the same remaining order. Pending writes are flushed at
the end of every epoch; a writer error is raised at the next batch.

torchdata hands an exception raised in a worker or a background thread on as text (its
``ExceptionWrapper`` re-raises ``type(f"Caught ... Original Traceback ...")``, or a
``RuntimeError`` when the type takes other arguments). Here the I/O stage returns its error as a
:class:`WorkerFailure` instead, the compute stage raises the original and keeps it, and
:class:`Loader` re-raises that object in the training loop: the dataset's or module's own
exception type and message, with the traceback of where it was raised.
"""

from __future__ import annotations

import gc
import multiprocessing.util
import os
import pickle
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar, get_args

import numpy as np
import torch
import torchdata.nodes as tn
from torch.utils.data import Sampler, default_collate

from cachedfeatures.compute.steps import LoadedRows, RowLoader
from cachedfeatures.errors import CacheError, WriterError
from cachedfeatures.parse import parse_choice, parse_device, parse_nonnegative_int, parse_positive_int
from cachedfeatures.pipeline.collate import move_to
from cachedfeatures.pipeline.lifetime import exit_with_parent
from cachedfeatures.store.integrity import CheckedReader
from cachedfeatures.store.ownership import ChunkOwnership
from cachedfeatures.store.writer import Writer

__all__ = [
    "CachedSource",
    "ComputeMisses",
    "EpochRows",
    "IOBatch",
    "IndexBatches",
    "Indices",
    "Loader",
    "ReadOrLoad",
    "WorkerFailure",
    "WorkerMethod",
]

WorkerMethod = Literal["thread", "process"]
T = TypeVar("T")
Collate = Callable[[list[Any]], Any]


class CachedSource(Protocol):
    """What the miss pipeline needs of the dataset it serves.

    :class:`~cachedfeatures.CachedFeatureDataset` satisfies it; the pipeline sits below the
    dataset and knows it only through this protocol.
    """

    @property
    def batch_size(self) -> int: ...

    @property
    def spot_check_rows(self) -> int: ...

    #: the chunks this process stores (``None``: its rank's on a store without locks, else all)
    owned_chunks: ChunkOwnership | None

    def __len__(self) -> int: ...

    def hit_reader(self) -> CheckedReader:
        """How workers read hits: the entry's reads, less rows whose feature bytes are gone.

        Only asked of a dataset with rows (an empty one has no entry).
        """
        ...

    def row_loader(self) -> RowLoader:
        """How workers load the raw inputs of missing rows."""
        ...

    def compute_loaded(self, loaded: LoadedRows, *, pin_memory: bool = False) -> dict[str, np.ndarray]:
        """The module's outputs for loaded misses, as storable columns."""
        ...

    def write(self, rows: Sequence[int] | np.ndarray, columns: Mapping[str, np.ndarray]) -> None:
        """Store computed columns for ``rows`` (what the background writer calls)."""
        ...

    def record_hits(self, rows: np.ndarray) -> None:
        """Count reads of ``rows`` served from the store by the workers."""
        ...

    def spot_check_hits(self, rows: np.ndarray, stored: Mapping[str, np.ndarray]) -> int:
        """Spot-check a few of ``rows`` just read as hits against recomputed values."""
        ...

    def spot_check(self, rows: int | None = None, *, among: Sequence[int] | np.ndarray | None = None) -> int:
        """Spot-check rows cached before (prefill, before computing anything)."""
        ...

    def assemble_all(self, columns: Mapping[str, np.ndarray]) -> list[Any]:
        """One sample per row of ``columns``."""
        ...

    def rows_of(self, indices: Sequence[int] | np.ndarray, epoch: int) -> np.ndarray:
        """The entry rows that serve sample ``indices`` in ``epoch`` (the indices, without views)."""
        ...

    def begin_epoch(self, epoch: int | None = None) -> int:
        """Start a loader epoch (``epoch`` when resuming); its number, counted by the dataset."""
        ...

    @property
    def views(self) -> int | None:
        """Draws cached per sample (``None``: rows are samples)."""
        ...

    def batch_assembler(self, collate_fn: Collate | None = None) -> Callable[[Mapping[str, np.ndarray]], Any]:
        """What makes ``collate_fn(samples)`` of a batch's stored columns (straight from the
        columns where ``collate_fn`` allows; ``None``: the dataset's default collate)."""
        ...


def parse_worker_method(value: object) -> WorkerMethod:
    return parse_choice("worker_method", value, get_args(WorkerMethod))


class Indices(tn.BaseNode[int]):  # type: ignore[misc]
    """Row indices ``0..n-1``, shuffled with ``seed + epoch`` when ``shuffle`` is set.

    The state is ``{"epoch", "offset"}``: a resumed iterator regenerates the same permutation
    and skips what was already yielded. Each ``reset()`` without a state starts the next epoch.

    Args:
        n: number of rows.
        shuffle: permute the rows each epoch. Default ``False``.
        seed: base seed of the permutation. Default 0.
    """

    EPOCH_KEY = "epoch"
    OFFSET_KEY = "offset"

    def __init__(self, n: int, shuffle: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self._epoch = -1
        self._offset = 0
        self._order = np.arange(0)

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        if initial_state is not None:
            self._epoch = int(initial_state[self.EPOCH_KEY])
            self._offset = int(initial_state[self.OFFSET_KEY])
        else:
            self._epoch += 1
            self._offset = 0
        self._order = self.order(self._epoch)

    def order(self, epoch: int) -> np.ndarray:
        """The rows of ``epoch``, in the order they are served."""
        if not self.shuffle:
            return np.arange(self.n)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=generator).numpy()

    def next(self) -> int:
        if self._offset >= len(self._order):
            raise StopIteration
        row = int(self._order[self._offset])
        self._offset += 1
        return row

    def take(self, count: int) -> np.ndarray:
        """The next ``count`` rows at once (fewer at the end of the epoch, none after it)."""
        rows = self._order[self._offset : self._offset + count]
        self._offset += len(rows)
        return rows

    def get_state(self) -> dict[str, Any]:
        return {self.EPOCH_KEY: self._epoch, self.OFFSET_KEY: self._offset}


class EpochRows(tn.BaseNode[np.ndarray]):  # type: ignore[misc]
    """Batches of sample indices as the entry rows that serve them in the current epoch.

    With ``views=K`` a sample has ``K`` rows and the epoch picks one (``cached.rows_of``).
    Each ``reset()`` without a state starts the dataset's next epoch (``cached.begin_epoch()``:
    the one after the last any loader served, or the one given to ``set_epoch``), so a new
    loader per epoch moves on too; the state holds the epoch and the source's state, so a
    resumed loader serves the same views.
    """

    EPOCH_KEY = "epoch"
    SOURCE_KEY = "source"

    def __init__(self, source: tn.BaseNode[list[int] | np.ndarray], cached: CachedSource) -> None:
        super().__init__()
        self.source = source
        self.cached = cached
        self.epoch = -1

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        if initial_state is not None:
            self.epoch = self.cached.begin_epoch(int(initial_state[self.EPOCH_KEY]))
            self.source.reset(initial_state[self.SOURCE_KEY])
        else:
            self.epoch = self.cached.begin_epoch()
            self.source.reset(None)

    def next(self) -> np.ndarray:
        return self.cached.rows_of(next(self.source), self.epoch)

    def get_state(self) -> dict[str, Any]:
        return {self.EPOCH_KEY: self.epoch, self.SOURCE_KEY: self.source.state_dict()}


class IndexBatches(tn.BaseNode[np.ndarray]):  # type: ignore[misc]
    """Batches of :class:`Indices` as arrays: what ``Batcher(Indices(...))`` yields, without a
    Python call per row (that cost about as much as reading a batch of hits).

    The state is the batcher's over :class:`Indices` (``{"source": {"epoch", "offset"}}``), so a
    loader resumes from a state either of them saved.

    Args:
        indices: the rows of each epoch.
        batch_size: rows per batch.
        drop_last: drop the last, smaller batch. Default ``False``.
    """

    SOURCE_KEY = "source"

    def __init__(self, indices: Indices, batch_size: int, drop_last: bool = False) -> None:
        super().__init__()
        self.indices = indices
        self.batch_size = batch_size
        self.drop_last = drop_last

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self.indices.reset(None if initial_state is None else initial_state[self.SOURCE_KEY])

    def next(self) -> np.ndarray:
        rows = self.indices.take(self.batch_size)
        if len(rows) == 0 or (self.drop_last and len(rows) < self.batch_size):
            raise StopIteration
        return rows

    def get_state(self) -> dict[str, Any]:
        return {self.SOURCE_KEY: self.indices.state_dict()}


class CollectBeforeFork(tn.BaseNode[T], Generic[T]):  # type: ignore[misc]
    """Passes ``source`` through; its ``reset`` first collects garbage.

    ``ParallelMapper(method="process")`` resets its source just before it forks the workers of
    a new epoch, while the previous epoch's iterator may still be waiting for the cycle
    collector. Collecting it here keeps the forked workers from inheriting it (torchdata 0.11
    would then run its ``__del__`` in the child, which fails noisily).
    """

    SOURCE_KEY = "source"

    def __init__(self, source: tn.BaseNode[T]) -> None:
        super().__init__()
        self.source = source

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        gc.collect()
        self.source.reset(None if initial_state is None else initial_state[self.SOURCE_KEY])

    def next(self) -> T:
        return next(self.source)  # type: ignore[no-any-return]

    def get_state(self) -> dict[str, Any]:
        return {self.SOURCE_KEY: self.source.state_dict()}


@dataclass
class IOBatch:
    """What the I/O stage hands to the compute stage for one batch.

    Args:
        rows: the batch's row indices, in order.
        hit: ``hit[i]`` when row ``i`` was read from the store.
        columns: one array per stored column with a row per requested row; rows of misses
            are filled in by the compute stage.
        misses: raw samples of the distinct missed rows, or ``None`` when all hit.
        where: for each missed position, its index into ``misses.rows``.
    """

    rows: np.ndarray
    hit: np.ndarray
    columns: dict[str, np.ndarray]
    misses: LoadedRows | None
    where: np.ndarray


@dataclass
class WorkerFailure:
    """The exception the I/O stage raised on a batch, handed on as a result so that it keeps its type.

    Args:
        error: the exception itself (from a worker process: a pickled copy, whose traceback text
            is attached as a note).
    """

    error: Exception

    @classmethod
    def of(cls, error: Exception, in_process: bool) -> WorkerFailure | None:
        """``error`` wrapped for the trip to the compute stage, or ``None`` when it cannot make it.

        From a worker process the exception must survive pickling as itself (same type, same
        message); one that does not is left to torchdata's own wrapping.
        """
        if not in_process:
            return cls(error)
        text = "".join(traceback.format_exception(error))
        try:
            copy = pickle.loads(pickle.dumps(error))
        except Exception:
            return None
        if type(copy) is not type(error) or str(copy) != str(error):
            return None
        copy.add_note(f"Raised in a loader worker process (pid {os.getpid()}):\n{text.rstrip()}")
        return cls(copy)


class ReadOrLoad:
    """The I/O stage: read hits from the store, load raw samples of misses. No module.

    Picklable (the entry's reader, the wrapped dataset and the sample layout), so it runs in
    worker threads or processes without a copy of the module.

    Args:
        hits: reads the store entry's hits.
        row_loader: loads raw samples.
        read_hits: when ``False`` every row is treated as a miss without reading the store
            (prefill asks only for rows it knows are missing).
    """

    def __init__(
        self, hits: CheckedReader, row_loader: RowLoader, read_hits: bool = True, in_processes: bool = False
    ) -> None:
        self.hits = hits
        self.row_loader = row_loader
        self.read_hits = read_hits
        # Worker processes must not outlive the trainer (a SIGKILL skips the daemon cleanup):
        # each arms its parent-death signal as it starts (fork: the after-fork hook) or, at the
        # latest, on its first batch (spawn).
        self.in_processes = in_processes
        self._created_pid = self._armed_pid = os.getpid()  # a worker process has another
        if in_processes:
            multiprocessing.util.register_after_fork(self, ReadOrLoad._arm)

    def _arm(self) -> None:
        """In a worker process running this stage: exit when the worker's parent dies.

        Only in processes whose target was handed this object (torchdata's workers): other
        children forked meanwhile (the user's, or a worker's own) are left alone.
        """
        if not self.in_processes or self._armed_pid == os.getpid():
            return
        self._armed_pid = os.getpid()
        process = multiprocessing.current_process()
        parent = multiprocessing.parent_process()
        ours = any(
            arg is self or getattr(arg, "map_fn", None) is self for arg in getattr(process, "_args", ())
        )
        if ours and parent is not None and parent.pid:
            exit_with_parent(parent.pid)

    def __call__(self, rows: list[int] | np.ndarray) -> IOBatch | WorkerFailure:
        try:
            return self._read_or_load(rows)
        except Exception as error:
            failure = WorkerFailure.of(error, in_process=os.getpid() != self._created_pid)
            if failure is None:
                raise
            return failure

    def _read_or_load(self, rows: list[int] | np.ndarray) -> IOBatch:
        self._arm()
        rows = np.asarray(rows, dtype=np.int64)
        specs = self.hits.entry.specs
        hit = np.zeros(len(rows), dtype=bool)
        if self.read_hits:
            read = self.hits.read(rows)
            hit = read.hit
            if read.all_hit and len(read.arrays) == len(specs):  # the read's own copies, a row per row
                return IOBatch(rows, hit, dict(read.arrays), None, np.zeros(0, dtype=np.int64))
        columns = {spec.name: spec.empty_column(len(rows)) for spec in specs}
        if self.read_hits:
            for name, column in read.arrays.items():
                columns[name][hit] = column
        misses: LoadedRows | None = None
        where = np.zeros(0, dtype=np.int64)
        if not hit.all():
            unique, where = np.unique(rows[~hit], return_inverse=True)
            misses = self.row_loader(unique)
        return IOBatch(rows, hit, columns, misses, where)


@dataclass
class ComputedBatch:
    """A batch with every column filled; ``computed`` rows went through the module."""

    rows: np.ndarray
    columns: dict[str, np.ndarray]
    computed: int
    hits: int


class ComputeMisses(tn.BaseNode[T], Generic[T]):  # type: ignore[misc]
    """The compute stage: run the module on the misses of each I/O batch, in this process.

    Computed rows go to ``writer``; the writer is flushed when the source is exhausted (end of
    an epoch) and on every reset (an epoch left early), and a writer error is raised at the
    next batch.

    With ``spot_check``, each epoch (each reset) spot-checks rows drawn from the hits of its
    first batch that has any, on a batch of their own: here, off the training loop's thread
    when a prefetcher follows, while the I/O workers go on with the next batches.

    A :class:`WorkerFailure` from the source is raised as its original exception; whatever this
    stage raises is also kept in ``error``, so the training loop can re-raise the original.

    Args:
        source: a node of :class:`IOBatch` (or :class:`WorkerFailure`).
        cached: the dataset whose module and layouts to use.
        writer: the background writer of ``cached.entry``.
        finish: turns a :class:`ComputedBatch` into what this node yields.
        pin_memory: pin miss inputs before copying them to a CUDA device.
        spot_check: spot-check cached rows once per epoch. Default ``False``.
    """

    SOURCE_KEY = "source"

    def __init__(
        self,
        source: tn.BaseNode[IOBatch | WorkerFailure],
        cached: CachedSource,
        writer: Writer,
        finish: Callable[[ComputedBatch], T],
        pin_memory: bool = False,
        spot_check: bool = False,
    ) -> None:
        super().__init__()
        self.source = source
        self.cached = cached
        self.writer = writer
        self.finish = finish
        self.pin_memory = pin_memory
        self.spot_check = spot_check
        self._spot_due = spot_check
        # The exception this stage raised last (the dataset's, the module's, a spot check's), for
        # the training loop: torchdata re-raises it there as text.
        self.error: Exception | None = None
        # torchdata's thread workers call torch.set_num_threads(1), and threads started after
        # that (the prefetcher's, which runs this node) inherit it: the module would run on one
        # core. The compute stage runs on the thread count of the process that built it.
        self._num_threads = torch.get_num_threads()

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self.writer.flush()  # rows of an epoch left early are stored before the next one starts
        self.source.reset(None if initial_state is None else initial_state[self.SOURCE_KEY])
        self._spot_due = self.spot_check
        self.error = None

    def next(self) -> T:
        try:
            return self._next()
        except StopIteration:
            raise
        except Exception as error:
            self.error = error  # the original, for the training loop's thread
            raise

    def _next(self) -> T:
        self.writer.check()
        try:
            batch = next(self.source)
        except StopIteration:
            self.writer.flush()
            raise
        if isinstance(batch, WorkerFailure):
            raise batch.error
        self.cached.record_hits(batch.rows[batch.hit])
        if torch.get_num_threads() != self._num_threads:  # the module runs in this thread
            torch.set_num_threads(self._num_threads)
        if self._spot_due and batch.hit.any():
            self._spot_due = False
            hit = np.flatnonzero(batch.hit)
            self.cached.spot_check_hits(batch.rows[hit], {n: c[hit] for n, c in batch.columns.items()})
        computed = 0
        if batch.misses is not None:
            values = self.cached.compute_loaded(batch.misses, pin_memory=self.pin_memory)
            self.writer.submit(batch.misses.rows, values)
            missing = ~batch.hit
            for name, column in values.items():
                batch.columns[name][missing] = column[batch.where]
            computed = len(batch.misses.rows)
        hits = int(batch.hit.sum())
        return self.finish(ComputedBatch(batch.rows, batch.columns, computed, hits))

    def get_state(self) -> dict[str, Any]:
        return {self.SOURCE_KEY: self.source.state_dict()}


class _Assemble:
    """Collates a computed batch: straight from its columns for ``default_collate`` and the
    dataset's ``pad_collate``, through one sample per row for any other ``collate_fn``."""

    def __init__(self, cached: CachedSource, collate_fn: Collate) -> None:
        self.assemble = cached.batch_assembler(collate_fn)

    def __call__(self, batch: ComputedBatch) -> Any:
        return self.assemble(batch.columns)


class Loader:
    """Batches of a :class:`~cachedfeatures.CachedFeatureDataset`, through the miss pipeline.

    Iterating gives one epoch of collated batches; iterating again gives the next epoch (a new
    permutation when ``shuffle``, and with ``views=K`` the next epoch's views). ``state_dict()`` /
    ``load_state_dict()`` resume mid-epoch with the same remaining order and views.

    Args:
        cached: the dataset to serve.
        batch_size: samples per batch (misses of a batch go through the module in batches of
            ``cached.batch_size``).
        shuffle: a new permutation every epoch, seeded by ``seed + epoch``. Default ``False``.
        num_workers: workers that read hits and load raw misses; ``0`` does I/O inline.
        pin_memory: pin batches (and miss inputs) for ``non_blocking`` copies to CUDA; only
            used when CUDA is available. Default ``None``: when ``device`` is a CUDA device.
        device: deliver every batch's tensors on this device (``"cuda"``), copied from pinned
            memory with ``non_blocking=True`` where ``pin_memory``; strings stay as they are.
            Default ``None``: batches stay on the CPU.
        seed: base seed of the shuffle. Default 0.
        drop_last: drop the last, smaller batch. Default ``False``, as in DataLoader.
        sampler: any ``Sampler`` of row indices instead of ``shuffle``/``seed``; resumable when
            it is stateful, otherwise by replaying it (``set_epoch`` is called per epoch).
        collate_fn: turns a list of samples into a batch. Default ``default_collate``, which (like
            the dataset's ``pad_collate``) is made straight from the stored columns; any other
            function is handed one sample per row.
        worker_method: ``"thread"`` (default; measured faster for zarr reads, which release
            the GIL) or ``"process"``.
        prefetch_factor: batches kept ready ahead of the training loop. Default 2.
    """

    def __init__(
        self,
        cached: CachedSource,
        batch_size: int,
        *,
        shuffle: bool = False,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        drop_last: bool = False,
        sampler: Sampler[int] | None = None,
        collate_fn: Collate | None = None,
        worker_method: WorkerMethod = "thread",
        prefetch_factor: int = 2,
        device: str | torch.device | None = None,
    ) -> None:
        if len(cached) == 0:
            raise CacheError("the dataset is empty; there is nothing to load.")
        hits = cached.hit_reader()
        self.cached = cached
        self.batch_size = parse_positive_int("batch_size", batch_size)
        self.num_workers = parse_nonnegative_int("num_workers", num_workers)
        self.prefetch_factor = parse_positive_int("prefetch_factor", prefetch_factor)
        self.worker_method = parse_worker_method(worker_method)
        self.drop_last = bool(drop_last)
        self.sampler = sampler
        self.device = None if device is None else parse_device(device)
        if pin_memory is None:
            pin_memory = self.device is not None and self.device.type == "cuda"
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.writer = Writer(hits.entry, write=cached.write)

        batches: tn.BaseNode[list[int] | np.ndarray]
        if sampler is not None:
            batches = tn.Batcher(tn.SamplerWrapper(sampler), self.batch_size, drop_last=self.drop_last)
        else:
            indices = Indices(len(cached), shuffle, seed)
            batches = IndexBatches(indices, self.batch_size, drop_last=self.drop_last)
        if cached.views is not None:  # each epoch serves one view's row of every sample
            batches = EpochRows(batches, cached)
        if self.num_workers > 0 and self.worker_method == "process":
            batches = CollectBeforeFork(batches)
        io = ReadOrLoad(
            hits, cached.row_loader(), in_processes=self.num_workers > 0 and self.worker_method == "process"
        )
        read: tn.BaseNode[IOBatch | WorkerFailure] = (
            tn.ParallelMapper(batches, io, num_workers=self.num_workers, method=self.worker_method)
            if self.num_workers > 0
            else tn.Mapper(batches, io)
        )
        self._compute = ComputeMisses(
            read,
            cached,
            self.writer,
            _Assemble(cached, collate_fn or default_collate),
            self.pin_memory,
            spot_check=cached.spot_check_rows > 0,
        )
        node: tn.BaseNode[Any] = self._compute
        if self.pin_memory:
            node = tn.PinMemory(node)
        node = tn.Prefetcher(node, prefetch_factor=self.prefetch_factor)
        self._loader: tn.Loader[Any] = tn.Loader(node)

    def __iter__(self) -> Iterator[Any]:
        return self._batches(iter(self._loader))  # iter() resets now: a new epoch or the resume

    def _batches(self, iterator: Iterator[Any]) -> Iterator[Any]:
        while True:
            self.writer.check()  # a writer error surfaces here, at the next batch
            try:
                item = next(iterator)
            except StopIteration:
                return
            except WriterError:  # raised in the prefetch thread: re-raise with its cause
                self.writer.check()
                raise
            except Exception:  # re-raised from the prefetch thread as text: raise the original
                error, self._compute.error = self._compute.error, None
                if error is None:
                    raise
                raise error from None
            if self.device is not None:
                item = move_to(item, self.device, non_blocking=self.pin_memory)
            yield item

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.cached)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Where the current epoch stands; pass to :meth:`load_state_dict` to resume there."""
        return dict(self._loader.state_dict())

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from ``state_dict`` at the next ``iter()``."""
        self._loader.load_state_dict(dict(state_dict))

    def flush(self) -> None:
        """Write every computed row now (also done at the end of each epoch)."""
        self.writer.flush()

    def close(self) -> None:
        """Flush pending writes and stop the writer thread."""
        self.writer.close()
