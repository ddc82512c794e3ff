"""Spot checks: recompute a few random cached rows and compare them with what the store holds.

A fingerprint sees the module's state, the code that shapes its input and a hash of the
dataset's state and of probe samples; it cannot see everything (a file edited in place under
the same name, size and modification time, a global config object the module reads). A spot
check is the safety net: it loads the raw samples of a few random valid rows, runs them through
the module exactly as a miss would (same collate, storage dtype and autocast, one batch),
compares every stored column (outputs and passthrough fields) and raises
:class:`~cachedfeatures.errors.StaleFeaturesError` on a mismatch. It never writes: nothing
cached is lost by a check.

Floating-point values are compared row by row against the row's largest magnitude, because a
recompute in another batch composition may differ in the last bits (BLAS kernels, reduced
precision): a row matches when ``max |stored - recomputed| <= atol + rtol * scale``, with
``scale`` the largest finite magnitude of the row (stored or recomputed). ``rtol`` follows
the coarsest precision the values went through (see :func:`tolerance`). NaN matches NaN and
an infinity matches the same infinity. Integers, bools and strings must be equal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cachedfeatures.errors import StaleFeaturesError
from cachedfeatures.format.specs import ArraySpec
from cachedfeatures.parse import parse_int
from cachedfeatures.store.backend import Backend

__all__ = [
    "DEFAULT_SPOT_CHECK",
    "Mismatch",
    "SpotCheckState",
    "Tolerance",
    "compare_columns",
    "parse_spot_check",
    "precision_of",
    "stale_error",
    "tolerance",
]

logger = logging.getLogger(__name__)

DEFAULT_SPOT_CHECK = 8

# Relative tolerance (of the row's largest magnitude) and absolute floor, by the coarsest
# precision the values went through. Measured on CPU between batches of 1, 7 and 512 rows of a
# 4-layer MLP: float32 differs by up to 1.7e-6, float16 storage by 4.6e-4, bfloat16 storage
# by 3.5e-3, autocast bfloat16 by 7e-3; GPU kernels and deeper models differ more, so each
# bound keeps a wide margin. A stale row (another input) differs by the order of the scale.
_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-8, 1e-12),
    "float32": (1e-4, 1e-8),
    "tf32": (1e-2, 1e-5),
    "float16": (1e-2, 1e-5),
    "bfloat16": (5e-2, 1e-5),
}
_COARSENESS = ["float64", "float32", "tf32", "float16", "bfloat16"]


def parse_spot_check(value: object) -> int:
    """``spot_check=``: rows recomputed per epoch, an int >= 0 (0 turns spot checks off)."""
    what = (
        "an int >= 0: the number of cached rows recomputed and compared each epoch (0 turns spot checks off)"
    )
    return parse_int("spot_check", value, minimum=0, what=what)


@dataclass(frozen=True)
class Tolerance:
    """A row matches when ``max |stored - recomputed| <= atol + rtol * scale``."""

    rtol: float
    atol: float
    precision: str


def _precision_name(dtype: torch.dtype | np.dtype[Any] | str) -> str | None:
    name = str(dtype).removeprefix("torch.")
    if name in ("float64", "complex128", "double"):
        return "float64"
    if name in ("float32", "complex64", "float"):
        return "float32"
    if name in ("float16", "half"):
        return "float16"
    if name == "bfloat16":
        return "bfloat16"
    return None


def _coarsest(names: Iterable[str | None]) -> str:
    known = [name for name in names if name is not None]
    return max(known, key=_COARSENESS.index) if known else "float64"


def precision_of(
    module: Callable[..., Any], device: torch.device, autocast_dtype: torch.dtype | None
) -> str | None:
    """The coarsest precision the module computes in, as far as can be told, or ``None``.

    The module's floating-point parameters and buffers, the autocast dtype, and TF32 where
    CUDA may use it for float32 matmuls or convolutions.
    """
    names: list[str | None] = []
    for owner in _modules_behind(module):
        dtypes = {t.dtype for t in (*owner.parameters(), *owner.buffers()) if t.is_floating_point()}
        names.extend(_precision_name(dtype) for dtype in dtypes)
    if autocast_dtype is not None:
        names.append(_precision_name(autocast_dtype))
    if device.type == "cuda":
        tf32 = torch.backends.cudnn.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        if tf32:
            names.append("tf32")
    known = [name for name in names if name is not None]
    return _coarsest(known) if known else None


def _modules_behind(module: Any, depth: int = 0) -> list[torch.nn.Module]:
    """The modules a callable runs: itself, a bound method's ``self``, a ``partial``'s function
    and arguments, a closure's cells (a lambda around a half-precision model)."""
    if isinstance(module, torch.nn.Module):
        return [module]
    if depth > 3:
        return []
    found: list[torch.nn.Module] = []
    candidates: list[Any] = [getattr(module, "__self__", None), getattr(module, "func", None)]
    candidates += [*getattr(module, "args", ()), *getattr(module, "keywords", {}).values()]
    for cell in getattr(module, "__closure__", None) or ():
        try:
            candidates.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    for candidate in candidates:
        if candidate is not None and candidate is not module:
            found += _modules_behind(candidate, depth + 1)
    return found


