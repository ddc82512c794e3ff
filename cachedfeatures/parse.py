"""Argument validation in one place: small ``parse_*`` functions that return the value to use
or raise with a message of the form "Expected X. Got Y." (and the fix, where there is one).

Base layer (above ``errors``): every layer validates its arguments with these. Validators that
need a type of a higher layer (``parse_policy`` beside the pruning policies,
``parse_ownership`` beside ``ChunkOwnership``) live beside that type and build their messages
with :func:`expected`. Wrong values raise :class:`~cachedfeatures.errors.InvalidArgumentError`
(a ``ValueError``), wrong types :class:`~cachedfeatures.errors.ArgumentTypeError` (a
``TypeError``), except where noted: the integer validators raise ``ValueError`` for any bad
argument, as they always have.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch

from cachedfeatures.errors import ArgumentTypeError, DtypeError, InvalidArgumentError

__all__ = [
    "expected",
    "parse_choice",
    "parse_device",
    "parse_float_dtype",
    "parse_int",
    "parse_nonnegative_int",
    "parse_positive_int",
    "parse_timeout",
]

T = TypeVar("T")


def expected(what: str, got: object, fix: str = "") -> str:
    """The message ``"Expected <what>. Got <got!r>."``, followed by ``fix`` if given."""
    return f"Expected {what}. Got {got!r}." + (f" {fix}" if fix else "")


def parse_int(
    name: str,
    value: object,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    what: str | None = None,
    fix: str = "",
    strict_type: bool = False,
) -> int:
    """``value`` as an ``int`` (NumPy integers too, never ``bool``) from ``minimum`` to ``maximum``.

    ``what`` replaces the description in the message ("an int >= 0" by default). A bad value
    raises :class:`InvalidArgumentError`; with ``strict_type`` a value that is not an int
    raises :class:`ArgumentTypeError` instead.
    """
    if what is None:
        if minimum is not None and maximum is not None:
            what = f"an int from {minimum} to {maximum}"
        elif minimum is not None or maximum is not None:
            what = f"an int >= {minimum}" if minimum is not None else f"an int <= {maximum}"
        else:
            what = "an int"
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise (ArgumentTypeError if strict_type else InvalidArgumentError)(
            expected(f"{name} to be {what}", value, fix)
        )
    number = int(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise InvalidArgumentError(expected(f"{name} to be {what}", value, fix))
    return number


def parse_positive_int(name: str, value: object, fix: str = "") -> int:
    """An int >= 1 (``batch_size``, ``chunk_rows``, ``window``...)."""
    return parse_int(name, value, minimum=1, what="a positive int", fix=fix)


def parse_nonnegative_int(name: str, value: object, fix: str = "") -> int:
    """An int >= 0 (``num_workers``...)."""
    return parse_int(name, value, minimum=0, fix=fix)


def parse_choice(name: str, value: object, choices: Sequence[T]) -> T:
    """``value`` if it is one of ``choices`` (the values of a ``Literal``), else an
    :class:`InvalidArgumentError` listing them."""
    for choice in choices:
        if type(value) is type(choice) and value == choice:
            return choice
    names = ", ".join(repr(choice) for choice in choices)
    raise InvalidArgumentError(expected(f"{name} to be one of {names}", value))


def parse_device(value: object, name: str = "device") -> torch.device:
    """A ``torch.device`` from anything ``torch.device`` takes (``"cuda:1"``, a device)."""
    try:
        return torch.device(value)  # type: ignore[call-overload,no-any-return]
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(expected(f"{name} to be like 'cpu', 'cuda' or 'cuda:1'", value)) from None


def parse_float_dtype(value: object, name: str = "dtype") -> torch.dtype | None:
    """A floating-point ``torch.dtype`` or ``None``; anything else is a :class:`DtypeError`.

    Features cast to an integer or bool type would be rounded away without a word (values in
    -0.76..0.12 become zeros), so only floating types are storage dtypes.
    """
    if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    raise DtypeError(
        expected(
            f"{name} to be a torch.dtype of a floating-point type (torch.float16, torch.bfloat16, "
            "torch.float32, torch.float64) or None",
            value,
        )
    )


def parse_timeout(name: str, value: object) -> float | None:
    """``None`` or a positive number of seconds (an int, a float or a ``datetime.timedelta``)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ArgumentTypeError(
            expected(f"{name} to be None or a positive number of seconds (or a timedelta)", value)
        )
    if not seconds > 0 or seconds == float("inf"):
        raise InvalidArgumentError(expected(f"{name} to be a positive, finite number of seconds", value))
    return seconds
