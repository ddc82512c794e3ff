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

Kind = Literal["tensor", "ndarray", "npscalar", "int", "float", "bool", "str"]
Path = tuple[Hashable, ...]

_STRING_DTYPE = "str"


# ---------------------------------------------------------------------------------------
# One stored array


@dataclass(frozen=True)
class ArraySpec:
    """One array of an entry: its name, per-row shape and dtypes, and how rows convert.

    ``dtype`` is the NumPy dtype stored in Zarr. ``torch_dtype`` names the tensor dtype
    served back for tensors; bfloat16, which NumPy lacks, is stored as its raw uint16 bits.
    """

    name: str
    kind: Kind
    dtype: str
    shape: tuple[int, ...]
    torch_dtype: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "torch_dtype": self.torch_dtype,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ArraySpec:
        return cls(
            name=data["name"],
            kind=data["kind"],
            dtype=data["dtype"],
            shape=tuple(data["shape"]),
            torch_dtype=data.get("torch_dtype"),
        )

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        if self.dtype == _STRING_DTYPE:
            return np.dtypes.StringDType()  # type: ignore[no-any-return]
        return np.dtype(self.dtype)

    @property
    def row_nbytes(self) -> int:
        itemsize = 16 if self.dtype == _STRING_DTYPE else self.numpy_dtype.itemsize
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize

    # -- tensors (module outputs and tensor fields) -----------------------------------------

    def tensor_batch_to_numpy(self, batch: torch.Tensor) -> np.ndarray:
        """A (k, *shape) CPU tensor, already in the storage dtype, as the array to store."""
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

    def numpy_to_tensor(self, rows: np.ndarray) -> torch.Tensor:
        if not (type(rows) is np.ndarray and rows.flags.c_contiguous):  # skip the call on the hit path
            # np.require keeps a zero-dim row zero-dim (np.ascontiguousarray makes it 1-d).
            rows = np.require(np.asarray(rows), requirements="C")
        if self.torch_dtype == "bfloat16":
            return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(rows)

    # -- passthrough fields -------------------------------------------------------------------

    def values_to_numpy(self, values: Sequence[Any]) -> np.ndarray:
        """Stack one field's values from k samples into a (k, *shape) array."""
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

    def _check_field_value(self, value: Any, ok: bool) -> None:
        if not ok:
            raise OutputShapeError(
                f"field {self.name!r} holds {describe_value(value)} in one sample but {self.describe()} "
                "in the first; every sample must give a field the same type, dtype and shape. Pad it "
                "to a fixed shape in the dataset, or wrap the dataset so that the sample leaves it out."
            )

    def row_to_value(self, row: Any) -> Any:
        """One stored row back as the value the dataset returned."""
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
        if self.kind == "tensor":
            return list(self.numpy_to_tensor(rows).unbind(0))
        if self.kind in ("int", "float", "bool", "str"):
            return rows.tolist()  # type: ignore[no-any-return]
        if self.kind == "npscalar":
            return list(rows)
        return [self.row_to_value(row) for row in rows]

    def describe(self) -> str:
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


def field_spec(name: str, path: Path, value: Any) -> ArraySpec:
    """The spec of a passthrough field, or a clear error if it cannot be stored."""
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