def tolerance(spec: ArraySpec, compute_precision: str | None = None) -> Tolerance | None:
    """How closely a stored floating-point column must match; ``None`` where it must be equal.

    Args:
        spec: the stored array (its storage dtype).
        compute_precision: the coarsest precision the values were computed in (module outputs:
            :func:`precision_of`); ``None`` for passthrough fields, which only the storage dtype
            rounds.
    """
    if spec.dtype == "str":
        return None
    storage = _precision_name(spec.torch_dtype or np.dtype(spec.dtype).name)
    if storage is None:
        return None
    precision = _coarsest([storage, compute_precision])
    rtol, atol = _TOLERANCES[precision]
    return Tolerance(rtol, atol, precision)


def _as_float(spec: ArraySpec, values: np.ndarray) -> np.ndarray:
    """Stored values as a NumPy float (or complex) array; bfloat16 arrives as its uint16 bits."""
    if spec.torch_dtype == "bfloat16":
        return spec.numpy_to_tensor(np.ascontiguousarray(values)).float().numpy()
    return np.asarray(values)


@dataclass(frozen=True)
class Mismatch:
    """One stored row that does not match its recomputed value."""

    row: int
    column: str
    detail: str
    difference: float  # the largest difference (inf where NaN/inf disagree); 1.0 when exact

    def describe(self) -> str:
        return f"row {self.row}: {self.column!r} {self.detail}"


def _compare_float(
    spec: ArraySpec, rows: np.ndarray, stored: np.ndarray, recomputed: np.ndarray, tol: Tolerance
) -> list[Mismatch]:
    a = _as_float(spec, stored).reshape(len(rows), -1)
    b = _as_float(spec, recomputed).reshape(len(rows), -1)
    if a.dtype.kind == "f":
        a, b = a.astype(np.float64), b.astype(np.float64)
    else:
        a, b = a.astype(np.complex128), b.astype(np.complex128)
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    both_nan = np.isnan(a) & np.isnan(b)
    # Non-finite values must agree exactly: NaN with NaN, +inf with +inf.
    special = (~finite_a | ~finite_b) & ~both_nan & ~(a == b)
    with np.errstate(invalid="ignore"):
        difference = np.where(finite_a & finite_b, np.abs(a - b), 0.0)
        magnitude = np.where(finite_a, np.abs(a), 0.0)
        magnitude = np.maximum(magnitude, np.where(finite_b, np.abs(b), 0.0))
    width = a.shape[1]
    largest = difference.max(axis=1) if width else np.zeros(len(rows))
    scale = magnitude.max(axis=1) if width else np.zeros(len(rows))
    allowed = tol.atol + tol.rtol * scale
    mismatches = []
    for position in np.flatnonzero((largest > allowed) | special.any(axis=1)):
        row = int(rows[position])
        if special[position].any():
            count = int(special[position].sum())
            detail = f"has {count} NaN or infinite value(s) where the other side does not"
            mismatches.append(Mismatch(row, spec.name, detail, float("inf")))
            continue
        detail = (
            f"differs by up to {largest[position]:.3g} (allowed {allowed[position]:.3g}: "
            f"rtol {tol.rtol:g} for {tol.precision} x the row's largest magnitude {scale[position]:.3g})"
        )
        mismatches.append(Mismatch(row, spec.name, detail, float(largest[position])))
    return mismatches


def _plain(value: Any) -> Any:
    """A NumPy scalar as the Python value it holds (so messages read ``3``, not ``np.int64(3)``)."""
    return value.item() if isinstance(value, np.generic) else value


def _compare_exact(
    spec: ArraySpec, rows: np.ndarray, stored: np.ndarray, recomputed: np.ndarray
) -> list[Mismatch]:
    a = np.asarray(stored).reshape(len(rows), -1)
    b = np.asarray(recomputed).reshape(len(rows), -1)
    differs = a != b
    mismatches = []
    for position in np.flatnonzero(differs.any(axis=1)):
        row = int(rows[position])
        if a.shape[1] == 1:
            was, now = _plain(a[position, 0]), _plain(b[position, 0])
            detail = f"is {was!r} in the store but {now!r} recomputed now"
        else:
            detail = f"differs in {int(differs[position].sum())} of {a.shape[1]} values"
        mismatches.append(Mismatch(row, spec.name, detail, 1.0))
    return mismatches


