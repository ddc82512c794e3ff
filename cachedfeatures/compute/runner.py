"""Running the module on a batch of inputs: collate, move to the device, call it under
``torch.inference_mode()``, and bring the outputs back to the CPU in the storage dtype.
"""

from __future__ import annotations

import contextlib
import copy
from collections import UserDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from cachedfeatures.compute.calls import Call, ModuleCaller, OutputSelection, select_output
from cachedfeatures.compute.layout import OutputLayout

Collate = Callable[[list[Any]], Any]


def _to_device(batch: Any, device: torch.device, pin: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        if pin and batch.device.type == "cpu" and not batch.is_pinned():
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, Mapping):
        return _mapping_to_device(batch, device, pin)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple takes its fields one by one
        return type(batch)(*(_to_device(value, device, pin) for value in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(value, device, pin) for value in batch)
    return batch


def _mapping_to_device(batch: Mapping[Any, Any], device: torch.device, pin: bool) -> Mapping[Any, Any]:
    """Any Mapping moved, recursively; a copy of its own type where that can be made safely
    (``dict`` subclasses, ``UserDict`` such as a tokenizer's ``BatchEncoding``), else a ``dict``.

    The collated batch is never changed in place: it may hold the dataset's own tensors.
    """
    moved = {key: _to_device(value, device, pin) for key, value in batch.items()}
    if type(batch) is dict:
        return moved
    if isinstance(batch, (dict, UserDict)):
        try:
            same = copy.copy(batch)
            for key, value in moved.items():
                same[key] = value
        except Exception:  # an odd subclass: the values matter, not the type
            return moved
        return same
    return moved


class FeatureComputer:
    """Calls ``module`` on collated batches of inputs on ``device``.

    Args:
        module: the frozen feature module (or a plain function of tensors).
        device: where the module runs; an ``nn.Module`` is moved there on first use.
        dtype: storage dtype for floating-point outputs, or ``None`` to keep the module's.
        collate_fn: turns a list of inputs into the module's argument (default: stack).
        autocast_dtype: run the module under ``torch.autocast`` with this dtype (for example
            ``torch.bfloat16``), or ``None`` (default) for no autocast.
        call: ``"positional"`` (``module(batch)``), ``"kwargs"`` (``module(**batch)``) or
            ``"auto"`` (default); see :mod:`cachedfeatures.compute.calls`.
        output: what to cache from the module's output: a key, an attribute, an index or a
            callable ``output -> tensors`` or ``(output, batch) -> tensors``; ``None`` (default)
            caches it whole.
    """

    def __init__(
        self,
        module: Callable[..., Any],
        device: torch.device,
        dtype: torch.dtype | None,
        collate_fn: Collate | None = None,
        autocast_dtype: torch.dtype | None = None,
        call: Call = "auto",
        output: OutputSelection | None = None,
    ) -> None:
        self.module = module
        self.caller = ModuleCaller(module, call)
        self.output = output
        self.device = device
        self.dtype = dtype
        self.collate_fn = collate_fn or default_collate
        self.autocast_dtype = autocast_dtype
        self._placed = False
        self.calls = 0
        # The collated batch of the last call (on the device), for outputs whose mask is in it.
        self.last_batch: Any = None

    def run(self, inputs: Sequence[Any], *, pin_memory: bool = False) -> Any:
        """The module's raw output for one batch of inputs.

        With ``pin_memory`` and a CUDA device, the collated batch is pinned and copied with
        ``non_blocking=True``.
        """
        if not self._placed and isinstance(self.module, torch.nn.Module):
            self.module.to(self.device)
            self._placed = True
        pin = pin_memory and self.device.type == "cuda"
        batch = self.last_batch = _to_device(self.collate_fn(list(inputs)), self.device, pin)
        self.calls += 1
        with torch.inference_mode(), self._autocast():
            try:
                output = self.caller(batch)
            except Exception as error:
                why = self.caller.explain(batch)  # a Mapping batch passed as one argument
                if why is not None:
                    error.add_note(f"cachedfeatures: {why}")
                raise
            return select_output(output, self.output, batch)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def __call__(
        self, inputs: Sequence[Any], layout: OutputLayout, *, pin_memory: bool = False, copy: bool = True
    ) -> dict[str, torch.Tensor]:
        """One CPU tensor per output array, cast to the storage dtype; in memory of its own
        unless ``copy=False`` (the caller copies before the module's next call)."""
        output = self.run(inputs, pin_memory=pin_memory)
        batch, self.last_batch = self.last_batch, None
        return layout.split(output, len(inputs), self.dtype, copy=copy, batch=batch)
