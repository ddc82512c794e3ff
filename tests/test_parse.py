"""Argument validation in one place: cachedfeatures.parse, and the validators built on it."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

import cachedfeatures
from cachedfeatures import (
    ArgumentTypeError,
    CachedFeatureDataset,
    CacheError,
    ChunkReader,
    ChunkShuffleSampler,
    DtypeError,
    InvalidArgumentError,
    Loader,
)
from cachedfeatures.parse import (
    expected,
    parse_choice,
    parse_device,
    parse_float_dtype,
    parse_int,
    parse_nonnegative_int,
    parse_positive_int,
    parse_timeout,
)
from cachedfeatures.pruning import parse_policy
from tests.helpers import Backbone, Samples

PACKAGE = Path(cachedfeatures.__file__).parent


def test_errors_are_the_builtins_callers_catch_and_cache_errors() -> None:
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(InvalidArgumentError, CacheError)
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, CacheError)


def test_expected_reads_expected_x_got_y_then_the_fix() -> None:
    assert expected("window to be a positive int", 0) == "Expected window to be a positive int. Got 0."
    assert expected("x to be a str", 3, "Pass x='a'.") == "Expected x to be a str. Got 3. Pass x='a'."


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "8", None])
def test_positive_int(value: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"Expected n to be a positive int. Got {value!r}.")):
        parse_positive_int("n", value)
    assert parse_positive_int("n", np.int64(7)) == 7 and type(parse_positive_int("n", np.int64(7))) is int


def test_nonnegative_int_and_bounds() -> None:
    assert parse_nonnegative_int("n", 0) == 0
    with pytest.raises(InvalidArgumentError, match=r"^Expected n to be an int >= 0\. Got -1\.$"):
        parse_nonnegative_int("n", -1)
    with pytest.raises(InvalidArgumentError, match=r"^Expected rank to be an int from 0 to 3\. Got 4\.$"):
        parse_int("rank", 4, minimum=0, maximum=3)
    with pytest.raises(ArgumentTypeError, match=r"^Expected rank to be an int\. Got 0\.5\.$"):
        parse_int("rank", 0.5, strict_type=True)


def test_choice_lists_the_valid_values() -> None:
    assert parse_choice("policy", "lru", ("mru", "lru")) == "lru"
    with pytest.raises(
        InvalidArgumentError, match=r"^Expected policy to be one of 'mru', 'lru'\. Got 'fifo'\.$"
    ):
        parse_policy("fifo")
    with pytest.raises(InvalidArgumentError, match="one of 'mru', 'lru'"):
        parse_choice("policy", ["mru"], ("mru", "lru"))  # unhashable: refused, not a crash


def test_device_and_dtype() -> None:
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(InvalidArgumentError, match=r"^Expected device to be like 'cpu'"):
        parse_device("gpu7")
    assert parse_float_dtype(None) is None and parse_float_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(DtypeError, match=r"^Expected cache_dtype to be a torch.dtype of a floating-point"):
        parse_float_dtype(torch.int8, "cache_dtype")


def test_every_layer_gives_the_same_message_for_the_same_mistake(store_path: Path) -> None:
    """The sampler, the loader, the reader and the dataset once each had their own checks."""
    cached = CachedFeatureDataset(Samples(8), Backbone(), store_path, chunk_rows=4, spot_check=0)
    cached.__getitems__([0])
    assert cached.entry is not None
    messages = []
    for make in (
        lambda: ChunkShuffleSampler(8, chunk_rows=4, window=0),
        lambda: Loader(cached, batch_size=0),
        lambda: CachedFeatureDataset(Samples(8), Backbone(), store_path, batch_size=0),
    ):
        with pytest.raises(InvalidArgumentError) as error:
            make()
        messages.append(str(error.value))
    assert messages == [
        f"Expected {name} to be a positive int. Got 0." for name in ("window", "batch_size", "batch_size")
    ]
    with pytest.raises(
        InvalidArgumentError, match=r"^Expected chunk_cache_bytes to be an int >= 0 .*Got -1\.$"
    ):
        ChunkReader(cached.entry, cache_bytes=-1)
    with pytest.raises(
        InvalidArgumentError, match=r"^Expected read_route to be one of 'auto', 'zarr'\. Got 'mmap'\.$"
    ):
        ChunkReader(cached.entry, route="mmap")  # type: ignore[arg-type]


def test_generic_validators_are_defined_only_in_parse() -> None:
    generic = re.compile(r"^def _?parse_(positive|nonnegative|int|choice|device|float_dtype|dtype)\b", re.M)
    defined = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if generic.search(path.read_text()) and path.name != "parse.py"
    ]
    assert defined == []


def test_parse_timeout_takes_seconds_or_a_timedelta_and_refuses_the_rest() -> None:
    assert parse_timeout("timeout", None) is None
    assert parse_timeout("timeout", 5) == 5.0
    assert parse_timeout("timeout", timedelta(minutes=2)) == 120.0
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(InvalidArgumentError, match="Expected timeout to be a positive"):
            parse_timeout("timeout", bad)
    for wrong in ("5", True):
        with pytest.raises(ArgumentTypeError, match="Expected timeout to be None or a positive"):
            parse_timeout("timeout", wrong)
