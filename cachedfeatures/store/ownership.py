"""Chunk ownership: on stores without locks, each chunk has exactly one writer.

A chunk write is read-modify-write. On a local filesystem, per-chunk file locks serialise
writers (``cachedfeatures.store.locks``). Object stores (S3, GCS through fsspec) have no locks, so
two processes writing rows of one chunk can each overwrite the other's rows. The rule there:
every chunk has exactly one writer. Writers declare which chunks they own with a
:class:`ChunkOwnership` (``rank`` of ``world_size``, chunk ``c`` owned by rank
``c % world_size``); rows of other chunks are computed and served, never stored. Where no
ownership is given, a process that is one rank of several (:func:`ranks_ownership`) owns the
chunks of its rank on such a store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cachedfeatures.errors import ArgumentTypeError, InvalidArgumentError
from cachedfeatures.parse import expected, parse_int
from cachedfeatures.store.ranks import discover_rank

__all__ = ["ChunkOwnership", "parse_ownership", "ranks_ownership"]


@dataclass(frozen=True)
class ChunkOwnership:
    """This writer owns the chunks ``c`` with ``c % world_size == rank``.

    Args:
        rank: this writer's index, ``0 <= rank < world_size``.
        world_size: how many writers share the store.
    """

    rank: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("rank", "world_size"):
            parse_int(name, getattr(self, name), strict_type=True)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise InvalidArgumentError(
                f"Expected 0 <= rank < world_size. Got rank={self.rank}, world_size={self.world_size}."
            )

    @classmethod
    def from_env(cls) -> ChunkOwnership:
        """This process's ownership, from :func:`~cachedfeatures.store.ranks.discover_rank`: the
        initialised process group, else torchrun's ``RANK`` and ``WORLD_SIZE``, else ``0`` of ``1``."""
        found = discover_rank()
        return cls(found.rank, found.world_size)

    def split(self, part: int, parts: int) -> ChunkOwnership:
        """The share of ``part`` of ``parts`` (say DataLoader workers) of this writer's chunks.

        Chunk ``c`` goes to this writer if ``c % world_size == rank``, then to part
        ``(c // world_size) % parts``: together, ``rank + world_size * part`` of
        ``world_size * parts``.
        """
        return ChunkOwnership(self.rank + self.world_size * part, self.world_size * parts)

    def chunks(self, num_chunks: int) -> list[int]:
        """The chunks this writer owns among ``range(num_chunks)``."""
        return list(range(self.rank, num_chunks, self.world_size))

    def owned_rows(self, rows: np.ndarray, chunk_rows: int) -> np.ndarray:
        """A boolean mask over ``rows``: which of them lie in a chunk this writer owns."""
        mask: np.ndarray = (np.asarray(rows, dtype=np.int64) // chunk_rows) % self.world_size == self.rank
        return mask


def ranks_ownership() -> ChunkOwnership | None:
    """This rank's chunks when the process is one of several ranks (a process group, or
    torchrun's ``RANK``/``WORLD_SIZE``); ``None`` for a single process.

    What a dataset on a store without file locks uses when no ``owned_chunks`` was given, so
    that ranks training under DDP never write one chunk from two processes.
    """
    found = discover_rank()
    return None if found.world_size == 1 else ChunkOwnership(found.rank, found.world_size)


def parse_ownership(value: object) -> ChunkOwnership | None:
    """``None`` (this process writes every chunk) or a :class:`ChunkOwnership`."""
    if value is None or isinstance(value, ChunkOwnership):
        return value
    raise ArgumentTypeError(
        expected(
            "owned_chunks to be None or a ChunkOwnership(rank, world_size)",
            value,
            "Under torchrun, pass ChunkOwnership.from_env().",
        )
    )
