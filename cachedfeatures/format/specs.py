"""What one stored array holds: its name, per-row shape, dtypes, and how rows convert.

An :class:`ArraySpec` is plain data that serialises to JSON into the entry's attributes. The
functions below build the spec of a module output or a passthrough field from one value, or
say clearly why the value cannot be stored.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from cachedfeatures.errors import (
    FieldNotStorableError,
    OutputShapeError,
)
from cachedfeatures.format.ragged import object_column

Kind = Literal["tensor", "ndarray", "npscalar", "int", "float", "bool", "str", "list"]
Path = tuple[Hashable, ...]

_STRING_DTYPE = "str"


# ---------------------------------------------------------------------------------------
# One stored array


@dataclass(frozen=True)
class ArraySpec:
    """One array of an entry: its name, per-row shape and dtypes, and how rows convert.

    ``dtype`` is the NumPy dtype stored in Zarr. ``torch_dtype`` names the tensor dtype
    served back for tensors; bfloat16, which NumPy lacks, is stored as its raw uint16 bits.

    A ``ragged`` array's rows vary in length along their first dimension: a row has shape
    ``(L_i, *shape)`` and is stored without padding (see :mod:`cachedfeatures.format.ragged`);
    its columns are 1-d object arrays of per-row arrays. ``length_hint`` is the length of the
    row it was learnt from, an estimate used to size chunks and budgets.
    """

    name: str
    kind: Kind
    dtype: str
    shape: tuple[int, ...]
    torch_dtype: str | None = None
    ragged: bool = False
    length_hint: int = 0

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "torch_dtype": self.torch_dtype,
        }
        if self.ragged:  # only then, so the attributes of fixed arrays stay as they were
            data.update(ragged=True, length_hint=self.length_hint)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ArraySpec:
        return cls(
            name=data["name"],
            kind=data["kind"],
            dtype=data["dtype"],
            shape=tuple(data["shape"]),
            torch_dtype=data.get("torch_dtype"),
            ragged=bool(data.get("ragged", False)),
            length_hint=int(data.get("length_hint", 0)),
        )

    def as_ragged(self, length_hint: int) -> ArraySpec:
        """This spec as a ragged one whose rows are ``(L_i, *shape)``."""
        return ArraySpec(self.name, self.kind, self.dtype, self.shape, self.torch_dtype, True, length_hint)

    def empty_column(self, rows: int) -> np.ndarray:
        """A column to fill with ``rows`` rows: ``(rows, *shape)``, or 1-d object if ragged."""
        if self.ragged:
            return np.empty(rows, dtype=object)
        return np.empty((rows, *self.shape), dtype=self.numpy_dtype)

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        if self.dtype == _STRING_DTYPE:
            return np.dtypes.StringDType()  # type: ignore[no-any-return]
        return np.dtype(self.dtype)

    @property
    def value_nbytes(self) -> int:
        """Bytes of one row (fixed) or of one value along the ragged dimension (ragged)."""
        itemsize = 16 if self.dtype == _STRING_DTYPE else self.numpy_dtype.itemsize
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row; for a ragged array an estimate: ``length_hint`` values and offsets."""
        if self.ragged:
            return max(1, self.length_hint) * self.value_nbytes + 16
        return self.value_nbytes

    # -- tensors (module outputs and tensor fields) -----------------------------------------

    def tensor_batch_to_numpy(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> np.ndarray:
        """A (k, *shape) CPU tensor, already in the storage dtype, as the array to store.

        For a ragged array, ``batch`` is a list of k ``(L_i, *shape)`` tensors, and the result a
        1-d object array of their NumPy arrays.
        """
        if self.ragged:
            return object_column([self._ragged_row_to_numpy(row) for row in batch])
        if not isinstance(batch, torch.Tensor):
            raise OutputShapeError(
                f"{self.name!r} holds one tensor per sample of different lengths, but this entry "
                f"stores a fixed shape {self.shape}; pass ragged={{{self.name!r}: True}} (a new entry)."
            )
        if tuple(batch.shape[1:]) != self.shape or str(batch.dtype) != f"torch.{self.torch_dtype}":
            raise OutputShapeError(
                f"{self.name!r} has per-row shape {tuple(batch.shape[1:])} and dtype {batch.dtype}, "
                f"but this entry stores shape {self.shape} and dtype torch.{self.torch_dtype}. "
                "The module's output shape must not depend on the batch: pad or pool inputs to "
                "a fixed size, or pass a collate_fn that does."
            )
        batch = batch.detach().to("cpu").contiguous()
        if batch.dtype == torch.bfloat16:
            return batch.view(torch.int16).numpy().view(np.uint16)
        return batch.numpy()

    def _ragged_row_to_numpy(self, row: torch.Tensor) -> np.ndarray:
        if (
            not isinstance(row, torch.Tensor)
            or row.ndim != len(self.shape) + 1
            or tuple(row.shape[1:]) != self.shape
            or str(row.dtype) != f"torch.{self.torch_dtype}"
        ):
            got = describe_value(row)
            raise OutputShapeError(
                f"{self.name!r} holds {got} for one sample, but this entry stores rows of shape "
                f"(L, {', '.join(map(str, self.shape))}) and dtype torch.{self.torch_dtype} (any length L); "
                "only the first dimension may vary from sample to sample."
            )
        row = row.detach().to("cpu").contiguous()
        if row.dtype == torch.bfloat16:
            return row.view(torch.int16).numpy().view(np.uint16)
        return row.numpy()

    def numpy_to_tensors(self, column: np.ndarray) -> list[torch.Tensor]:
        """A ragged column (1-d object array of per-row arrays) as one tensor per row."""
        return [self.numpy_to_tensor(row) for row in column]

    def numpy_to_tensor(self, rows: np.ndarray) -> torch.Tensor:
        if not (type(rows) is np.ndarray and rows.flags.c_contiguous):  # skip the call on the hit path
            # np.require keeps a zero-dim row zero-dim (np.ascontiguousarray makes it 1-d).
            rows = np.require(np.asarray(rows), requirements="C")
        if self.torch_dtype == "bfloat16":
            return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(rows)

    # -- passthrough fields -------------------------------------------------------------------

    def values_to_numpy(self, values: Sequence[Any]) -> np.ndarray:
        """Stack one field's values from k samples into a (k, *shape) array (ragged: 1-d object)."""
        if self.ragged:
            return object_column([self._ragged_value_to_numpy(value) for value in values])
        if self.kind == "tensor":
            for value in values:
                ok = isinstance(value, torch.Tensor) and tuple(value.shape) == self.shape
                self._check_field_value(value, ok and str(value.dtype) == f"torch.{self.torch_dtype}")
            return self.tensor_batch_to_numpy(torch.stack(list(values)))
        if self.kind == "str":
            for value in values:
                self._check_field_value(value, isinstance(value, str))
            return np.array(list(values), dtype=self.numpy_dtype)
        python_type = {"int": int, "float": float, "bool": bool}.get(self.kind)
        checked = []
        for value in values:
            if python_type is not None:
                ok = type(value) is python_type or (python_type is float and type(value) is int)
            else:
                ok = isinstance(value, (np.ndarray, np.generic)) and value.dtype == self.numpy_dtype
                ok = ok and tuple(np.shape(value)) == self.shape
            self._check_field_value(value, ok)
            checked.append(value)
        return np.asarray(checked, dtype=self.numpy_dtype)

    def _ragged_value_to_numpy(self, value: Any) -> np.ndarray:
        """One value of a ragged field (a list of numbers, or a tensor/array varying in length)."""
        if self.kind == "list":
            python_type = {"<i8": int, "<f8": float, "|b1": bool}[self.dtype]
            ok = isinstance(value, list) and all(
                type(item) is python_type or (python_type is float and type(item) is int) for item in value
            )
            self._check_field_value(value, ok)
            return np.asarray(value, dtype=self.numpy_dtype).reshape(-1)
        if self.kind == "tensor":
            ok = isinstance(value, torch.Tensor) and str(value.dtype) == f"torch.{self.torch_dtype}"
            ok = ok and value.ndim == len(self.shape) + 1 and tuple(value.shape[1:]) == self.shape
            self._check_field_value(value, ok)
            return self._ragged_row_to_numpy(value)
        ok = isinstance(value, np.ndarray) and value.dtype == self.numpy_dtype
        ok = ok and value.ndim == len(self.shape) + 1 and tuple(value.shape[1:]) == self.shape
        self._check_field_value(value, ok)
        return np.array(value, copy=True)

    def _check_field_value(self, value: Any, ok: bool) -> None:
        if not ok:
            raise OutputShapeError(
                f"field {self.name!r} holds {describe_value(value)} in one sample but {self.describe()} "
                "in the first; every sample must give a field the same type, dtype and shape. Pad it "
                "to a fixed shape in the dataset, or wrap the dataset so that the sample leaves it out."
            )

    def row_to_value(self, row: Any) -> Any:
        """One stored row back as the value the dataset returned."""
        if self.kind == "list":
            return np.asarray(row).tolist()
        if self.kind == "tensor":
            return self.numpy_to_tensor(np.asarray(row))
        if self.kind == "ndarray":
            return np.array(row, dtype=self.numpy_dtype)
        if self.kind == "npscalar":
            return self.numpy_dtype.type(row)
        if self.kind == "str":
            return str(row)
        return {"int": int, "float": float, "bool": bool}[self.kind](row)

    def rows_to_values(self, rows: np.ndarray) -> list[Any]:
        """Every row of a stored batch as :meth:`row_to_value` gives it, converted in one go."""
        if self.ragged:
            return [self.row_to_value(row) for row in rows]
        if self.kind == "tensor":
            return list(self.numpy_to_tensor(rows).unbind(0))
        if self.kind in ("int", "float", "bool", "str"):
            return rows.tolist()  # type: ignore[no-any-return]
        if self.kind == "npscalar":
            return list(rows)
        return [self.row_to_value(row) for row in rows]

    def describe(self) -> str:
        if self.ragged:
            inner = "".join(f", {n}" for n in self.shape)
            what = "a list" if self.kind == "list" else f"a {self.kind}"
            dtype = f"torch.{self.torch_dtype}" if self.kind == "tensor" else self.dtype
            return f"{what} of shape (L{inner}) of any length L and dtype {dtype}"
        if self.kind in ("tensor", "ndarray"):
            dtype = f"torch.{self.torch_dtype}" if self.kind == "tensor" else self.dtype
            return f"a {self.kind} of shape {self.shape} and dtype {dtype}"
        return f"a {self.kind}" + (f" ({self.dtype})" if self.kind == "npscalar" else "")


def describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, np.ndarray):
        return f"an ndarray of shape {value.shape} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def tensor_spec(name: str, kind: Kind, tensor: torch.Tensor) -> ArraySpec:
    torch_dtype = str(tensor.dtype).removeprefix("torch.")
    if tensor.dtype == torch.bfloat16:
        dtype = "uint16"
    else:
        dtype = torch.empty((), dtype=tensor.dtype).numpy().dtype.str
    return ArraySpec(name, kind, dtype, tuple(tensor.shape), torch_dtype)


