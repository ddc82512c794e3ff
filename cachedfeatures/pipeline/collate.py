"""Collating samples whose features (or fields) vary in length: padded batches with lengths.

``pad_collate`` works like ``torch.utils.data.default_collate``, except where the samples'
tensors differ in their first dimension (token embeddings ``(L_i, 384)``, audio frames) or are
lists of numbers (token ids): there it returns a :class:`RaggedBatch`, the rows padded to the
longest plus their lengths, or with ``nested=True`` a ``torch.nested`` jagged tensor.

A :class:`PadCollate` told which positions of the sample are ragged (``cached.pad_collate`` of a
:class:`~cachedfeatures.CachedFeatureDataset` knows them from its entry) pads those positions
in every batch, even one whose rows happen to share a length, so a training loop always gets
the same type there.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import default_collate

from cachedfeatures.format.ragged import zero_padded_base

__all__ = ["PadCollate", "RaggedBatch", "pad_collate"]

Position = tuple[Hashable, ...]


class RaggedBatch(NamedTuple):
    """Rows of different lengths as one batch: ``values`` ``(B, L_max, ...)``, padded after each
    row's end, and ``lengths`` ``(B,)`` int64. Unpacks as ``values, lengths = batch``."""

    values: torch.Tensor
    lengths: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """``(B, L_max)`` bool: ``True`` at the rows' real positions (an attention mask)."""
        positions = torch.arange(self.values.shape[1], device=self.lengths.device)
        return positions.unsqueeze(0) < self.lengths.unsqueeze(1)

    def unpadded(self) -> list[torch.Tensor]:
        """Each row without its padding (views of ``values``)."""
        return [row[:length] for row, length in zip(self.values, self.lengths.tolist(), strict=True)]

    def nested(self) -> torch.Tensor:
        """The rows as a ``torch.nested`` jagged tensor (a copy)."""
        return torch.nested.nested_tensor(self.unpadded(), layout=torch.jagged)

    def to(self, *args: Any, **kwargs: Any) -> RaggedBatch:
        """Both tensors moved or cast as ``Tensor.to`` does (lengths keep their dtype)."""
        values = self.values.to(*args, **kwargs)
        return RaggedBatch(values, self.lengths.to(values.device))

    def pin_memory(self) -> RaggedBatch:
        return RaggedBatch(self.values.pin_memory(), self.lengths.pin_memory())


def _packed(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The zero-padded buffer whose leading views ``tensors`` are, row ``k`` at ``buffer[k]``, if
    the cache's reader made one and nothing else is in it; else ``None``."""
    if not tensors:
        return None
    base = zero_padded_base(tensors[0].data_ptr())
    if base is None or base.shape[0] != len(tensors) or base.shape[1] != max(len(t) for t in tensors):
        return None
    first = tensors[0]
    if first.element_size() != base.itemsize or tuple(first.shape[1:]) != tuple(base.shape[2:]):
        return None
    stride = base.strides[0]
    for k, tensor in enumerate(tensors):
        if (
            tensor.data_ptr() != base.ctypes.data + k * stride
            or tensor.dtype != first.dtype
            or tuple(tensor.shape[1:]) != tuple(base.shape[2:])
            or not tensor.is_contiguous()
        ):
            return None
    values = torch.from_numpy(base)
    return values if values.dtype == first.dtype else values.view(first.dtype)


def _is_number_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, (int, float)) and not isinstance(item, np.generic) for item in value
    )


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return torch.tensor(value)


class PadCollate:
    """A collate function that pads rows of different lengths (see the module docstring).

    Args:
        ragged: positions in the sample (key/index paths, ``()`` for a bare tensor sample)
            padded in every batch. Other positions are padded only where their rows differ in
            length (tensors) or are lists of numbers.
        padding_value: what the padding holds. Default 0.
        nested: return ``torch.nested`` jagged tensors instead of :class:`RaggedBatch`.
    """

    def __init__(
        self, ragged: Collection[Position] = (), *, padding_value: float = 0.0, nested: bool = False
    ) -> None:
        self.ragged = frozenset(tuple(position) for position in ragged)
        self.padding_value = padding_value
        self.nested = bool(nested)

    def __call__(self, batch: Sequence[Any]) -> Any:
        return self._collate(list(batch), ())

    def pad(self, rows: Sequence[Any]) -> RaggedBatch | torch.Tensor:
        """Rows of one position (tensors, arrays or lists of numbers) as one padded batch.

        Rows a read of the cache served as leading views of one zero-padded batch buffer
        (``format.ragged.pack_padded``), in order, come back as that buffer: no copy.
        """
        tensors = [_as_tensor(row) for row in rows]
        if any(isinstance(row, list) for row in rows):  # an empty list has no dtype of its own
            typed = [t for t, row in zip(tensors, rows, strict=True) if not isinstance(row, list) or row]
            dtype = torch.promote_types(typed[0].dtype, typed[-1].dtype) if typed else torch.int64
            for t in typed:
                dtype = torch.promote_types(dtype, t.dtype)
            tensors = [t.to(dtype) for t in tensors]
        if self.nested:
            return torch.nested.nested_tensor(tensors, layout=torch.jagged)
        lengths = torch.tensor([len(t) for t in tensors], dtype=torch.int64)
        values = _packed(tensors) if self.padding_value == 0 else None
        if values is None:
            values = torch.nn.utils.rnn.pad_sequence(
                tensors, batch_first=True, padding_value=self.padding_value
            )
        return RaggedBatch(values, lengths)

    def _collate(self, items: list[Any], position: Position) -> Any:
        elem = items[0]
        if position in self.ragged:
            return self.pad(items)
        if isinstance(elem, torch.Tensor):
            shapes = {tuple(item.shape) for item in items}
            if len(shapes) > 1 and elem.ndim >= 1 and len({shape[1:] for shape in shapes}) == 1:
                return self.pad(items)
            return default_collate(items)
        if isinstance(elem, Mapping):
            return {key: self._collate([item[key] for item in items], (*position, key)) for key in elem}
        if isinstance(elem, tuple) and hasattr(elem, "_fields"):  # a namedtuple
            groups = enumerate(zip(*items, strict=True))
            return type(elem)(*(self._collate(list(group), (*position, i)) for i, group in groups))
        if _is_number_list(elem) and all(_is_number_list(item) for item in items):
            return self.pad(items)
        if isinstance(elem, (tuple, list)) and not isinstance(elem, str):
            groups = enumerate(zip(*items, strict=True))
            parts = [self._collate(list(group), (*position, i)) for i, group in groups]
            return parts if isinstance(elem, tuple) else type(elem)(parts)
        return default_collate(items)


def pad_collate(batch: Sequence[Any], *, padding_value: float = 0.0, nested: bool = False) -> Any:
    """Collate ``batch`` like ``default_collate``, padding rows of different lengths into a
    :class:`RaggedBatch` (``values``, ``lengths``; ``.mask``), or with ``nested=True`` into
    ``torch.nested`` jagged tensors. Lists of numbers (token ids) are always padded."""
    return PadCollate(padding_value=padding_value, nested=nested)(batch)
