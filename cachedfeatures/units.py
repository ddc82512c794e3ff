"""Byte sizes for people: parse ``"10GB"``, ``"512MiB"``, ``10e9``; print ``"1.5 GB"``; and the
machine's physical memory, which default budgets are shares of.

Decimal units (kB, MB, GB, TB, PB) are powers of 1000, binary units (KiB, MiB, GiB, TiB,
PiB) powers of 1024, as ``ls --si`` and ``ls -h`` print them. Unit letters are case-insensitive
("10gb" is 10 GB); a bare "G" or "M" is refused because it is ambiguous between the two.
"""

from __future__ import annotations

import math
import os
import re

from cachedfeatures.errors import ArgumentTypeError, InvalidArgumentError

__all__ = ["format_bytes", "format_ratio", "parse_bytes", "physical_memory_bytes"]

FALLBACK_MEMORY_BYTES = 8 << 30  # where the OS does not say


def physical_memory_bytes() -> int:
    """This machine's physical memory in bytes (8 GiB where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return FALLBACK_MEMORY_BYTES


_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_EXAMPLES = "10e9, '10GB', '512MiB' or '1.5 TB'"


def parse_bytes(value: object, name: str = "max_bytes") -> int:
    """A non-negative byte count from an int, a float (``10e9``) or a string (``"10GB"``).

    Fractions of a byte round down. Raises :class:`~cachedfeatures.errors.InvalidArgumentError`
    (a ``ValueError``; :class:`~cachedfeatures.errors.ArgumentTypeError`, a ``TypeError``, for
    other types) with a message naming ``name``.
    """
    if isinstance(value, bool):
        raise ArgumentTypeError(f"Expected {name} to be a number of bytes like {_EXAMPLES}. Got {value!r}.")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgumentError(
                f"Expected {name} to be a non-negative number of bytes. Got {value!r}."
            )
        return value
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or (unit and unit not in _UNITS):
            raise InvalidArgumentError(
                f"Expected {name} to be a number of bytes like {_EXAMPLES} (units: "
                f"{', '.join(_display_units())}). Got {value!r}."
            )
        digits, scale = match.group(1), _UNITS[unit or "b"]
        if digits.isdigit():  # exact for integers of any size
            return int(digits) * scale
        number = float(digits) * scale
    else:
        raise ArgumentTypeError(
            f"Expected {name} to be a number of bytes like {_EXAMPLES}. Got {type(value).__name__} {value!r}."
        )
    if not math.isfinite(number) or number < 0:
        raise InvalidArgumentError(
            f"Expected {name} to be a finite, non-negative number of bytes. Got {value!r}."
        )
    return int(number)


def format_bytes(count: float) -> str:
    """``count`` bytes in decimal units with three significant digits: ``"1.52 GB"``.

    The one way the library prints a size (``cachedfeatures info``, ``repr(entry)``, the
    notebook display, budget messages). Decimal, as disks, object stores and ``du --si`` count,
    and as budgets are usually written (``max_bytes="10GB"``); binary units are still accepted
    on input (:func:`parse_bytes`).
    """
    if count < 0:
        return f"-{format_bytes(-count)}"
    if count < 1000:
        return f"{int(count)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        count /= 1000
        if count < 1000:
            return f"{count:.3g} {unit}"
    return f"{count / 1000:.3g} PB"


def format_ratio(ratio: float | None) -> str:
    """A compression ratio as printed everywhere: ``"1.45x"``; ``"n/a"`` for ``None`` or NaN
    (no chunk stored yet)."""
    if ratio is None or ratio != ratio:
        return "n/a"
    return f"{ratio:.2f}x"


def _display_units() -> list[str]:
    return ["B", "kB", "MB", "GB", "TB", "PB", "KiB", "MiB", "GiB", "TiB", "PiB"]