def number_list_dtype(value: Any) -> str | None:
    """The dtype a list of plain numbers of one type is stored in as a ragged field (``"<i8"``,
    ``"<f8"``, ``"|b1"``; an empty list counts as ints), or ``None`` if ``value`` is not such a
    list. A list mixing ints and floats is not one: as floats its ints would come back as floats
    (and those past 2**53 changed), so it is stored item by item, each as it was."""
    if not isinstance(value, list):
        return None
    types = {type(item) for item in value}
    if types <= {int}:
        return "<i8" if all(-(2**63) <= item < 2**63 for item in value) else None
    if types == {bool}:
        return "|b1"
    if types == {float}:
        return "<f8"
    return None


def field_spec(name: str, path: Path, value: Any) -> ArraySpec:
    """The spec of a passthrough field, or a clear error if it cannot be stored.

    A list of plain numbers (token ids, a variable number of boxes' scores) is one ragged field.
    """
    dtype = number_list_dtype(value)
    if dtype is not None:
        return ArraySpec(name, "list", dtype, (), ragged=True, length_hint=len(value))
    if isinstance(value, torch.Tensor):
        if value.is_sparse or value.is_nested:
            raise unstorable(path, value, "sparse and nested tensors are not supported")
        return tensor_spec(name, "tensor", value)
    # NumPy before Python types: np.float64 is a float (and np.complex128 a complex), but it
    # must come back as the NumPy scalar it was.
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "biufc":
        kind: Kind = "ndarray" if isinstance(value, np.ndarray) else "npscalar"
        return ArraySpec(name, kind, value.dtype.str, tuple(np.shape(value)))
    if isinstance(value, bool):
        return ArraySpec(name, "bool", "|b1", ())
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise unstorable(path, value, "integers must fit in int64")
        return ArraySpec(name, "int", "<i8", ())
    if isinstance(value, float):
        return ArraySpec(name, "float", "<f8", ())
    if isinstance(value, str):
        return ArraySpec(name, "str", _STRING_DTYPE, ())
    raise unstorable(path, value, "")


