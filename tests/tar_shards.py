"""WebDataset-style tar shards: writing them, and a stream of their records.

A record is the members of one sample key: ``<key>.<suffix>`` members become
``{"__key__": key, suffix: bytes, ...}``. Used by ``tests/test_streams.py`` and
``benchmarks/bench_streams.py``.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info


def write_tar(path: Path, records: Iterable[tuple[str, Mapping[str, bytes]]]) -> Path:
    """Write one shard: for each ``(key, {suffix: bytes})`` the members ``<key>.<suffix>``."""
    with tarfile.open(path, "w") as tar:
        for key, members in records:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


class TarShards(IterableDataset[dict[str, Any]]):
    """Records of tar shards, undecoded: ``{"__key__", <suffix>: bytes, ...}``.

    With ``split_by_worker`` each DataLoader worker reads its own shards (as WebDataset does);
    ``stream`` reads each shard front to back without seeking (``tarfile`` mode ``"r|"``, as
    WebDataset reads a shard from a pipe). ``opened`` counts shards opened in this process.
    """

    def __init__(self, paths: list[Path], *, split_by_worker: bool = False, stream: bool = False) -> None:
        self.paths = [str(path) for path in paths]
        self.split_by_worker = split_by_worker
        self.stream = stream
        self.opened = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        paths = self.paths
        info = get_worker_info()
        if self.split_by_worker and info is not None:
            paths = paths[info.id :: info.num_workers]
        for path in paths:
            self.opened += 1
            with tarfile.open(path, "r|" if self.stream else "r") as tar:
                record: dict[str, Any] = {}
                for member in tar:
                    key, suffix = member.name.split(".", 1)
                    if record and record["__key__"] != key:
                        yield record
                        record = {}
                    record["__key__"] = key
                    file = tar.extractfile(member)
                    record[suffix] = file.read() if file is not None else b""
                if record:
                    yield record
