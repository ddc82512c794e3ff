"""``DatasetOptions``: the keyword options of a ``CachedFeatureDataset``, validated once.

A frozen dataclass: it is checked when it is made (every message reads "Expected X. Got Y."),
it pickles into DataLoader workers with the dataset, and :meth:`DatasetOptions.key_options` is
what of it goes into the entry's key and attrs (the options that change the stored values).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cachedfeatures.compute.calls import Call, OutputSelection, describe_selection, parse_call, parse_output
from cachedfeatures.compute.fingerprint import callable_digest
from cachedfeatures.compute.layout import FieldNames, InputKey, parse_input_key
from cachedfeatures.compute.runner import Collate
from cachedfeatures.compute.spot_check import DEFAULT_SPOT_CHECK, parse_spot_check
from cachedfeatures.compute.views import (
    Generator,
    Schedule,
    check_views_options,
    parse_schedule,
    parse_view_generators,
    parse_views,
)
from cachedfeatures.errors import ArgumentTypeError
from cachedfeatures.parse import expected, parse_device, parse_float_dtype, parse_int, parse_positive_int
from cachedfeatures.pruning import Policy, parse_policy
from cachedfeatures.reader.chunk_reader import ReadRoute, parse_cache_bytes, parse_read_route
from cachedfeatures.store.feature_store import Compressor
from cachedfeatures.store.ownership import ChunkOwnership, parse_ownership
from cachedfeatures.units import parse_bytes

__all__ = ["DatasetOptions"]


@dataclass(frozen=True, init=False)
class DatasetOptions:
    """Every keyword option of :class:`~cachedfeatures.CachedFeatureDataset`, validated.

    The arguments are those of the dataset, with the same defaults (see its docstring); the
    attributes hold them parsed: ``device`` a ``torch.device``, ``max_bytes`` an int or
    ``None``, ``storage_options`` a dict of its own. Raises ``ValueError`` / ``TypeError`` (and
    :class:`~cachedfeatures.errors.DtypeError`) naming the bad argument.
    """

    input_key: InputKey
    batch_size: int
    device: torch.device
    dtype: torch.dtype | None
    compressor: Compressor
    chunk_rows: int | None
    collate_fn: Collate | None
    module_version: str | None
    dataset_version: str | None
    allow_nondeterministic: bool
    spot_check: int
    max_bytes: int | None
    policy: Policy
    autocast_dtype: torch.dtype | None
    chunk_cache_bytes: int | None
    read_route: ReadRoute
    checksum: bool
    storage_options: dict[str, Any] | None
    read_only: bool
    owned_chunks: ChunkOwnership | None
    call: Call
    output: OutputSelection | None
    field_names: FieldNames | None
    ragged: dict[str, str | bool]
    views: int | None
    view_seed: int
    view_schedule: Schedule
    view_generators: tuple[Generator, ...]

    def __init__(
        self,
        *,
        input_key: InputKey = 0,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        compressor: Compressor = "default",
        chunk_rows: int | None = None,
        collate_fn: Collate | None = None,
        module_version: str | None = None,
        dataset_version: str | None = None,
        allow_nondeterministic: bool = False,
        spot_check: int = DEFAULT_SPOT_CHECK,
        max_bytes: int | float | str | None = None,
        policy: Policy = "mru",
        autocast_dtype: torch.dtype | None = None,
        chunk_cache_bytes: int | None = None,
        read_route: ReadRoute = "auto",
        checksum: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        read_only: bool = False,
        owned_chunks: ChunkOwnership | None = None,
        call: Call = "auto",
        output: OutputSelection | None = None,
        field_names: FieldNames | None = None,
        ragged: Mapping[str, str | bool] | Sequence[str] | None = None,
        views: int | None = None,
        view_seed: int = 0,
        view_schedule: Schedule = "permutation",
        view_generators: Sequence[Generator] | None = None,
    ) -> None:
        parsed = {
            "input_key": parse_input_key(input_key),
            "batch_size": parse_positive_int("batch_size", batch_size),
            "device": parse_device(device),
            "dtype": parse_float_dtype(dtype),
            "autocast_dtype": parse_float_dtype(autocast_dtype, "autocast_dtype"),
            "chunk_rows": None if chunk_rows is None else parse_positive_int("chunk_rows", chunk_rows),
            "max_bytes": None if max_bytes is None else parse_bytes(max_bytes),
            "policy": parse_policy(policy),
            "spot_check": parse_spot_check(spot_check),
            "chunk_cache_bytes": parse_cache_bytes(chunk_cache_bytes),
            "read_route": parse_read_route(read_route),
            "owned_chunks": parse_ownership(owned_chunks),
            "storage_options": _parse_storage_options(storage_options),
            "compressor": compressor,
            "collate_fn": collate_fn,
            "module_version": module_version,
            "dataset_version": dataset_version,
            "allow_nondeterministic": bool(allow_nondeterministic),
            "checksum": bool(checksum),
            "read_only": bool(read_only),
            "call": parse_call(call),
            "output": parse_output(output),
            "field_names": field_names,  # checked against the sample when the layout is learnt
            "ragged": parse_ragged(ragged),
            "views": parse_views(views),
            "view_seed": parse_int("view_seed", view_seed, minimum=0, maximum=2**63 - 1),
            "view_schedule": parse_schedule(view_schedule),
            "view_generators": parse_view_generators(view_generators),
        }
        check_views_options(views is not None, bool(allow_nondeterministic))
        for name, value in parsed.items():
            object.__setattr__(self, name, value)

    def key_options(self) -> dict[str, str | None]:
        """The options that change the stored values, as they go into the entry's key and attrs."""
        options: dict[str, str | None] = {
            "dtype": None if self.dtype is None else str(self.dtype),
            "input_key": _describe_callable(self.input_key),
            "collate_fn": None if self.collate_fn is None else _describe_callable(self.collate_fn),
        }
        if self.autocast_dtype is not None:  # only when set, so entries without it keep their key
            options["autocast"] = str(self.autocast_dtype)
        if self.output is not None:  # likewise
            options["output"] = describe_selection(self.output)
        if self.call != "auto":  # an explicit convention; "auto" follows from what is fingerprinted
            options["call"] = self.call
        if self.ragged:  # likewise
            options["ragged"] = json.dumps(self.ragged, sort_keys=True)
        if self.views is not None:  # likewise; the schedule changes what is served, not what is stored
            options["views"] = str(self.views)
            options["view_seed"] = str(self.view_seed)
        return options