def check_utf8(values: Sequence[Any], path: Path, rows: Sequence[int] | np.ndarray | None) -> None:
    """A clear error for a string Zarr cannot store: one that is not valid Unicode.

    Zarr stores strings as UTF-8, which a lone surrogate (``os.fsdecode`` of a file name that
    is not UTF-8) has no encoding in. Storing it with ``surrogatepass`` would write bytes that
    plain Zarr and xarray cannot decode, so the field is refused, naming the field and sample.
    """
    for position, value in enumerate(values):
        if not isinstance(value, str) or value.isascii():
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            where = "".join(f"[{key!r}]" for key in path)
            row = position if rows is None else int(rows[position])
            raise FieldNotStorableError(
                f"field sample{where} of sample {row} is a string that is not valid Unicode "
                f"({error.reason}: {value[error.start : error.end]!r} at position {error.start} of "
                f"{value!r}), so it cannot be stored as UTF-8. Clean it in the dataset, e.g. "
                "s.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace'), or pass it as bytes "
                "in an integer array."
            ) from None


def unstorable(path: Path, value: Any, why: str) -> FieldNotStorableError:
    where = "".join(f"[{key!r}]" for key in path)
    return FieldNotStorableError(
        f"sample{where} is {describe_value(value)}{': ' + why if why else ''}, which cannot be "
        "stored beside the features. Passthrough fields must be numbers, bools, strings, or "
        "tensors/arrays of a fixed shape. Convert it in the dataset, or wrap the dataset so "
        "that the sample leaves it out."
    )
