"""Collating samples whose features (or fields) vary in length: padded batches with lengths.

``pad_collate`` works like ``torch.utils.data.default_collate``, except where the samples'
tensors differ in their first dimension (token embeddings ``(L_i, 384)``, audio frames) or are
lists of numbers (token ids): there it returns a :class:`RaggedBatch`, the rows padded to the
longest plus their lengths, or with ``nested=True`` a ``torch.nested`` jagged tensor.

A :class:`PadCollate` told which positions of the sample are ragged (``cached.pad_collate`` of a
:class:`~cachedfeatures.CachedFeatureDataset` knows them from its entry) pads those positions
in every batch, even one whose rows happen to share a length, so a training loop always gets
the same type there.

A :class:`BatchAssembler` makes those batches straight from an entry's stored columns (one
array per output and field, a row per sample), rebuilding the sample's structure once around
batch tensors instead of building one sample per row and stacking them again: exactly what
``default_collate`` (or a ``PadCollate``) gives for the samples, at the cost of a view per column.

:func:`carry_batch` lets the samples of a plain ``DataLoader(cached, batch_size=B)`` take the
same shortcut: their first sample carries the batch, which ``default_collate`` (through a
collate function registered in ``default_collate_fn_map``, torch's documented way to extend it)
or a ``PadCollate`` returns instead of stacking the samples again.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import default_collate
from torch.utils.data._utils.collate import collate, default_collate_fn_map

from cachedfeatures.compute.layout import OutputLayout, SampleLayout
from cachedfeatures.format.ragged import zero_padded_base
from cachedfeatures.format.specs import ArraySpec

__all__ = ["BatchAssembler", "PadCollate", "RaggedBatch", "carry_batch", "move_to", "pad_collate"]

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
        non_blocking = bool(kwargs.get("non_blocking", False))
        return RaggedBatch(values, self.lengths.to(values.device, non_blocking=non_blocking))

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
        if batch and type(batch[0]) in _PLAIN:  # samples that carry their batch (carry_batch)
            carried = _carried_batch(batch, self)
            if carried is not _NOT_CARRIED:
                return carried
            batch = [_plain(batch[0]), *batch[1:]]
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


# ---------------------------------------------------------------------------------------
# Batches straight from stored columns

Columns = Mapping[str, np.ndarray]
_Build = Callable[[Columns], Any]
# Field kinds whose stored column is, as a tensor, what default_collate makes of the values.
_AS_TENSOR = frozenset({"tensor", "ndarray", "int", "float", "bool"})


class BatchAssembler:
    """The collated batch of stored columns, without a sample per row.

    ``assembler(columns)`` equals ``collate(samples)``, where ``samples`` are the rows of
    ``columns`` rebuilt one by one (``SampleLayout.build_many``) and ``collate`` is
    ``default_collate`` (``pad=None``) or the :class:`PadCollate` ``pad``: the same containers
    (a tuple or list sample becomes a list, a dict a dict), tensors of the same dtypes and
    shapes (``torch.from_numpy`` of each column: ints int64, floats float64, bools bool),
    strings as the list (or, inside a tuple or list, the tuple) ``default_collate`` gives, and
    ragged positions as ``pad.pad`` makes them. Use :meth:`of` to get one only where that holds.

    Tensors share memory with ``columns``, which must be the caller's own (a read's copies).

    Args:
        sample: the entry's sample layout.
        outputs: the entry's output layout.
        pad: the :class:`PadCollate` the batch stands for; ``None`` for ``default_collate``.
    """

    def __init__(self, sample: SampleLayout, outputs: OutputLayout, pad: PadCollate | None = None) -> None:
        self.sample = sample
        self.outputs = outputs
        self.pad = pad
        self._fields = {spec.name: spec for spec in sample.fields}
        self.containers: set[Position] = set()  # positions of tuples, lists and dicts
        self.number_lists: set[Position] = set()  # lists of plain numbers only, as PadCollate sees them
        self.ragged: set[Position] = set()  # positions of ragged (variable-length) arrays
        self._build = self._compile(sample.template, (), None)

    @classmethod
    def of(cls, collate_fn: object, sample: SampleLayout, outputs: OutputLayout) -> BatchAssembler | None:
        """The assembler that stands for ``collate_fn``, or ``None`` where none does.

        ``default_collate`` of an entry without ragged arrays, or a plain :class:`PadCollate`
        that pads every ragged position (``cached.pad_collate``) and names no tuple, list or
        dict position. Anything else (a collate of the user's) needs the samples themselves.
        """
        if collate_fn is default_collate:
            assembler = cls(sample, outputs)
            return None if assembler.ragged else assembler
        if type(collate_fn) is PadCollate:
            assembler = cls(sample, outputs, collate_fn)
            if (
                assembler.ragged <= collate_fn.ragged
                and not collate_fn.ragged & assembler.containers
                and not assembler.number_lists  # PadCollate pads [3, True] as one ragged row
            ):
                return assembler
        return None

    def __call__(self, columns: Columns) -> Any:
        return self._build(columns)

    def __getstate__(self) -> tuple[SampleLayout, OutputLayout, PadCollate | None]:
        return self.sample, self.outputs, self.pad  # the compiled closures are made again

    def __setstate__(self, state: tuple[SampleLayout, OutputLayout, PadCollate | None]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    def _compile(self, node: Mapping[str, Any], position: Position, parent: str | None) -> _Build:
        """``node`` of the sample template, at ``position``, as a function of the columns."""
        kind = node["kind"]
        if kind == "input":
            return self._compile_outputs(position)
        if kind == "field":
            return self._leaf(self._fields[node["name"]], position, parent, field=True)
        self.containers.add(position)
        if kind == "list" and all(
            item["kind"] == "field" and self._fields[item["name"]].kind in ("int", "float", "bool")
            for item in node["items"]
        ):
            self.number_lists.add(position)
        keys = node["keys"] if kind == "dict" else range(len(node["items"]))
        parts = [
            (key, self._compile(item, (*position, key), kind))
            for key, item in zip(keys, node["items"], strict=True)
        ]
        if kind == "dict":
            return lambda columns: {key: part(columns) for key, part in parts}
        builds = [part for _, part in parts]
        return lambda columns: [build(columns) for build in builds]  # default_collate: a list

    def _compile_outputs(self, position: Position) -> _Build:
        layout = self.outputs
        if layout.kind == "tensor":
            return self._leaf(layout.arrays[0], position, None, field=False)
        self.containers.add(position)
        parts = [
            (key, self._leaf(spec, (*position, key), layout.kind, field=False))
            for key, spec in zip(layout.keys, layout.arrays, strict=True)
        ]
        if layout.kind == "dict":
            return lambda columns: {key: part(columns) for key, part in parts}
        builds = [part for _, part in parts]
        return lambda columns: [build(columns) for build in builds]

    def _leaf(self, spec: ArraySpec, position: Position, parent: str | None, *, field: bool) -> _Build:
        """One output or field: its column as ``collate`` makes it of the column's rows."""
        name = spec.name
        if spec.ragged:
            self.ragged.add(position)
        pad = self.pad
        if pad is not None and position in pad.ragged:
            values: Callable[[np.ndarray], list[Any]]
            if field:
                values = spec.rows_to_values
            elif spec.ragged:
                values = spec.numpy_to_tensors
            else:
                values = lambda column: list(spec.numpy_to_tensor(column).unbind(0))  # noqa: E731
            return lambda columns: pad.pad(values(columns[name]))
        if spec.ragged:  # ``of`` refuses this assembler: default_collate cannot stack the rows
            return lambda columns: default_collate(spec.rows_to_values(columns[name]))
        if not field:
            return lambda columns: spec.numpy_to_tensor(_own(columns[name]))
        if spec.kind in _AS_TENSOR and spec.numpy_dtype.isnative:
            return lambda columns: spec.numpy_to_tensor(_own(columns[name]))
        if spec.kind == "str":
            # default_collate hands strings back as it got them: the transposed tuple under a
            # tuple or list, a list under a dict. PadCollate makes a list of every group.
            if pad is None and parent in ("tuple", "list"):
                return lambda columns: tuple(columns[name].tolist())
            return lambda columns: columns[name].tolist()
        # NumPy scalars and the rest: as the values themselves collate (rare; exact by construction)
        return lambda columns: default_collate(spec.rows_to_values(columns[name]))


def _own(column: np.ndarray) -> np.ndarray:
    """``column`` as a writable C-contiguous array (a copy only where it is not one already)."""
    if type(column) is np.ndarray and column.flags.c_contiguous and column.flags.writeable:
        return column
    return np.array(column, order="C", copy=True)


# ---------------------------------------------------------------------------------------
# Samples that carry their batch


class _Carried:
    """What the first sample of a list from :func:`carry_batch` holds: how to make the batch, and
    the other samples of the list, so that only that very list gets it."""

    __slots__ = ("build", "collate_fn", "rest")

    def __init__(self, build: Callable[[], Any], collate_fn: object, rest: tuple[Any, ...]) -> None:
        self.build = build
        self.collate_fn = collate_fn
        self.rest = rest

    def serves(self, batch: Sequence[Any], collate_fn: object) -> bool:
        """Whether ``batch`` is the list it came with (its samples, unchanged), for ``collate_fn``."""
        return (
            collate_fn is self.collate_fn
            and len(batch) == len(self.rest) + 1
            and all(map(operator.is_, itertools.islice(batch, 1, None), self.rest))
        )


class _TupleHead(tuple[Any, ...]):
    """A tuple sample that carries its batch (see :func:`carry_batch`); equal to the sample."""

    _carried: _Carried | None


class _ListHead(list[Any]):
    """A list sample that carries its batch (see :func:`carry_batch`); equal to the sample."""

    _carried: _Carried | None


class _DictHead(dict[Any, Any]):
    """A dict sample that carries its batch (see :func:`carry_batch`); equal to the sample."""

    _carried: _Carried | None


class _TensorHead(torch.Tensor):
    """A tensor sample that carries its batch (see :func:`carry_batch`); operations on it give
    plain tensors."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]
    _carried: _Carried | None


_HEADS: dict[type, Callable[[Any], Any]] = {
    tuple: _TupleHead,
    list: _ListHead,
    dict: _DictHead,
    torch.Tensor: lambda tensor: tensor.as_subclass(_TensorHead),
}
_PLAIN: dict[type, Callable[[Any], Any]] = {
    _TupleHead: tuple,
    _ListHead: list,
    _DictHead: dict,
    _TensorHead: lambda tensor: tensor.as_subclass(torch.Tensor),
}
_NOT_CARRIED = object()


def carry_batch(samples: list[Any], build: Callable[[], Any], collate_fn: object) -> list[Any]:
    """``samples``, their first one replaced by an equal sample that carries ``build``.

    ``collate_fn`` (``default_collate`` or a :class:`PadCollate`) of this list, unchanged, then
    returns ``build()`` instead of collating the samples: it must be what ``collate_fn`` gives for
    them (a :class:`BatchAssembler` of their columns). Any other use of the list, or a second
    collate of it, collates the samples as they are. For a list that goes straight to
    ``collate_fn`` (a DataLoader's fetcher): anyone else would see a first sample of a subclass
    of its type. Samples other than tensors, tuples, lists and dicts are left as they are.
    """
    if not samples:
        return samples
    make = _HEADS.get(type(samples[0]))
    if make is None:
        return samples
    head = make(samples[0])
    head._carried = _Carried(build, collate_fn, tuple(samples[1:]))
    samples[0] = head
    return samples


def _carried_batch(batch: Sequence[Any], collate_fn: object) -> Any:
    """The batch that ``batch[0]`` carries, once, if ``batch`` is its list and for ``collate_fn``;
    else ``_NOT_CARRIED`` (also where making it fails: collating the samples raises the error
    that ``collate_fn`` gives for them)."""
    head = batch[0]
    carried, head._carried = head._carried, None
    if carried is not None and carried.serves(batch, collate_fn):
        try:
            return carried.build()
        except Exception:
            pass
    return _NOT_CARRIED


def _plain(head: Any) -> Any:
    """The sample a head stands for, as its own type."""
    return _PLAIN[type(head)](head)


_CollateMap = dict[type | tuple[type, ...], Callable[..., Any]]


def _collate_head(batch: Sequence[Any], *, collate_fn_map: _CollateMap | None = None) -> Any:
    """``default_collate_fn_map``'s entry for a head: the batch it carries, or the samples collated."""
    if collate_fn_map is default_collate_fn_map:
        carried = _carried_batch(batch, default_collate)
        if carried is not _NOT_CARRIED:
            return carried
    else:
        batch[0]._carried = None
    return collate([_plain(batch[0]), *batch[1:]], collate_fn_map=collate_fn_map)


default_collate_fn_map.update(dict.fromkeys(_PLAIN, _collate_head))


def move_to(batch: Any, device: torch.device, *, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor on ``device`` (containers rebuilt, other values as they are).

    With ``non_blocking`` the copies from pinned memory to a CUDA device are asynchronous, on the
    current stream, so kernels that use the batch run after them.
    """
    if isinstance(batch, (torch.Tensor, RaggedBatch)):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {key: move_to(value, device, non_blocking=non_blocking) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to(value, device, non_blocking=non_blocking) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(value, device, non_blocking=non_blocking) for value in batch)
    return batch
