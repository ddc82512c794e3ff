"""``ChunkShuffleSampler``: shuffled epochs that read each chunk about once.

With ``shuffle=True`` a batch of 256 random rows touches up to 256 chunks, so every batch
decodes (or finds in the cache) dozens of chunks. This sampler shuffles the order of the
chunks, lays their rows end to end, and shuffles rows within windows of ``window`` chunks'
worth of rows. A window's chunks are needed only while its rows are being served, so a
chunk cache holding ``window + 1`` chunks decodes every chunk about once per epoch.

Mixing: a batch draws its rows from the few chunks of one window (``window`` chunks, or
``window + 1`` where a batch straddles two windows). When the dataset's order carries no
structure (rows stored in random order), batches are as well mixed as with a full shuffle.
When it does (for example rows sorted by class), a batch only sees the classes present in its
window's chunks: raise ``window`` (or lower ``chunk_rows``) until a window spans many
classes, or store the dataset in a shuffled order. ``tests/test_sampler.py`` measures this.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any, Literal, get_args

import numpy as np
from torch.utils.data import BatchSampler, Sampler

from cachedfeatures.errors import ArgumentTypeError, InvalidArgumentError
from cachedfeatures.parse import expected, parse_choice, parse_int, parse_positive_int
from cachedfeatures.store.ranks import discover_rank

__all__ = ["ChunkShuffleSampler", "EpochBatchSampler", "Split"]

Split = Literal["epoch", "owner"]


class ChunkShuffleSampler(Sampler[int]):
    """Shuffle chunks, then rows within windows of chunks; seeded per epoch, optionally per rank.

    Args:
        data_source: the dataset (anything with ``len``) or its length. A
            :class:`~cachedfeatures.CachedFeatureDataset` also gives ``chunk_rows``.
        chunk_rows: rows per chunk of the store; default that of ``data_source``'s entry.
        window: how many chunks' rows are shuffled together. Default 4.
        seed: the seed shared by all ranks; each epoch draws from ``(seed, epoch)``.
        shuffle: ``False`` yields rows in order (split across ranks all the same).
        world_size: split every epoch between this many ranks like ``DistributedSampler``:
            rank ``r`` gets the ``r``-th contiguous share of the epoch's order, so a chunk is
            read by one rank (two at a share's edge). Default: this process's
            (:func:`~cachedfeatures.store.ranks.discover_rank`: the initialised
            ``torch.distributed`` group, else torchrun's ``RANK``/``WORLD_SIZE``, else one rank).
        rank: this process's rank among ``world_size``; default as for ``world_size``.
        drop_last: drop the tail that does not divide evenly between ranks, instead of
            repeating rows from the start of the epoch to even the shares out.
        split: ``"epoch"`` (default) splits each epoch's order between ranks as above.
            ``"owner"`` gives every rank only the chunks it owns (chunk ``c`` to rank
            ``c % world_size``, as :class:`~cachedfeatures.ChunkOwnership` and ``prefill()``
            assign them), shuffled the same way within them every epoch: on an object store,
            where each rank stores only its own chunks, the first epoch then fills every row.
            Each rank sees the same rows every epoch (as with sharded datasets); under DDP the
            gradient still averages over all of them. Shares are evened out by repeating a rank's
            own rows (or cut to the smallest with ``drop_last``).
    """

    def __init__(
        self,
        data_source: Sized | int,
        chunk_rows: int | None = None,
        *,
        window: int = 4,
        seed: int = 0,
        shuffle: bool = True,
        world_size: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        split: Split = "epoch",
    ) -> None:
        self.num_rows = _parse_length(data_source)
        self.chunk_rows = parse_positive_int("chunk_rows", _chunk_rows_of(data_source, chunk_rows))
        self.window = parse_positive_int("window", window)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        if world_size is None or rank is None:
            found = discover_rank()
            world_size = found.world_size if world_size is None else world_size
            rank = found.rank if rank is None else rank
        self.world_size = parse_positive_int("world_size", world_size)
        self.rank = parse_int("rank", rank, minimum=0, maximum=self.world_size - 1)
        self.drop_last = bool(drop_last)
        self.split = parse_choice("split", split, get_args(Split))
        self.epoch = 0
        if self.split == "owner":
            owned = [self._owned_rows(rank) for rank in range(self.world_size)]
            self.num_samples = min(owned) if self.drop_last else max(owned)
        elif self.drop_last:
            self.num_samples = self.num_rows // self.world_size
        else:
            self.num_samples = -(-self.num_rows // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Draw the next ``__iter__`` from this epoch's seed (call it before every epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def _owned_rows(self, rank: int) -> int:
        """How many rows lie in the chunks ``rank`` owns."""
        starts = np.arange(rank, -(-self.num_rows // self.chunk_rows), self.world_size) * self.chunk_rows
        return int(np.minimum(self.chunk_rows, self.num_rows - starts).sum())

    def indices(self) -> np.ndarray:
        """This rank's row order for the current epoch."""
        n, per_chunk = self.num_rows, self.chunk_rows
        rng = np.random.default_rng([self.seed, self.epoch])
        num_chunks = -(-n // per_chunk)
        chunks = rng.permutation(num_chunks) if self.shuffle else np.arange(num_chunks)
        if self.split == "owner":
            mine = chunks[chunks % self.world_size == self.rank]
            # A rank that owns no chunk (more ranks than chunks) still yields its share, read
            # from the others' chunks (computed, not stored by it).
            return self._owned_indices(mine if len(mine) else chunks, rng)
        starts = chunks.astype(np.int64) * per_chunk
        lengths = np.minimum(per_chunk, n - starts)
        # Rows of the chunks laid end to end: position p of chunk k holds starts[k] + (p - offset[k]).
        offsets = np.cumsum(lengths) - lengths
        rows = np.arange(n, dtype=np.int64) + np.repeat(starts - offsets, lengths)
        total = self.num_samples * self.world_size
        if total > n:  # even the shares out with rows from the start of the epoch
            rows = np.concatenate([rows, np.resize(rows, total - n)])
        share: np.ndarray = rows[self.rank * self.num_samples : (self.rank + 1) * self.num_samples]
        if self.shuffle:  # rows within each window of this rank's share
            keys = rng.random(total)[self.rank * self.num_samples : (self.rank + 1) * self.num_samples]
            block = np.arange(len(share), dtype=np.int64) // (self.window * per_chunk)
            share = share[np.lexsort((keys, block))]
        return share

    def _owned_indices(self, chunks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The rows of ``chunks`` (this rank's own, in epoch order) laid end to end, shuffled
        within windows, then evened out to ``num_samples``."""
        per_chunk = self.chunk_rows
        starts = chunks.astype(np.int64) * per_chunk
        lengths = np.minimum(per_chunk, self.num_rows - starts)
        offsets = np.cumsum(lengths) - lengths
        rows: np.ndarray = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(
            starts - offsets, lengths
        )
        if self.shuffle:
            keys = rng.random(len(rows))
            block = np.arange(len(rows), dtype=np.int64) // (self.window * per_chunk)
            rows = rows[np.lexsort((keys, block))]
        if len(rows) == 0:
            return rows
        evened: np.ndarray = np.resize(rows, self.num_samples)
        return evened

    def __repr__(self) -> str:
        split = ", split='owner'" if self.split == "owner" else ""
        return (
            f"ChunkShuffleSampler({self.num_rows} rows, chunk_rows={self.chunk_rows}, window={self.window}, "
            f"seed={self.seed}, shuffle={self.shuffle}, rank={self.rank}/{self.world_size}{split})"
        )


def _parse_length(data_source: object) -> int:
    what = "a dataset (with len) or a length (an int >= 0)"
    if isinstance(data_source, (int, np.integer)) and not isinstance(data_source, bool):
        return parse_int("data_source", data_source, minimum=0, what=what)
    if isinstance(data_source, Sized):
        return len(data_source)
    raise ArgumentTypeError(expected(f"data_source to be {what}", data_source))


def _chunk_rows_of(data_source: object, chunk_rows: int | None) -> Any:
    if chunk_rows is not None:
        return chunk_rows
    entry = getattr(data_source, "entry", None)
    if entry is not None and hasattr(entry, "chunk_rows"):
        return entry.chunk_rows
    if isinstance(data_source, Sized) and len(data_source) == 0:
        return 1
    raise InvalidArgumentError(
        expected(
            "chunk_rows, the store's rows per chunk",
            chunk_rows,
            "Pass it, or pass a CachedFeatureDataset itself as data_source: it is read from its entry.",
        )
    )


class EpochBatchSampler(BatchSampler):
    """A ``BatchSampler`` whose ``set_epoch`` reaches the sampler of rows it batches (a
    :class:`ChunkShuffleSampler` or ``DistributedSampler`` orders each epoch by it)."""

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
