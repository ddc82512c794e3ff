"""The background writer: stores computed rows while the next batch is being computed.

Compression and disk writes run in one thread behind a bounded queue, so the module does not
wait on them (and a slow disk slows the pipeline down instead of filling memory). Every chunk
write is a read-modify-write of the whole compressed chunk, and a shuffled epoch touches many
chunks per batch, so rows are coalesced per chunk: a chunk is written once all of its missing
rows have arrived, when the buffer is over its byte budget (fullest chunk first), when its
rows have been held for ``max_hold_seconds`` (so a kill loses at most about that much computed
work, not a whole shuffled epoch), or at :meth:`Writer.flush`. ``Entry.write`` marks rows
valid only after their bytes are stored. The coalescing itself is :class:`ChunkBuffer`, which the
map-style path (``cached[i]`` in a DataLoader) also uses, in the caller's thread.

An error in the thread is kept and re-raised (as :class:`~cachedfeatures.errors.WriterError`)
by the next :meth:`Writer.submit`, :meth:`Writer.check` or :meth:`Writer.flush`: never lost.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import get_worker_info

from cachedfeatures.errors import WriterError
from cachedfeatures.store.feature_store import Entry
from cachedfeatures.units import physical_memory_bytes

__all__ = ["ChunkBuffer", "Writer", "default_write_back_bytes"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PENDING = 8
# Rows held for coalescing, by default: a sixteenth of physical memory, split between DataLoader
# workers, and at least 64 MiB (256 MiB in the background writer). Enough on most machines to
# hold a shuffled epoch's rows until their chunks complete, so each chunk is written once.
WRITE_BACK_FRACTION = 1 / 16
MIN_WRITE_BACK_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_BUFFER_BYTES = 256 * 1024 * 1024
# Rows held longer than this are written (their chunks partially): what a kill can cost.
DEFAULT_MAX_HOLD_SECONDS = 10.0
# Writes of held chunks take at most about 1/HOLD_COST_RATIO of the time: the hold grows to
# this many times what writing every held chunk costs, at the last round's cost per chunk (a
# round rewrites every chunk holding rows, seconds on an entry of hundreds of chunks).
HOLD_COST_RATIO = 20.0


def default_write_back_bytes(minimum: int = MIN_WRITE_BACK_BYTES) -> int:
    """A sixteenth of physical memory (split between DataLoader workers when called in one),
    and at least ``minimum``."""
    info = get_worker_info()
    workers = info.num_workers if info is not None else 1
    return max(minimum, int(physical_memory_bytes() * WRITE_BACK_FRACTION) // max(1, workers))


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Chunk:
    """Rows of one chunk waiting to be written."""

    rows: list[np.ndarray] = field(default_factory=list)
    columns: list[dict[str, np.ndarray]] = field(default_factory=list)
    count: int = 0
    nbytes: int = 0
    since: float = 0.0  # when its first held row arrived (time.monotonic)


class ChunkBuffer:
    """Rows held per chunk until the chunk can be written once: the writer's coalescing.

    Not thread-safe: one thread at a time adds and writes (the :class:`Writer`'s; on the
    map-style path the binding's lock, which a worker's idle flush takes too). A chunk is
    written when all of its rows missing at the first :meth:`add` (since the last
    :meth:`write_all`) have arrived, when the buffer holds more than ``max_buffer_bytes``
    (fullest chunk first), when its rows have been held ``max_hold_seconds`` (checked at each
    :meth:`add` and :meth:`write_aged`), or at :meth:`write_all`.

    Args:
        entry: the entry the rows belong to.
        store_rows: stores the rows of one chunk (and marks them valid).
        max_buffer_bytes: bytes held before the fullest chunk is written early (``0``: none held).
        max_hold_seconds: the longest rows are held (stretched as :class:`Writer` says).
    """

    def __init__(
        self,
        entry: Entry,
        store_rows: Callable[[np.ndarray, Mapping[str, np.ndarray]], object],
        *,
        max_buffer_bytes: int,
        max_hold_seconds: float,
    ) -> None:
        self.entry = entry
        self._store_rows = store_rows
        self.max_buffer_bytes = max_buffer_bytes
        self.max_hold_seconds = max_hold_seconds
        self._hold = max_hold_seconds
        self._buffer: dict[int, _Chunk] = {}
        self._buffered_bytes = 0
        self._missing: np.ndarray | None = None  # per chunk: rows not valid when counting began
        self._held = np.zeros(entry.num_rows, dtype=bool)  # per row: held, not yet written
        self.rows_written = 0
        self.chunks_written = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of rows held, not yet written."""
        return self._buffered_bytes

    def drop(self) -> None:
        """Forget every held row (they stay missing and are recomputed later)."""
        self._buffer.clear()
        self._buffered_bytes = 0
        self._held[:] = False

    def held(self, rows: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Which of ``rows`` are held, and their held columns (one row per row found, in order).

        A row held twice (computed again before its chunk was written) is served as it will be
        stored: its first copy, which :meth:`Entry.write` keeps.
        """
        found = self._held[rows]
        if not found.any():
            return found, {}
        wanted = rows[found]
        columns = {spec.name: spec.empty_column(len(wanted)) for spec in self.entry.specs}
        chunks = wanted // self.entry.chunk_rows
        for chunk in np.unique(chunks):
            pending = self._buffer[int(chunk)]
            held_rows, first = np.unique(np.concatenate(pending.rows), return_index=True)
            at = np.flatnonzero(chunks == chunk)
            source = first[np.searchsorted(held_rows, wanted[at])]
            for name in pending.columns[0]:
                rows_held = np.concatenate([part[name] for part in pending.columns])
                columns[name][at] = _copied_rows(rows_held, source)  # the caller's, not the buffer's
        return found, columns

    def add(self, rows: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        """Hold ``rows`` (one row of each column per row); write the chunks that are now due."""
        entry = self.entry
        if self._missing is None:
            self._missing = self._count_missing()
        chunks = rows // entry.chunk_rows
        order = np.argsort(chunks, kind="stable")  # rows grouped by chunk, in one sort
        grouped = chunks[order]
        starts = np.flatnonzero(np.diff(grouped, prepend=-1))
        bounds = [*starts.tolist(), len(rows)]
        self._held[rows] = True
        now = time.monotonic()
        for k, chunk in enumerate(grouped[starts].tolist()):
            take = order[bounds[k] : bounds[k + 1]]
            # Copies, ragged rows too (an object column's items are arrays the caller is served
            # views of): what is stored must not change when a served sample is changed in place.
            # One per chunk, so a chunk written frees its rows.
            part = {name: _copied_rows(column, take) for name, column in columns.items()}
            pending = self._buffer.get(chunk)
            if pending is None:
                pending = self._buffer[chunk] = _Chunk(since=now)
            pending.rows.append(rows[take])
            pending.columns.append(part)
            pending.count += len(take)
            nbytes = sum(column.nbytes for column in part.values())
            pending.nbytes += nbytes
            self._buffered_bytes += nbytes
            if pending.count >= self._missing[chunk]:
                self.write_chunk(chunk)
        while self._buffered_bytes > self.max_buffer_bytes and self._buffer:
            fullest = max(self._buffer, key=lambda c: self._buffer[c].count)
            self.write_chunk(fullest)
        self.write_aged()

    def until_aged(self) -> float | None:
        """Seconds until the oldest held rows are due (``None``: nothing held)."""
        if not self._buffer:
            return None
        oldest = min(pending.since for pending in self._buffer.values())
        return max(0.0, oldest + self._hold - time.monotonic()) + 0.001

    def write_aged(self) -> None:
        """Write every chunk whose rows have been held for the hold time, oldest first."""
        now = time.monotonic()
        due = sorted((p.since, c) for c, p in self._buffer.items() if now - p.since >= self._hold)
        if not due:
            return
        held = len(self._buffer)
        for _, chunk in due:
            self.write_chunk(chunk)
        spent = time.monotonic() - now
        # A round writes the chunks that came first; the rest follow a batch or two later, in
        # rounds of a few chunks. The hold follows what writing every held chunk costs, so that
        # such a small round does not shorten it (which made rounds come every few seconds).
        self._hold = max(self.max_hold_seconds, HOLD_COST_RATIO * spent * held / len(due))
        logger.debug(
            "entry %s: wrote %d of %d held chunks in %.3f s; hold now %.3f s",
            self.entry.name,
            len(due),
            held,
            spent,
            self._hold,
        )

    def _count_missing(self) -> np.ndarray:
        entry = self.entry
        mask = entry.valid_mask()
        mask[entry.unused_rows()] = True  # never filled: a chunk is complete without them
        padded = np.ones(entry.num_chunks * entry.chunk_rows, dtype=bool)
        padded[: len(mask)] = mask
        return np.asarray((~padded).reshape(entry.num_chunks, entry.chunk_rows).sum(axis=1))

    def write_all(self) -> None:
        """Write every held chunk; the next :meth:`add` recounts what is missing."""
        for chunk in sorted(self._buffer):
            self.write_chunk(chunk)
        self._missing = None  # others may have written meanwhile

    def write_chunk(self, chunk: int) -> None:
        """Store the held rows of ``chunk`` (one read-modify-write of it) and forget them."""
        pending = self._buffer.pop(chunk)
        self._buffered_bytes -= pending.nbytes
        rows = np.concatenate(pending.rows)
        columns = {
            name: np.concatenate([part[name] for part in pending.columns]) for name in pending.columns[0]
        }
        self._held[rows] = False  # from here on read from the store, or recomputed
        self._store_rows(rows, columns)
        if self._missing is not None:
            self._missing[chunk] = max(0, int(self._missing[chunk]) - len(np.unique(rows)))
        self.rows_written += len(rows)
        self.chunks_written += 1
        logger.debug("entry %s: wrote %d rows of chunk %d", self.entry.name, len(rows), chunk)


class Writer:
    """Writes rows to an entry from a background thread, coalescing them per chunk.

    Args:
        entry: the entry to write to.
        max_pending: submitted batches that may wait in the queue before ``submit`` blocks.
            Default 8.
        max_buffer_bytes: bytes of rows held back for coalescing before the fullest chunk is
            written early. Default ``None``: a sixteenth of physical memory, at least 256 MiB;
            ``0`` writes every batch as it comes.
        write: stores the rows of one chunk; default ``entry.write``. The pipeline passes
            ``CachedFeatureDataset.write``, which also enforces the size budget.
        max_hold_seconds: rows held this long are written even if their chunk is not complete
            (one partial write per chunk per hold at most), so a kill loses at most about this
            much computed work plus the queued batches. The hold stretches to
            ``HOLD_COST_RATIO`` times what writing every held chunk costs (at the last round's
            cost per chunk), so that rewriting partial chunks never takes most of the writer's
            time. Default ``DEFAULT_MAX_HOLD_SECONDS`` (10 s); ``None`` takes the module default
            at construction.
    """

    def __init__(
        self,
        entry: Entry,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_buffer_bytes: int | None = None,
        write: Callable[[np.ndarray, Mapping[str, np.ndarray]], None] | None = None,
        max_hold_seconds: float | None = None,
    ) -> None:
        self.entry = entry
        self.max_hold_seconds = DEFAULT_MAX_HOLD_SECONDS if max_hold_seconds is None else max_hold_seconds
        self._store_rows = write or entry.write
        if max_buffer_bytes is None:
            max_buffer_bytes = default_write_back_bytes(DEFAULT_MAX_BUFFER_BYTES)
        self.max_buffer_bytes = max_buffer_bytes
        self._queue: queue.Queue[tuple[np.ndarray, dict[str, np.ndarray]] | _Flush | None] = queue.Queue(
            maxsize=max_pending
        )
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Thread-side state.
        self._chunks = ChunkBuffer(
            entry, self._store_rows, max_buffer_bytes=max_buffer_bytes, max_hold_seconds=self.max_hold_seconds
        )

    @property
    def rows_written(self) -> int:
        """Rows stored so far (a row written twice counts twice)."""
        return self._chunks.rows_written

    @property
    def chunks_written(self) -> int:
        """Chunk writes so far: each one a read-modify-write of a whole chunk."""
        return self._chunks.chunks_written

    # -- caller side ---------------------------------------------------------------------------

    def submit(self, rows: np.ndarray, columns: Mapping[str, np.ndarray]) -> None:
        """Queue ``rows`` (with one row of each column per row) for writing.

        Blocks while the queue is full; raises a pending writer error instead of queueing.
        """
        self.check()
        if len(rows) == 0:
            return
        self._start()
        item = (np.asarray(rows, dtype=np.int64), dict(columns))
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                self.check()
                self._check_alive()

    def check(self) -> None:
        """Raise the writer thread's error, if it had one."""
        error = self._error
        if error is not None:
            raise WriterError(
                f"writing computed features to entry {self.entry.name!r} failed ({error!r}); the "
                "rows it was writing stay missing and are recomputed later. Fix the cause (disk "
                "full, permissions, store removed) and run again."
            ) from error

    def flush(self) -> None:
        """Write everything queued and buffered, wait for it, and raise any writer error."""
        if self._thread is None:
            self.check()
            return
        marker = _Flush()
        while True:
            self.check()
            try:
                self._queue.put(marker, timeout=0.1)
                break
            except queue.Full:
                self._check_alive()
        while not marker.done.wait(timeout=0.1):
            self._check_alive()
        self.check()

    def close(self) -> None:
        """Flush, then stop the thread. The writer may be used again (it restarts)."""
        try:
            self.flush()
        finally:
            self._stop()

    def _stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive():
            self._queue.put(None)
            thread.join()
        self._thread = None

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="cachedfeatures-writer", daemon=True)
                self._thread.start()

    def _check_alive(self) -> None:
        if self._thread is not None and not self._thread.is_alive():
            self.check()
            raise WriterError(f"the writer thread of entry {self.entry.name!r} stopped unexpectedly.")

    # -- writer thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._chunks.until_aged())
            except queue.Empty:  # idle while rows are held: write those held too long
                if self._error is None:
                    self._guarded(self._chunks.write_aged)
                continue
            if item is None:
                return
            if isinstance(item, _Flush):
                if self._error is None:
                    self._guarded(self._chunks.write_all)
                item.done.set()
                continue
            if self._error is not None:
                continue  # drop: these rows stay missing, the error is reported
            self._guarded(functools.partial(self._chunks.add, *item))

    def _guarded(self, action: Callable[[], None]) -> None:
        try:
            action()
        except BaseException as error:  # kept for the caller; the thread keeps draining
            self._error = error
            self._chunks.drop()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:  # an error is already propagating: store what we have, do not mask it
            try:
                self.close()
            except WriterError:
                logger.debug("writer error while another error propagates", exc_info=True)


def _copied_rows(column: np.ndarray, take: np.ndarray) -> np.ndarray:
    """``column[take]``, with each row of an object (ragged) column copied too."""
    part: np.ndarray = column[take]
    if part.dtype == object:
        copied = np.empty(len(part), dtype=object)
        copied[:] = [np.array(row, copy=True) for row in part]
        return copied
    return part
