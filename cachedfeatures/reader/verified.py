"""Chunk file versions already verified on this machine, so a new process need not verify them again.

Reading a checksummed chunk for the first time costs a crc32c of its bytes (its file's own
checksum) and one of its decoded rows (the checksum bound to the chunk's identity, see
:mod:`cachedfeatures.format.chunk_identity`). A training run is usually a new process, and
its first epoch paid both for every chunk. A :class:`VerifiedLog` records, per chunk file, the
version of the file that was verified and the crc32c of its rows bound to its identity; a later
process that finds the file at the same version knows its bytes are the ones verified, and
checks only that the recorded crc is one the entry accepts for the chunk now.

What a version is, and why it changes whenever the bytes do: ``(st_dev, st_ino, st_size,
st_mtime_ns, st_ctime_ns)`` of the chunk file. zarr writes a chunk by renaming a new file into
place: a new inode. A write in place changes the modification and change times; ``ctime``
cannot be set back from user space (``os.utime`` restores ``mtime`` but sets ``ctime`` to now),
so restoring a file's times after changing it still changes its version. The one gap is a
change within the file system's timestamp resolution of the version recorded (the "racy"
case git's index guards against too): a version is recorded only once both its times are
older than :data:`~cachedfeatures.reader.signatures.QUIET_NS` (two seconds where the file
system keeps whole seconds), so any later change gets a later time. An inode number reused by a
new file comes with new times, for the same reason.

The log lives outside the store (zarr warns about unknown files in a group), beside the
store's lock files (``CACHEDFEATURES_LOCK_DIR``): a per-machine cache of facts, never part of
the store's format. It is one small file per entry, written by renaming a new file into place
(merged with what is there, so a process's records are lost only to a concurrent writer: they
cost a re-verification then), and ending with a crc32c of its own: a damaged log is ignored.
Every record names its file version, so a stale or foreign record vouches for nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import weakref
from typing import Any

import google_crc32c
import numpy as np

from cachedfeatures.reader.signatures import COARSE_QUIET_NS, QUIET_NS

__all__ = ["FLUSH_EVERY_S", "VERIFIED_SUFFIX", "FileVersion", "VerifiedLog", "file_version", "is_quiet"]

logger = logging.getLogger(__name__)

# The log of entry <name> is <lock directory>/<name><VERIFIED_SUFFIX>.
VERIFIED_SUFFIX = ".verified"
_MAGIC = b"CFVERIFIED1\n"

FileVersion = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns

_RECORD = np.dtype(
    [
        ("key", "S200"),
        ("dev", "<u8"),
        ("ino", "<u8"),
        ("size", "<i8"),
        ("mtime", "<i8"),
        ("ctime", "<i8"),
        ("crc", "<u4"),
    ]
)
_MAX_KEY = 200
# The log is written at most this often (and at exit).
FLUSH_EVERY_S = 1.0


def file_version(stat: os.stat_result) -> FileVersion:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def is_quiet(version: FileVersion, now_ns: int | None = None) -> bool:
    """Whether the file's times are old enough that any later change gets a later time."""
    newest = max(version[3], version[4])
    margin = COARSE_QUIET_NS if newest % 1_000_000_000 == 0 else QUIET_NS
    return (time.time_ns() if now_ns is None else now_ns) - newest > margin


class VerifiedLog:
    """The verified chunk file versions of one entry on this machine (see the module docstring).

    Args:
        path: the log's file; ``None``: remember nothing beyond this process.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else os.fspath(path)
        self._records: dict[str, tuple[FileVersion, int]] = {}
        self._new: dict[str, tuple[FileVersion, int]] = {}  # not written yet (the same dict throughout)
        self._loaded = False
        self._flushed: float | None = None  # time.monotonic() of the last write
        self._lock = threading.Lock()  # the reader's threads look up and record side by side
        if self.path is not None:  # what is left at exit is written then (not by forked workers)
            weakref.finalize(self, _write_new, self.path, self._new)

    def vouched(self, key: str, version: FileVersion) -> int | None:
        """The identity-bound crc of ``key``'s rows if its file at ``version`` was verified, else ``None``."""
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self._load()
        found = self._records.get(key)
        if found is None or found[0] != version:
            return None
        return found[1]

    def record(self, key: str, version: FileVersion, crc: int) -> None:
        """Remember that ``key``'s file at ``version`` was verified, its rows' crc being ``crc``.

        Kept (for this process too) only if the version is quiet (see :func:`is_quiet`): a
        change within the timestamp resolution of a recent version could leave it as it was.
        """
        if not is_quiet(version):
            return
        with self._lock:
            self._records[key] = (version, crc)
            if self.path is not None and len(key.encode()) <= _MAX_KEY:
                self._new[key] = (version, crc)

    def flush(self, force: bool = False) -> None:
        """Write the records made since the last write (merged with the file's), at most once per
        :data:`FLUSH_EVERY_S` unless ``force``; never raises. (The whole file is rewritten: a
        write per batch would cost a first epoch over many chunks the square of their number.)"""
        if not self._new or self.path is None:
            return
        now = time.monotonic()
        if not force and self._flushed is not None and now - self._flushed < FLUSH_EVERY_S:
            return
        self._flushed = now
        _write_new(self.path, self._new)

    def _load(self) -> None:
        try:
            found = {} if self.path is None else _read(self.path)
        except OSError:
            found = {}
        found.update(self._records)
        self._records = found
        self._loaded = True


def _write_new(path: str, new: dict[str, tuple[FileVersion, int]]) -> None:
    """Merge ``new`` into the log at ``path`` and empty it; never raises."""
    if not new:
        return
    records = dict(new)
    new.clear()
    try:
        _write(path, {**_read(path), **records})
    except OSError as error:  # a read-only or missing lock directory: verify again next time
        logger.debug("cachedfeatures: cannot write %s: %s", path, error)


def _read(path: str) -> dict[str, tuple[FileVersion, int]]:
    """The records in the log at ``path``; ``{}`` if it is absent or damaged."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return {}
    body, stored = data[:-4], data[-4:]
    if (
        len(data) < len(_MAGIC) + 4
        or not body.startswith(_MAGIC)
        or google_crc32c.value(body) != int.from_bytes(stored, "little")
        or (len(body) - len(_MAGIC)) % _RECORD.itemsize
    ):
        return {}
    records = np.frombuffer(body, dtype=_RECORD, offset=len(_MAGIC))
    return {
        bytes(r["key"]).decode(): (
            (int(r["dev"]), int(r["ino"]), int(r["size"]), int(r["mtime"]), int(r["ctime"])),
            int(r["crc"]),
        )
        for r in records
    }


def _write(path: str, records: dict[str, tuple[FileVersion, int]]) -> None:
    table = np.zeros(len(records), dtype=_RECORD)
    for i, (key, (version, crc)) in enumerate(records.items()):
        table[i] = (key.encode(), *version, crc)
    body = _MAGIC + table.tobytes()
    data: Any = body + google_crc32c.value(body).to_bytes(4, "little")
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".verified-")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