def compare_columns(
    specs: Sequence[ArraySpec],
    rows: np.ndarray,
    stored: Mapping[str, np.ndarray],
    recomputed: Mapping[str, np.ndarray],
    output_names: Iterable[str],
    compute_precision: str | None,
) -> list[Mismatch]:
    """Every stored row of every column that differs from its recomputed value.

    Module outputs (``output_names``) are compared with the tolerance of ``compute_precision``
    and their storage dtype; passthrough fields with that of their own dtype (exact for
    integers, bools and strings).
    """
    outputs = set(output_names)
    mismatches: list[Mismatch] = []
    for spec in specs:
        tol = tolerance(spec, compute_precision if spec.name in outputs else None)
        a, b = stored[spec.name], recomputed[spec.name]
        if spec.ragged:
            mismatches.extend(_compare_ragged(spec, rows, a, b, tol))
        elif tol is None:
            mismatches.extend(_compare_exact(spec, rows, a, b))
        else:
            mismatches.extend(_compare_float(spec, rows, a, b, tol))
    return mismatches


def _compare_ragged(
    spec: ArraySpec, rows: np.ndarray, stored: np.ndarray, recomputed: np.ndarray, tol: Tolerance | None
) -> list[Mismatch]:
    """A ragged column row by row: the lengths must agree, then the values as for fixed rows."""
    mismatches = []
    for position, row in enumerate(rows.tolist()):
        a, b = np.asarray(stored[position]), np.asarray(recomputed[position])
        if a.shape != b.shape:
            detail = f"has length {len(a)} in the store but {len(b)} recomputed now"
            mismatches.append(Mismatch(int(row), spec.name, detail, float("inf")))
            continue
        one = np.array([row])
        a, b = a.reshape(1, -1), b.reshape(1, -1)
        if tol is None:
            mismatches.extend(_compare_exact(spec, one, a, b))
        else:
            mismatches.extend(_compare_float(spec, one, a, b, tol))
    return mismatches


def stale_error(
    entry_name: str, backend: Backend, checked: int, mismatches: Sequence[Mismatch]
) -> StaleFeaturesError:
    """The error for a failed spot check: the entry, the rows that differ and by how much, the fix."""
    rows = tuple(sorted({m.row for m in mismatches}))
    location = backend.location
    remove = (
        "an in-memory store lives only in this process: open a new one"
        if backend.is_memory
        else f"'cachedfeatures rm {location} {entry_name}'"
    )
    shown = [f"  {m.describe()}" for m in mismatches[:8]]
    if len(mismatches) > 8:
        shown.append(f"  ... and {len(mismatches) - 8} more")
    message = (
        f"the cached features of entry {entry_name!r} in store {location} are stale: a spot check "
        f"recomputed {checked} random cached rows and {len(rows)} of them differ from the stored "
        "values:\n" + "\n".join(shown) + "\n"
        "The dataset or the module changed in a way its fingerprint cannot see (a file edited in "
        "place, a global config the module or the dataset reads). Delete the entry so it is "
        f"computed again ({remove}), or pass a new "
        "dataset_version= / module_version= to start a new entry. If the dataset draws random "
        "augmentation, pass allow_nondeterministic=True (which turns spot checks off); "
        "spot_check=0 turns the checks off."
    )
    return StaleFeaturesError(message, entry=entry_name, rows=rows)


class SpotCheckState:
    """A process's spot-check bookkeeping for one dataset: its generator, counters, schedule.

    Forked or spawned copies (DataLoader workers) notice the new process id and start afresh:
    their own generator (so workers check different rows) and a check at their first hit batch.

    Args:
        rows: rows to check each time (``spot_check=``).
        epoch_rows: rows served between two checks of the map-style path (the dataset's length).
    """

    def __init__(self, rows: int, epoch_rows: int) -> None:
        self.rows = rows
        self.epoch_rows = max(1, epoch_rows)
        self._pid = -1
        self._start()

    def _start(self) -> None:
        self._pid = os.getpid()
        self.generator = np.random.default_rng()  # fresh OS entropy; global generators untouched
        self.checks = 0  # checks run in this process
        self.checked_rows: list[int] = []  # rows loaded, recomputed and compared in this process
        self.module_calls = 0  # module batches run by checks in this process
        self._served = 0  # rows served by the map-style path since its last check
        self._due = True  # check at the next batch with a hit
        self.warned = False

    def here(self) -> SpotCheckState:
        """This state, reset first if the process changed (a DataLoader worker's copy)."""
        if self._pid != os.getpid():
            self._start()
        return self

    def due_on_serve(self, served: int, hits: int) -> bool:
        """Map-style schedule: at the first batch with a hit, then after every ``epoch_rows`` served."""
        self.here()
        self._served += served
        if self._served >= self.epoch_rows:  # a whole epoch served since the last check
            self._due = True
        if self._due and hits > 0:
            self._due = False
            self._served = 0
            return True
        return False

    def choose(self, candidates: np.ndarray, count: int) -> np.ndarray:
        """Up to ``count`` distinct rows of ``candidates``, at random, ascending."""
        candidates = np.asarray(candidates, dtype=np.int64)
        if len(candidates) <= count:
            return np.sort(candidates)
        return np.sort(self.generator.choice(candidates, size=count, replace=False))
