"""A process's scratch file on local disk for decoded chunks: page cache, not private memory.

A compressed entry whose decoded size passes the chunk cache's budget cannot be held whole in
this process's memory, and a shuffled read of it past a smaller cache decodes a whole chunk
(thousands of rows) for almost every row it serves. A :class:`Scratch` holds the decoded entry
instead in a file of its own, mapped shared: each chunk is decoded into it once, and rows are
then gathered from it as from a memmap. Its pages are the kernel's page cache (written back and
dropped under memory pressure, read again from disk when needed), so it costs disk space and
page cache, as raw chunk files do, rather than the budget given for this process's memory.

The file is made unlinked (``O_TMPFILE``, or removed at once where that is missing): nothing
outlives the process, a ``SIGKILL`` included, and no other process can open it. Its blocks are
allocated up front (``posix_fallocate``), so a full disk refuses the scratch file at its start,
never a write into the mapping later (which would be a ``SIGBUS``); so only on local file
systems whose ``fallocate`` reserves the blocks (ext4, xfs, btrfs, and overlays of them), never
on one held in memory (``tmpfs``), where it would cost the memory the budget was meant to keep
free, nor on network or FUSE file systems, where ``posix_fallocate`` may only pretend. It is made
only where it takes at most half the free space, shared out between DataLoader workers (each
makes its own, so each may take ``1 / (2 * num_workers)`` of it). The directory is
``$CACHEDFEATURES_SPILL_DIR``, else the temporary directory; ``CACHEDFEATURES_SPILL_DIR=off``
turns scratch files off (compressed chunks past the cache are then decoded on every read).
Linux only (``posix_fallocate``, ``/proc/self/mounts``): elsewhere there is no scratch file.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np

__all__ = ["SPILL_DIR_ENV", "Scratch", "spill_directory"]

logger = logging.getLogger(__name__)

SPILL_DIR_ENV = "CACHEDFEATURES_SPILL_DIR"
_OFF = "off"
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # how /proc/self/mounts writes space, tab, newline, backslash
# Local file systems whose fallocate allocates real blocks (not memory, not emulated by
# writing every block, not a promise a copy-on-write pool may break): only there a scratch file.
SCRATCH_FILE_SYSTEMS = frozenset({"ext4", "ext3", "xfs", "btrfs", "overlay", "f2fs", "bcachefs"})


def spill_directory() -> str | None:
    """Where scratch files go: ``$CACHEDFEATURES_SPILL_DIR``, else the temporary directory;
    ``None`` where that variable says ``off``."""
    value = os.environ.get(SPILL_DIR_ENV)
    if value is not None and value.strip().lower() == _OFF:
        return None
    return value or tempfile.gettempdir()


def file_system_type(path: str) -> str | None:
    """The type of the file system holding ``path`` (``/proc/self/mounts``), or ``None``."""
    real = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[1])
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return None
    return kind


class Scratch:
    """``size`` bytes of an unlinked, preallocated file, mapped shared; :meth:`array` lays
    arrays out in it. Freed when the last array viewing it goes (and at the latest with the
    process)."""

    def __init__(self, buffer: mmap.mmap, size: int) -> None:
        self._buffer = buffer
        self.size = size
        self._used = 0

    @classmethod
    def create(cls, size: int, directory: str | None, share: int = 1) -> Scratch | None:
        """A scratch file of ``size`` bytes in ``directory``, or ``None`` (logged) where there
        is none to be had there (see the module: another file system, no room, not Linux).
        ``share``: the processes that may each make one (DataLoader workers)."""
        if directory is None or size <= 0 or not hasattr(os, "posix_fallocate"):
            return None
        try:
            free = shutil.disk_usage(directory).free
        except OSError as error:  # a typo in the variable, most likely: say so
            logger.warning(
                "no scratch file for decoded chunks in %s (%s): set %s to an existing directory",
                directory,
                error,
                SPILL_DIR_ENV,
            )
            return None
        kind = file_system_type(directory)
        if kind not in SCRATCH_FILE_SYSTEMS:
            logger.info(
                "no scratch file for decoded chunks in %s: a %s file system (set %s to a directory "
                "on a local disk: %s)",
                directory,
                kind,
                SPILL_DIR_ENV,
                ", ".join(sorted(SCRATCH_FILE_SYSTEMS)),
            )
            return None
        if size > free // (2 * max(1, share)):
            logger.info(
                "no scratch file for decoded chunks in %s: %d bytes would take more than %s of its "
                "%d free bytes (set %s to a directory with more room)",
                directory,
                size,
                "half" if share <= 1 else f"a share of half between {share} workers",
                free,
                SPILL_DIR_ENV,
            )
            return None
        try:
            fd = _unlinked_file(directory)
        except OSError as error:
            logger.info("no scratch file for decoded chunks in %s: %s", directory, error)
            return None
        try:
            os.posix_fallocate(fd, 0, size)
            buffer = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as error:  # no room after all (another process took it), or no mapping
            logger.info("no scratch file for decoded chunks in %s: %s", directory, error)
            return None
        finally:
            os.close(fd)  # the mapping holds the file
        return cls(buffer, size)

    def array(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A new array of ``shape`` and ``dtype`` in the next unused bytes (page-aligned)."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        start = self._used
        if start + nbytes > self.size:
            raise ValueError(f"scratch file of {self.size} bytes has no room for {nbytes} more")
        if nbytes == 0:
            return np.empty(shape, dtype=dtype)
        self._used = _page_aligned(start + nbytes)
        rows = np.frombuffer(self._buffer, dtype=dtype, count=nbytes // dtype.itemsize, offset=start)
        return rows.reshape(shape)

    @staticmethod
    def nbytes(layouts: list[tuple[tuple[int, ...], np.dtype[Any]]]) -> int:
        """The size of a scratch file holding arrays of these shapes and dtypes."""
        total = 0
        for shape, dtype in layouts:
            total = _page_aligned(total + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        return total


def _page_aligned(offset: int) -> int:
    return -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE


def _unlinked_file(directory: str) -> int:
    """A new file in ``directory`` that no name leads to, open for reading and writing."""
    flag = getattr(os, "O_TMPFILE", 0)
    if flag:
        with contextlib.suppress(OSError):  # a file system without O_TMPFILE: the way below
            return os.open(directory, flag | os.O_RDWR, 0o600)
    fd, path = tempfile.mkstemp(prefix="cachedfeatures-scratch-", dir=directory)
    os.unlink(path)
    return fd
