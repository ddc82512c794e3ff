"""How samples and module outputs map onto arrays in the store.

A :class:`SampleLayout` is learnt from one probe sample. It knows which field feeds the
module (``input_key``), which other leaves are passthrough fields stored beside the
features, and how to rebuild a sample of the same structure from stored rows, so a hit
never needs the wrapped dataset. An :class:`OutputLayout` does the same for what the module
returns: one tensor, or a tuple or dict of tensors, each stored in its own array.

Both are plain data that serialise to JSON, so they live in the entry's Zarr attributes; the
arrays themselves are described by :class:`~cachedfeatures.format.specs.ArraySpec`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from cachedfeatures.compute.calls import non_tensor_output_message
from cachedfeatures.errors import (
    ArgumentTypeError,
    FieldNameError,
    FieldNotStorableError,
    InputKeyError,
    ModuleOutputError,
    OutputShapeError,
)
from cachedfeatures.format.names import FEATURES, RESERVED, offsets_name, values_name
from cachedfeatures.format.specs import (
    ArraySpec,
    Path,
    check_utf8,
    field_spec,
    number_list_dtype,
    tensor_spec,
    unstorable,
)
from cachedfeatures.parse import expected

InputKey = int | str | Callable[[Any], Any]
# Names for passthrough fields: {position or key (or a tuple path into nested samples): name},
# or one name per item of a tuple sample (None keeps the automatic name).
FieldNames = Mapping[int | str | tuple[int | str, ...], str] | Sequence[str | None]


def parse_input_key(input_key: object) -> InputKey:
    """An int index, a dict key (str) or a callable ``sample -> input``."""
    if callable(input_key) or (isinstance(input_key, (int, str)) and not isinstance(input_key, bool)):
        return input_key  # type: ignore[return-value]
    raise ArgumentTypeError(
        expected("input_key to be an int index, a dict key (str) or a callable sample -> input", input_key)
    )


# ---------------------------------------------------------------------------------------
# The sample's structure


@dataclass(frozen=True)
class SampleLayout:
    """Where the input and the passthrough fields sit in a sample, and how to rebuild one.

    ``template`` is a JSON tree: ``{"kind": "input"}``, ``{"kind": "field", "name": ...}``,
    ``{"kind": "tuple"|"list", "items": [...]}`` or ``{"kind": "dict", "keys": [...],
    "items": [...]}``. Fields read by a callable ``input_key`` other than the first are left
    out of the rebuilt sample: their content is folded into the features.
    """

    template: dict[str, Any]
    fields: tuple[ArraySpec, ...]
    field_paths: tuple[Path, ...]
    input_key: InputKey

    def to_json(self) -> dict[str, Any]:
        """What an entry's attrs keep of it (``"sample"``); the specs are the entry's arrays."""
        return {
            "template": self.template,
            "fields": [spec.name for spec in self.fields],
            "field_paths": [list(path) for path in self.field_paths],
        }

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], specs: Mapping[str, ArraySpec], input_key: InputKey
    ) -> SampleLayout:
        """The layout :meth:`to_json` kept, its fields' specs looked up in ``specs`` by name."""
        return cls(
            template=data["template"],
            fields=tuple(specs[name] for name in data["fields"]),
            field_paths=tuple(tuple(path) for path in data["field_paths"]),
            input_key=input_key,
        )

    @classmethod
    def from_sample(
        cls,
        sample: Any,
        input_key: InputKey,
        field_names: FieldNames | None = None,
        *,
        others: Sequence[Any] = (),
        ragged: Collection[str] = (),
    ) -> SampleLayout:
        """The layout of ``sample``; lists of plain numbers become ragged fields.

        ``field_names`` names its passthrough fields' arrays (by default a dict key names its
        field, a tuple position ``i`` gives ``field_i``). A tensor or array field whose first
        dimension differs between ``sample`` and ``others`` (more samples of the dataset, e.g.
        its probes), or whose name is in ``ragged``, is ragged too: stored unpadded, any length
        along its first dimension.
        """
        input_paths = _input_paths(sample, input_key)
        given = _given_names(field_names, input_paths)
        fields: list[ArraySpec] = []
        paths: list[Path] = []
        taken: set[str] = set(RESERVED) | set(given.values())

        def walk(value: Any, path: Path) -> dict[str, Any] | None:
            if path in input_paths:
                return {"kind": "input"} if path == input_paths[0] else None
            if isinstance(value, Mapping):
                keys = list(value.keys())
                for key in keys:
                    if not isinstance(key, (str, int)) or isinstance(key, bool):
                        raise unstorable(path, value, "dict keys must be strings or ints")
                pairs = [(key, walk(value[key], (*path, key))) for key in keys]
                kept = [(key, item) for key, item in pairs if item is not None]
                return {
                    "kind": "dict",
                    "keys": [key for key, _ in kept],
                    "items": [item for _, item in kept],
                }
            holds_input = any(p[: len(path)] == path for p in input_paths)
            if isinstance(value, list) and not holds_input and number_list_dtype(value) is not None:
                pass  # a list of numbers: one ragged field (below)
            elif isinstance(value, (tuple, list)):
                nodes = [walk(item, (*path, i)) for i, item in enumerate(value)]
                return {
                    "kind": "list" if isinstance(value, list) else "tuple",
                    "items": [node for node in nodes if node is not None],
                }
            name = given[path] if path in given else _unique_name(_field_name(path), taken)
            fields.append(field_spec(name, path, value))
            paths.append(path)
            return {"kind": "field", "name": name}

        template = walk(sample, ())
        if template is None:  # unreachable: the root is either the input or a container
            raise AssertionError("empty sample template")
        unknown = [path for path in given if path not in paths]
        if unknown:
            known = ", ".join(_describe_path(path) for path in paths) or "none"
            raise FieldNameError(
                f"Expected field_names to name passthrough fields of the sample ({known}). Got "
                f"{', '.join(_describe_path(path) for path in unknown)}, which "
                f"{'is' if len(unknown) == 1 else 'are'} not one."
            )
        for position, (spec, path) in enumerate(zip(fields, paths, strict=True)):
            fixed = spec.kind in ("tensor", "ndarray") and bool(spec.shape) and not spec.ragged
            if fixed and (spec.name in ragged or _varies_in_length(spec, path, others)):
                inner = ArraySpec(spec.name, spec.kind, spec.dtype, spec.shape[1:], spec.torch_dtype)
                fields[position] = inner.as_ragged(spec.shape[0])
        derived = {
            name
            for spec in fields
            if spec.ragged
            for name in (offsets_name(spec.name), values_name(spec.name))
        }
        clash = sorted(derived & {spec.name for spec in fields})
        if clash:
            raise FieldNotStorableError(
                f"field {clash[0]!r} has the name of the offsets or values array of a variable-length "
                "field beside it; rename one of them in the dataset."
            )
        return cls(template, tuple(fields), tuple(paths), input_key)

    def stored_names(self) -> list[list[Any]]:
        """``[[path, array name], ...]`` of the passthrough fields, JSON-ready."""
        return [[list(path), spec.name] for spec, path in zip(self.fields, self.field_paths, strict=True)]

    def extract_input(self, sample: Any) -> Any:
        """The value that feeds the module."""
        if callable(self.input_key):
            return self.input_key(sample)
        if _is_own_input(sample, self.input_key):
            return sample
        return _lookup(sample, self.input_key)

    def field_values(
        self, samples: Sequence[Any], rows: Sequence[int] | np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Each passthrough field of ``samples``, stacked into the array to store.

        ``rows`` (the samples' dataset indices) only serve to name the sample in errors.
        """
        columns: dict[str, np.ndarray] = {}
        for spec, path in zip(self.fields, self.field_paths, strict=True):
            values = []
            for sample in samples:
                value = sample
                for key in path:
                    value = value[key]
                values.append(value)
            if spec.kind == "str":
                check_utf8(values, path, rows)
            columns[spec.name] = spec.values_to_numpy(values)
        return columns

    def build(self, features: Any, fields: Mapping[str, Any]) -> Any:
        """A sample shaped like the dataset's, with the input replaced by ``features``."""
        return _build(self.template, features, fields, {s.name: s for s in self.fields})

    def build_many(self, features: Sequence[Any], fields: Mapping[str, np.ndarray]) -> list[Any]:
        """One sample per row: ``features[i]`` with row ``i`` of each stored field."""
        values = {spec.name: spec.rows_to_values(fields[spec.name]) for spec in self.fields}
        node = self.template
        if node["kind"] == "input":
            return list(features)
        items = node.get("items", [])
        if items and all(item["kind"] in ("input", "field") for item in items):  # flat: zip in C
            columns = [features if item["kind"] == "input" else values[item["name"]] for item in items]
            rows = zip(*columns, strict=True)
            if node["kind"] == "tuple":
                return list(rows)
            if node["kind"] == "list":
                return [list(row) for row in rows]
            return [dict(zip(node["keys"], row, strict=True)) for row in rows]
        row = _row_builder(node, features, values)
        return [row(i) for i in range(len(features))]


def _varies_in_length(spec: ArraySpec, path: Path, others: Sequence[Any]) -> bool:
    """Whether the field at ``path`` has another length along its first dimension in some of
    ``others`` (and otherwise the same type, dtype and trailing shape)."""
    for sample in others:
        value = sample
        try:
            for key in path:
                value = value[key]
        except (KeyError, IndexError, TypeError):
            continue
        if not isinstance(value, (torch.Tensor, np.ndarray)) or value.ndim != len(spec.shape):
            continue
        if tuple(value.shape[1:]) == spec.shape[1:] and value.shape[0] != spec.shape[0]:
            return True
    return False


def _row_builder(
    node: Mapping[str, Any], features: Sequence[Any], values: Mapping[str, list[Any]]
) -> Callable[[int], Any]:
    """``_build`` compiled once per batch into closures: row ``i`` -> its sample."""
    kind = node["kind"]
    if kind == "input":
        return features.__getitem__
    if kind == "field":
        return values[node["name"]].__getitem__
    parts = [_row_builder(item, features, values) for item in node["items"]]
    if kind == "dict":
        keys = node["keys"]
        return lambda i: dict(zip(keys, [part(i) for part in parts], strict=True))
    if kind == "list":
        return lambda i: [part(i) for part in parts]
    return lambda i: tuple([part(i) for part in parts])


def _build(
    node: Mapping[str, Any], features: Any, fields: Mapping[str, Any], specs: Mapping[str, ArraySpec]
) -> Any:
    kind = node["kind"]
    if kind == "input":
        return features
    if kind == "field":
        return specs[node["name"]].row_to_value(fields[node["name"]])
    items = [_build(item, features, fields, specs) for item in node["items"]]
    if kind == "dict":
        return dict(zip(node["keys"], items, strict=True))
    return items if kind == "list" else tuple(items)


def _lookup(sample: Any, key: int | str) -> Any:
    if isinstance(sample, Mapping):
        if key in sample:
            return sample[key]
        keys = list(sample.keys())
        hint = f"pass input_key={keys[0]!r}" if keys else "return a non-empty sample"
        raise InputKeyError(f"input_key {key!r} not in sample keys {keys}; {hint}")
    if isinstance(sample, (tuple, list)):
        if isinstance(key, int) and -len(sample) <= key < len(sample):
            return sample[key]
        raise InputKeyError(
            f"input_key {key!r} does not index a sample of {len(sample)} items; pass an int "
            f"from 0 to {len(sample) - 1}, or a callable that picks the input."
        )
    raise InputKeyError(
        f"input_key {key!r} cannot index a sample of type {type(sample).__name__}; samples must "
        "be tensors, tuples, lists or dicts, or pass a callable input_key."
    )


def _is_own_input(sample: Any, input_key: int | str) -> bool:
    """A bare tensor is its own input; so is any other sample that is not a container (a
    string, a number, an image) under the default ``input_key=0``."""
    if isinstance(sample, torch.Tensor):
        return True
    return input_key == 0 and not isinstance(sample, (Mapping, tuple, list))


def _input_paths(sample: Any, input_key: InputKey) -> tuple[Path, ...]:
    """The top-level fields that hold the input, in the order they are read."""
    if not callable(input_key) and _is_own_input(sample, input_key):
        return ((),)
    if not callable(input_key):
        _lookup(sample, input_key)
        if isinstance(sample, (tuple, list)) and isinstance(input_key, int):
            return ((input_key % len(sample),),)
        return ((input_key,),)
    read: list[Hashable] = []
    traced: Any = sample
    if isinstance(sample, Mapping):
        traced = _TracingDict(sample, read)
    elif isinstance(sample, (tuple, list)):
        traced = _TracingTuple(sample, read)
    input_key(traced)
    paths: list[Path] = []
    for key in read:
        if isinstance(key, int) and isinstance(sample, (tuple, list)):
            key %= len(sample)
        if (key,) not in paths:
            paths.append((key,))
    return tuple(paths) or ((),)


class _TracingDict(dict[Any, Any]):
    """A dict that records which keys a callable ``input_key`` reads."""

    def __init__(self, data: Mapping[Any, Any], read: list[Hashable]) -> None:
        super().__init__(data)
        self._read = read

    def __getitem__(self, key: Any) -> Any:
        self._read.append(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        if key in self:
            self._read.append(key)
        return super().get(key, default)


class _TracingTuple(tuple[Any, ...]):
    """A tuple that records which indices a callable ``input_key`` reads."""

    _read: list[Hashable]

    def __new__(cls, data: Sequence[Any], read: list[Hashable]) -> _TracingTuple:
        self = super().__new__(cls, data)
        self._read = read
        return self

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, int):
            self._read.append(index)
        return super().__getitem__(index)


def _sanitize(name: str) -> str:
    """A Zarr node name: no slashes, nothing that needs quoting in a path."""
    return re.sub(r"[^0-9A-Za-z_.\-]", "_", name)


def _field_name(path: Path) -> str:
    name = _sanitize(".".join(str(key) for key in path) or "value")
    if name[0].isdigit() or name.startswith((FEATURES, "_", ".")):
        name = f"field_{name}"
    return name


def renamed_fields(sample: Any, input_key: InputKey, field_names: FieldNames) -> str | None:
    """How ``field_names`` changes the arrays ``sample``'s fields are stored in, for the entry
    key: every field's ``[path, name]`` as JSON when some name differs from the default, else
    ``None`` (naming a field what it is called anyway leaves the entry as it was)."""
    named = SampleLayout.from_sample(sample, input_key, field_names).stored_names()
    if named == SampleLayout.from_sample(sample, input_key).stored_names():
        return None
    return json.dumps(named, default=str)


def _given_names(field_names: FieldNames | None, input_paths: Sequence[Path]) -> dict[Path, str]:
    """``field_names`` as ``{path: name}``, each name checked; a sequence's name for the input
    (``("image", "label")``) is not used: the module's outputs name the features."""
    if field_names is None:
        return {}
    pairs: list[tuple[Any, Any]]
    if isinstance(field_names, Mapping):
        pairs = list(field_names.items())
    elif isinstance(field_names, (list, tuple)):
        pairs = [((i,), name) for i, name in enumerate(field_names) if name is not None]
        pairs = [(path, name) for path, name in pairs if path not in input_paths]
    else:
        raise FieldNameError(
            "Expected field_names to be a mapping {position or key: name} or a sequence of names "
            f"(one per item of a tuple sample). Got {field_names!r}."
        )
    given: dict[Path, str] = {}
    for key, name in pairs:
        path: Path = tuple(key) if isinstance(key, tuple) else (key,)
        if not all(isinstance(k, (int, str)) and not isinstance(k, bool) for k in path):
            raise FieldNameError(
                f"Expected field_names keys to be ints, strings or tuples of them. Got {key!r}."
            )
        if path in input_paths:
            raise FieldNameError(
                f"field_names names {_describe_path(path)}, the module's input: its features are "
                "named by the module's outputs. Name only the other fields."
            )
        if not isinstance(name, str) or not _valid_field_name(name):
            raise FieldNameError(
                "Expected each field name to be letters, digits, '_', '.' or '-' starting with a letter, "
                f"neither starting with {FEATURES!r} (the outputs' names) nor one of {sorted(RESERVED)}. "
                f"Got {name!r} for {_describe_path(path)}."
            )
        if name in given.values():
            raise FieldNameError(f"Expected distinct field names. Got {name!r} twice in field_names.")
        given[path] = name
    return given


def _valid_field_name(name: str) -> bool:
    return (
        bool(name)
        and _sanitize(name) == name
        and name[0].isalpha()
        and not name.startswith(FEATURES)
        and name not in RESERVED
    )


def _describe_path(path: Path) -> str:
    return repr(path[0]) if len(path) == 1 else repr(path)


def _unique_name(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


# ---------------------------------------------------------------------------------------
# The module's outputs


@dataclass(frozen=True)
class OutputLayout:
    """The structure of the module's output: one tensor, or a tuple or dict of tensors.

    ``masks`` pairs ragged arrays the module returns padded with the key of their mask (or
    lengths) in the module's output or its input batch: only the real positions are stored.
    """

    kind: Literal["tensor", "tuple", "dict"]
    keys: tuple[str | int, ...]
    arrays: tuple[ArraySpec, ...]
    masks: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_output(
        cls,
        output: Any,
        batch_size: int,
        dtype: torch.dtype | None,
        *,
        detect_ragged: bool = False,
        per_sample: bool | None = None,
        ragged: Mapping[str, str | bool] | None = None,
        batch: Any = None,
    ) -> OutputLayout:
        """Learn the layout from one batch of module output (before storage casting).

        With ``detect_ragged``, outputs whose rows vary in length are ragged arrays: a list with
        one tensor per sample (``(L_i, ...)`` each; a tuple is always several outputs), or a
        ``torch.nested`` tensor, as the whole output or as one item of a tuple or dict.
        ``per_sample`` says whether a list output holds one tensor per sample when the caller
        knows (a list's length that follows the batch size); ``None`` judges by the shapes.

        ``ragged`` declares ragged outputs by array name (``"features"``, ``"features_<key>"``) or
        output key: ``True`` for one given as a list or nested tensor, or the key of a mask
        ``(B, T)`` or lengths ``(B,)`` tensor for one returned padded ``(B, T, ...)``. That key is
        looked up in the module's output (a dict item used so is not stored) and then in the
        collated input ``batch`` (a tokenizer's ``attention_mask``).
        """
        ragged = dict(ragged or {})
        if per_sample is None:
            per_sample = _is_per_sample_list(output, batch_size)
        per_sample = detect_ragged and per_sample and isinstance(output, list)
        mask_keys = {value for value in ragged.values() if isinstance(value, str)}
        kind, items = _output_items(_without(output, mask_keys), per_sample)
        arrays = []
        masks: list[tuple[str, str]] = []
        taken: set[str] = set()  # keys that sanitise to one name ("a b", "a_b") get _2, _3...
        for key, tensor in items:
            name = FEATURES if kind == "tensor" else _unique_name(f"{FEATURES}_{_sanitize(str(key))}", taken)
            declared = ragged.get(name, ragged.get(str(key)) if kind != "tensor" else None)
            if isinstance(declared, str):
                rows = _masked_rows(name, tensor, _find_mask(name, declared, output, batch), batch_size)
                spec = tensor_spec(name, "tensor", cast_for_storage(rows[0][0:0], dtype))
                inner = ArraySpec(spec.name, spec.kind, spec.dtype, spec.shape[1:], spec.torch_dtype)
                arrays.append(inner.as_ragged(int(rows[0].shape[0])))
                masks.append((name, declared))
                continue
            nested = isinstance(tensor, torch.Tensor) and tensor.is_nested
            if per_sample or (detect_ragged and nested) or declared is True:
                first = _ragged_rows(name, tensor, batch_size)[0]
                if first.ndim == 0:
                    raise ModuleOutputError(
                        f"module output {name!r} holds a zero-dimensional tensor per sample; a ragged "
                        "output needs at least one dimension, the one whose length varies."
                    )
                spec = tensor_spec(name, "tensor", cast_for_storage(first[0:0], dtype))
                inner = ArraySpec(spec.name, spec.kind, spec.dtype, spec.shape[1:], spec.torch_dtype)
                arrays.append(inner.as_ragged(int(first.shape[0])))
                continue
            _check_batch_dim(name, tensor, batch_size)
            arrays.append(tensor_spec(name, "tensor", cast_for_storage(tensor[0], dtype)))
        return cls(kind, tuple(key for key, _ in items), tuple(arrays), tuple(masks))

    @property
    def names_unique(self) -> bool:
        """Whether every output has an array of its own (entries written before names were made
        unique may store two outputs whose keys sanitise to one name in one array)."""
        return len({spec.name for spec in self.arrays}) == len(self.arrays)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": self.kind,
            "keys": list(self.keys),
            "arrays": [a.to_json() for a in self.arrays],
        }
        if self.masks:
            data["masks"] = {name: key for name, key in self.masks}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OutputLayout:
        arrays = tuple(ArraySpec.from_json(a) for a in data["arrays"])
        masks = tuple((str(name), str(key)) for name, key in data.get("masks", {}).items())
        return cls(data["kind"], tuple(data["keys"]), arrays, masks)

    def split(
        self,
        output: Any,
        batch_size: int,
        dtype: torch.dtype | None,
        *,
        copy: bool = True,
        batch: Any = None,
    ) -> dict[str, Any]:
        """The module's output as one CPU tensor per array, cast to the storage dtype.

        A ragged array gets a list of one ``(L_i, ...)`` tensor per row instead (one returned
        padded: its real positions, by its mask in the output or the collated input ``batch``).

        With ``copy`` (the default) each tensor is in memory of its own, never the module's (see
        :func:`_copied_out`); ``copy=False`` is for a caller that copies them out itself before
        it calls the module again.
        """
        per_sample = self.kind == "tensor" and self.arrays[0].ragged and isinstance(output, list)
        masks = dict(self.masks)
        kind, items = _output_items(_without(output, set(masks.values())), per_sample)
        if kind != self.kind or tuple(key for key, _ in items) != self.keys:
            raise OutputShapeError(
                f"the module returned a {kind} with keys {[k for k, _ in items]} but this entry "
                f"stores a {self.kind} with keys {list(self.keys)}; the module must return the "
                "same structure for every batch."
            )
        split: dict[str, Any] = {}
        for spec, (_, tensor) in zip(self.arrays, items, strict=True):
            if spec.name in masks:
                mask = _find_mask(spec.name, masks[spec.name], output, batch)
                split[spec.name] = _masked_stored(spec.name, tensor, mask, batch_size, dtype)
                continue
            if spec.ragged:
                # always copied: a ragged column holds the rows themselves, not a copy of them
                split[spec.name] = _ragged_stored(spec.name, tensor, batch_size, dtype)
                continue
            _check_batch_dim(spec.name, tensor, batch_size)
            stored = cast_for_storage(tensor, dtype).to("cpu")
            split[spec.name] = _copied_out(tensor, stored) if copy else stored
        return split

    def unbind(self, tensors: Mapping[str, Any]) -> list[Any]:
        """Per-array batch tensors as one output structure per row (views of the batch)."""
        rows = [_rows_of(tensors[spec.name]) for spec in self.arrays]
        if self.kind == "tensor":
            return list(rows[0])
        if self.kind == "tuple":
            return list(zip(*rows, strict=True))
        return [dict(zip(self.keys, row, strict=True)) for row in zip(*rows, strict=True)]

    def join(self, tensors: Mapping[str, torch.Tensor]) -> Any:
        """Per-array tensors (one row or a batch) back in the module's output structure."""
        values = [tensors[spec.name] for spec in self.arrays]
        if self.kind == "tensor":
            return values[0]
        if self.kind == "tuple":
            return tuple(values)
        return dict(zip(self.keys, values, strict=True))


def _output_items(
    output: Any, per_sample: bool = False
) -> tuple[Literal["tensor", "tuple", "dict"], list[tuple[Any, Any]]]:
    if isinstance(output, torch.Tensor) or per_sample:
        return "tensor", [(0, output)]
    if isinstance(output, (tuple, list)) and output and all(isinstance(t, torch.Tensor) for t in output):
        return "tuple", list(enumerate(output))
    if (
        isinstance(output, Mapping)
        and output
        and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in output.items())
    ):
        return "dict", list(output.items())
    raise ModuleOutputError(non_tensor_output_message(output))


def _without(output: Any, keys: Collection[str]) -> Any:
    """``output`` less the items under ``keys`` if it is a mapping (masks used, not stored)."""
    if not keys or not isinstance(output, Mapping) or not any(key in output for key in keys):
        return output
    return {key: value for key, value in output.items() if key not in keys}


def _find_mask(name: str, key: str, output: Any, batch: Any) -> torch.Tensor:
    """The mask (or lengths) ``key`` of ragged output ``name``: in the output, else the batch."""
    for where in (output, batch):
        found = where.get(key) if isinstance(where, Mapping) else None
        if isinstance(found, torch.Tensor):
            return found

    def keys_of(value: Any) -> str:
        return str(list(value.keys())) if isinstance(value, Mapping) else f"none (a {type(value).__name__})"

    raise ModuleOutputError(
        f"ragged={{{name!r}: {key!r}}}: no tensor {key!r} in the module's output (keys "
        f"{keys_of(output)}) or in its input batch (keys {keys_of(batch)}). Name the mask or "
        "lengths tensor as the module returns it, or as the collate_fn puts it in the batch."
    )


def _masked_rows(name: str, padded: Any, mask: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The real positions of each row of a padded ``(B, T, ...)`` output (on its device)."""
    flat, lengths = _masked_flat(name, padded, mask, batch_size)
    bounds = [0, *np.cumsum(lengths).tolist()]
    return [flat[bounds[k] : bounds[k + 1]] for k in range(batch_size)]


def _masked_flat(
    name: str, padded: Any, mask: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, list[int]]:
    """The real positions of a padded ``(B, T, ...)`` output, one row after the other, and the
    rows' lengths."""
    if not isinstance(padded, torch.Tensor) or padded.ndim < 2 or padded.shape[0] != batch_size:
        raise ModuleOutputError(
            f"module output {name!r} is declared padded with a mask, so it must be a tensor of shape "
            f"(batch, length, ...); got {_describe_output(padded)} for a batch of {batch_size}."
        )
    mask = mask.to(padded.device)
    if mask.ndim == 1 and not mask.is_floating_point() and mask.dtype != torch.bool:
        mask = torch.arange(padded.shape[1], device=padded.device).unsqueeze(0) < mask.unsqueeze(1)
    if tuple(mask.shape) != tuple(padded.shape[:2]):
        raise ModuleOutputError(
            f"the mask of ragged output {name!r} has shape {tuple(mask.shape)}, but the output has "
            f"shape {tuple(padded.shape)}; pass a (batch, length) mask or (batch,) integer lengths."
        )
    mask = mask.bool()
    return padded[mask], mask.sum(dim=1).tolist()


def _masked_stored(
    name: str, padded: Any, mask: torch.Tensor, batch_size: int, dtype: torch.dtype | None
) -> list[torch.Tensor]:
    """The real positions of each row of a padded output, on the CPU in the storage dtype (the
    boolean selection is new memory: never the module's)."""
    flat, lengths = _masked_flat(name, padded, mask, batch_size)
    flat = cast_for_storage(flat, dtype).to("cpu")
    bounds = [0, *np.cumsum(lengths).tolist()]
    return [flat[bounds[k] : bounds[k + 1]] for k in range(batch_size)]


def _is_per_sample_list(output: Any, batch_size: int) -> bool:
    """Whether ``output`` is a list of one tensor per sample (not a list of batched outputs)."""
    return (
        isinstance(output, list)
        and len(output) == batch_size
        and all(isinstance(t, torch.Tensor) and t.ndim >= 1 for t in output)
        and not all(t.shape[0] == batch_size for t in output)
    )


def _rows_of(column: Any) -> Sequence[Any]:
    """A batch's rows: a ragged column (a list of per-row tensors) as it is, else unbound."""
    return column if isinstance(column, list) else column.unbind(0)


def _ragged_rows(name: str, value: Any, batch_size: int) -> list[torch.Tensor]:
    """One tensor per sample of a ragged output: a list of tensors, or a nested tensor."""
    if isinstance(value, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in value):
        rows = list(value)
    elif isinstance(value, torch.Tensor) and value.is_nested:
        rows = list(value.unbind())
    else:
        raise OutputShapeError(
            f"module output {name!r} is stored as a ragged array (its rows vary in length), but the "
            f"module returned {_describe_output(value)}; return one tensor per sample (a list, or "
            "a torch.nested tensor) for every batch."
        )
    if len(rows) != batch_size:
        raise ModuleOutputError(
            f"module output {name!r} holds {len(rows)} per-sample tensors for a batch of {batch_size} "
            "inputs; a ragged output needs one tensor per input."
        )
    return rows


def _ragged_stored(name: str, value: Any, batch_size: int, dtype: torch.dtype | None) -> list[torch.Tensor]:
    """A ragged output's rows on the CPU in the storage dtype, in memory of their own (never the
    module's buffers)."""
    if isinstance(value, torch.Tensor) and value.is_nested and value.layout == torch.jagged:
        if value.size(0) != batch_size:
            _ragged_rows(name, value, batch_size)  # raises, naming the counts
        flat = value.values()
        stored = _copied_out(flat, cast_for_storage(flat, dtype).to("cpu"))
        bounds = value.offsets().to("cpu").tolist()  # type: ignore[attr-defined]
        return [stored[bounds[k] : bounds[k + 1]] for k in range(batch_size)]
    rows = []
    for row in _ragged_rows(name, value, batch_size):
        rows.append(_copied_out(row, cast_for_storage(row, dtype).to("cpu")))
    return rows


def _describe_output(output: Any) -> str:
    if isinstance(output, (tuple, list, Mapping)):
        inner = output.values() if isinstance(output, Mapping) else output
        return f"a {type(output).__name__} of {[type(v).__name__ for v in inner]}"
    return f"a {type(output).__name__}"


def _check_batch_dim(name: str, tensor: torch.Tensor, batch_size: int) -> None:
    if tensor.ndim == 0 or tensor.shape[0] != batch_size:
        raise ModuleOutputError(
            f"module output {name!r} has shape {tuple(tensor.shape)} for a batch of {batch_size} "
            "inputs; its first dimension must be the batch. If the module works on single "
            "samples, wrap it so that it maps over the batch."
        )


def _copied_out(output: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """``stored`` (``output`` cast and on the CPU) in memory of its own.

    A module may return a view of a buffer it overwrites on its next call (optimized inference
    code, CUDA graphs), so its outputs must be copied out before the next batch runs. A cast or
    a copy off the device already made one; a CPU ``.to("cpu")`` did not, so copy then (once,
    contiguous, so storing it copies nothing more).
    """
    if (
        output.device.type == "cpu"
        and stored.untyped_storage().data_ptr() == output.untyped_storage().data_ptr()
    ):
        return stored.clone(memory_format=torch.contiguous_format)
    return stored


def cast_for_storage(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Cast floating-point outputs to the storage dtype; other dtypes are kept as they are."""
    tensor = tensor.detach()
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


def ragged_positions(sample: SampleLayout, outputs: OutputLayout) -> list[tuple[Any, ...]]:
    """Where a served sample holds rows that vary in length (key/index paths; ``()`` for a bare
    features tensor): ragged module outputs and ragged passthrough fields, walked from the template."""
    ragged_fields = {spec.name for spec in sample.fields if spec.ragged}
    ragged_outputs = [
        () if outputs.kind == "tensor" else (key,)
        for key, spec in zip(outputs.keys, outputs.arrays, strict=True)
        if spec.ragged
    ]
    found: list[tuple[Any, ...]] = []

    def walk(node: Mapping[str, Any], path: tuple[Any, ...]) -> None:
        if node["kind"] == "input":
            found.extend((*path, *inner) for inner in ragged_outputs)
        elif node["kind"] == "field":
            if node["name"] in ragged_fields:
                found.append(path)
        else:
            keys = node.get("keys") or range(len(node["items"]))
            for key, item in zip(keys, node["items"], strict=True):
                walk(item, (*path, key))

    walk(sample.template, ())
    return found
