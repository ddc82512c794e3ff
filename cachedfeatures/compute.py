"""Running the module on a batch of inputs: collate, move to the device, call it under
``torch.inference_mode()``, and bring the outputs back to the CPU in the storage dtype."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from cachedfeatures.layout import OutputLayout

Collate = Callable[[list[Any]], Any]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


class FeatureComputer:
    """Calls ``module`` on collated batches of inputs on ``device``.

    Args:
        module: the frozen feature module (or a plain function of tensors).
        device: where the module runs; an ``nn.Module`` is moved there on first use.
        dtype: storage dtype for floating-point outputs, or ``None`` to keep the module's.
        collate_fn: turns a list of inputs into the module's argument (default: stack).
    """

    def __init__(
        self,
        module: Callable[..., Any],
        device: torch.device,
        dtype: torch.dtype | None,
        collate_fn: Collate | None = None,
    ) -> None:
        self.module = module
        self.device = device
        self.dtype = dtype
        self.collate_fn = collate_fn or default_collate
        self._placed = False
        self.calls = 0

    def run(self, inputs: Sequence[Any]) -> Any:
        """The module's raw output for one batch of inputs."""
        if not self._placed and isinstance(self.module, torch.nn.Module):
            self.module.to(self.device)
            self._placed = True
        batch = _to_device(self.collate_fn(list(inputs)), self.device)
        self.calls += 1
        with torch.inference_mode():
            return self.module(batch)

    def __call__(self, inputs: Sequence[Any], layout: OutputLayout) -> dict[str, torch.Tensor]:
        """One CPU tensor per output array, cast to the storage dtype."""
        output = self.run(inputs)
        return layout.split(output, len(inputs), self.dtype)
