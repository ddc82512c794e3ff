"""Which process of a job this is: its rank and the world size, found one way for everyone.

Chunk ownership (:class:`~cachedfeatures.store.ownership.ChunkOwnership`), ``prefill()`` and
:class:`~cachedfeatures.ChunkShuffleSampler` all ask :func:`discover_rank`, so they never
disagree about who owns or reads what.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch.distributed as dist

__all__ = ["ProcessRank", "discover_rank"]

RankSource = Literal["process group", "environment", "single process"]


@dataclass(frozen=True)
class ProcessRank:
    """This process's ``rank`` of ``world_size``, and where that was read (``source``)."""

    rank: int
    world_size: int
    source: RankSource

    @property
    def from_process_group(self) -> bool:
        """Whether an initialised ``torch.distributed`` process group said so (collectives work)."""
        return self.source == "process group"


def discover_rank(*, environment: bool = True) -> ProcessRank:
    """The rank and world size of this process.

    From the initialised ``torch.distributed`` process group if there is one; else (with
    ``environment``, the default) from the ``RANK`` and ``WORLD_SIZE`` environment variables
    that ``torchrun`` sets (before ``init_process_group`` is called, or for jobs that never call
    it); else rank 0 of 1. Environment variables that are not a valid rank of a world size
    raise ``ValueError``. ``environment=False`` is for callers that need the process group
    itself (collectives such as ``prefill()``'s barrier).
    """
    if dist.is_available() and dist.is_initialized():
        return ProcessRank(dist.get_rank(), dist.get_world_size(), "process group")
    rank, world_size = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if not environment or (rank is None and world_size is None):
        return ProcessRank(0, 1, "single process")
    try:
        found = ProcessRank(int(rank or "0"), int(world_size or "1"), "environment")
    except ValueError:
        found = None
    if found is None or found.world_size < 1 or not 0 <= found.rank < found.world_size:
        raise ValueError(
            "Expected the environment variables RANK and WORLD_SIZE to be ints with "
            f"0 <= RANK < WORLD_SIZE (as torchrun sets them). Got RANK={rank!r}, WORLD_SIZE={world_size!r}; "
            "unset them, or set both."
        )
    return found