# -- argument parsing ---------------------------------------------------------------------------


def parse_ragged(value: object) -> dict[str, str | bool]:
    """``ragged=`` as ``{name: True | mask key}``: a mapping, or names (each ``True``)."""
    if value is None:
        return {}
    items: Any = value.items() if isinstance(value, Mapping) else None
    if items is None and isinstance(value, (list, tuple, set, frozenset)):
        items = [(name, True) for name in value]
    parsed: dict[str, str | bool] = {}
    for name, how in items or ():
        if not isinstance(name, str) or not (how is True or isinstance(how, str)):
            items = None
            break
        parsed[name] = how
    if items is None:
        raise ArgumentTypeError(
            expected(
                "ragged to map array names to True or to the key of a mask/lengths tensor, e.g. "
                "{'features': 'attention_mask'} or ['boxes']",
                value,
            )
        )
    return parsed


def _parse_storage_options(value: object) -> dict[str, Any] | None:
    """A dict of fsspec options or ``None``; whether they apply (a URL store) the store checks."""
    if value is None:
        return None
    if not isinstance(value, Mapping):  # the message of the store's own check
        raise TypeError(f"Expected storage_options to be a dict or None. Got {value!r}.")
    return dict(value)  # a copy of its own: the caller's dict may change


def _describe_callable(value: object) -> str:
    if callable(value):
        name = getattr(value, "__qualname__", type(value).__qualname__)
        return f"{name}:{callable_digest(value)[:16]}"
    return repr(value)
