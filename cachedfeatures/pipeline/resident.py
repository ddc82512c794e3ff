"""A whole entry held on one device, so that a hit epoch is a gather there.

The features of a frozen backbone for a dataset often fit in GPU memory (a million rows of 768
float16 is 1.5 GB). ``cached.on_device("cuda")`` copies every stored row there once, built as
``default_collate`` (or ``collate_fn``'s :class:`~cachedfeatures.pipeline.collate.BatchAssembler`)
builds one batch of all samples; each batch is then an ``index_select`` of every tensor on the
device: no reads, no collation and no copy across the bus per batch. Strings stay on the CPU,
picked by the same indices. It serves only rows already stored (it never runs the module): fill
the entry first with ``prefill()`` or an epoch of ``loader()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cachedfeatures.errors import InvalidArgumentError, RowsNotCachedError
from cachedfeatures.parse import parse_device, parse_positive_int
from cachedfeatures.pipeline.collate import RaggedBatch, move_to
from cachedfeatures.pipeline.nodes import CachedSource, Collate, Indices
from cachedfeatures.units import format_bytes

__all__ = ["DeviceFeatures"]

# Rows read (and copied to the device) at a time while the copy is made.
BLOCK_ROWS = 65536
# The copy may take at most this share of the device's free memory (CUDA).
MAX_FREE_SHARE = 0.9


@dataclass(frozen=True)
class _Strings:
    """A leaf of strings (``default_collate`` keeps them as a list, or a tuple under a tuple)."""

    values: list[str]
    as_tuple: bool

    def take(self, rows: list[int]) -> list[str] | tuple[str, ...]:
        picked = [self.values[row] for row in rows]
        return tuple(picked) if self.as_tuple else picked


def _is_strings(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(item, str) for item in value)


def _map(batch: Any, tensor: Callable[[torch.Tensor], Any], strings: Callable[[Any], Any]) -> Any:
    """``batch`` rebuilt with ``tensor`` applied to its tensors and ``strings`` to its string leaves."""
    if isinstance(batch, torch.Tensor):
        return tensor(batch)
    if isinstance(batch, (_Strings, str)) or _is_strings(batch):
        return strings(batch)
    if isinstance(batch, RaggedBatch):
        raise InvalidArgumentError(
            "on_device() holds fixed-shape rows only; serve an entry with variable-length arrays "
            "with loader(device=...)."
        )
    if isinstance(batch, Mapping):
        return {key: _map(value, tensor, strings) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_map(value, tensor, strings) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map(value, tensor, strings) for value in batch)
    raise InvalidArgumentError(
        f"on_device() cannot hold a batch part of type {type(batch).__name__}; use loader(device=...)."
    )


def _pairs(target: Any, block: Any) -> Iterator[tuple[Any, Any]]:
    """The leaves of ``target`` (the copy's structure) beside the same leaves of ``block``."""
    if isinstance(target, (torch.Tensor, _Strings)):
        yield target, block
    elif isinstance(target, Mapping):
        for key, value in target.items():
            yield from _pairs(value, block[key])
    else:
        for value, part in zip(target, block, strict=True):
            yield from _pairs(value, part)


class DeviceFeatures:
    """Every stored row of a cached dataset on one device, served as batches by gathers there.

    Made by :meth:`CachedFeatureDataset.on_device() <cachedfeatures.CachedFeatureDataset.on_device>`
    (see there). :meth:`batches` gives the batches a ``cached.loader(batch_size, shuffle=...,
    seed=...)`` epoch gives, in the same order (with ``views=K``, the same views), already on the
    device; :meth:`batch` the batch of any sample indices.

    Raises:
        RowsNotCachedError: some rows are not stored yet (fill the entry first).
        InvalidArgumentError: the copy does not fit the device's free memory, or the entry has
            variable-length arrays.
    """

    def __init__(
        self, cached: CachedSource, device: str | torch.device = "cuda", collate_fn: Collate | None = None
    ) -> None:
        self.cached = cached
        self.device = parse_device(device)
        self._assemble = cached.batch_assembler(collate_fn)
        entry = cached.hit_reader().entry
        rows = np.setdiff1d(np.arange(entry.num_rows, dtype=np.int64), entry.unused_rows())
        self.nbytes = len(rows) * sum(spec.row_nbytes for spec in entry.specs)
        self._check_fits()
        self._batch = self._copy(rows, entry.num_rows)
        self._epochs = 0

    def __len__(self) -> int:
        return len(self.cached)

    def __repr__(self) -> str:
        return f"DeviceFeatures({len(self)} samples, {format_bytes(self.nbytes)} on {self.device})"

    def batch(self, indices: Any, epoch: int = 0) -> Any:
        """The batch of sample ``indices`` (with ``views=K``: their rows of ``epoch``), as
        ``collate_fn`` of their samples, its tensors on the device."""
        rows = self.cached.rows_of(np.asarray(indices, dtype=np.int64).reshape(-1), epoch)
        index = torch.from_numpy(rows).to(self.device, non_blocking=True)
        listed = rows.tolist()
        return _map(self._batch, lambda t: t.index_select(0, index), lambda s: s.take(listed))

    def batches(
        self,
        batch_size: int | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        epoch: int | None = None,
    ) -> Iterator[Any]:
        """One epoch of batches, as a ``cached.loader()`` with these arguments serves its epochs:
        the permutation of ``seed`` plus the epoch, and (with ``views=K``) the dataset's next
        epoch of views. ``epoch``: this epoch number instead of the next one. A spot check of the
        stored rows runs first, as in every loader epoch (``spot_check=``)."""
        size = self.cached.batch_size if batch_size is None else parse_positive_int("batch_size", batch_size)
        own = self._epochs if epoch is None else epoch
        self._epochs = own + 1
        # With views, the dataset counts epochs (as a loader's EpochRows does): its next one, or ``epoch``.
        view_epoch = self.cached.begin_epoch(epoch) if self.cached.views is not None else own
        if self.cached.spot_check_rows > 0:
            self.cached.spot_check()
        order = Indices(len(self.cached), shuffle, seed).order(own)
        stop = len(order) - len(order) % size if drop_last else len(order)
        for start in range(0, stop, size):
            yield self.batch(order[start : start + size], view_epoch)

    def _check_fits(self) -> None:
        if self.device.type != "cuda":
            return
        free, _total = torch.cuda.mem_get_info(self.device)
        if self.nbytes > free * MAX_FREE_SHARE:
            raise InvalidArgumentError(
                f"the entry's {format_bytes(self.nbytes)} do not fit the {format_bytes(free)} free on "
                f"{self.device}. Serve it with loader(device={str(self.device)!r}) instead, or store "
                "it smaller (dtype=torch.float16)."
            )

    def _copy(self, rows: np.ndarray, num_rows: int) -> Any:
        """Every row in ``rows`` of the entry, read a block at a time and copied into one batch
        structure on the device (row ``r`` of the entry at position ``r``)."""
        hits = self.cached.hit_reader()
        target: Any = None
        for start in range(0, len(rows), BLOCK_ROWS):
            block = rows[start : start + BLOCK_ROWS]
            read = hits.read(block)
            if not read.all_hit:
                missing = len(rows) - start - read.hits
                raise RowsNotCachedError(
                    f"at least {missing} of the {len(rows)} rows are not stored yet; on_device() serves "
                    "stored rows only. Fill them first: cached.prefill(), or an epoch of cached.loader()."
                )
            assembled = self._assemble(read.arrays)
            if target is None:
                target = _map(
                    assembled,
                    lambda t: torch.zeros((num_rows, *t.shape[1:]), dtype=t.dtype, device=self.device),
                    lambda s: _Strings([""] * num_rows, isinstance(s, tuple)),
                )
            positions = torch.from_numpy(block).to(self.device)
            listed = block.tolist()
            for leaf, part in _pairs(target, assembled):
                if isinstance(leaf, _Strings):
                    for row, value in zip(listed, part, strict=True):
                        leaf.values[row] = value
                else:
                    leaf.index_copy_(0, positions, move_to(part, self.device))
        if target is None:
            raise RowsNotCachedError("the entry holds no rows; on_device() serves stored rows only.")
        return target
