"""Whether a module's outputs depend on its training mode, judged by what its parts do.

A module in training mode is refused only where that changes its outputs: dropout with
``p > 0``, batch norm (batch statistics), instance norm that tracks running statistics, and any
module whose own code reads ``self.training`` (``F.dropout(x, training=self.training)``). A
wrapper left in training mode around an eval-mode backbone, or a bare ``nn.Linear``, is fine.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from torch import nn

from cachedfeatures.compute.state_hash import all_names

__all__ = ["mode_dependent_submodules", "training_mode_message"]

# Methods that mention ``training`` to set or show it, not to compute with it.
_MODE_METHODS = frozenset(
    {"train", "eval", "__init__", "__repr__", "extra_repr", "__setstate__", "__getstate__"}
)


def mode_dependent_submodules(module: Callable[..., Any]) -> list[tuple[str, str]]:
    """``(name, why)`` for each submodule in training mode whose output depends on it."""
    if not isinstance(module, nn.Module):
        return []
    found = []
    for name, sub in module.named_modules():
        if not sub.training:
            continue
        why = _why_mode_dependent(sub)
        if why is not None:
            found.append((name or type(module).__name__, why))
    return found


def training_mode_message(module: nn.Module, found: list[tuple[str, str]], fix: str) -> str:
    """The error message for a module with mode-dependent submodules in training mode."""
    parts = ", ".join(f"{name} ({why})" for name, why in found[:4])
    more = f" and {len(found) - 4} more" if len(found) > 4 else ""
    return (
        f"{type(module).__name__} has submodules in training mode whose outputs depend on it: "
        f"{parts}{more}. Their outputs would be random or depend on the batch, so they cannot be "
        f"cached. {fix}"
    )


def _why_mode_dependent(sub: nn.Module) -> str | None:
    if isinstance(sub, nn.modules.dropout._DropoutNd):
        return f"dropout p={sub.p}" if sub.p > 0 else None
    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
        return "batch norm uses batch statistics"
    if isinstance(sub, nn.modules.instancenorm._InstanceNorm):
        return "instance norm with running statistics" if sub.track_running_stats else None
    if isinstance(sub, (nn.RNNBase, nn.MultiheadAttention)):
        dropout = float(getattr(sub, "dropout", 0.0))
        return f"dropout={dropout}" if dropout > 0 else None
    if _reads_training(type(sub)):
        return "its code reads self.training"
    return None


_READS_TRAINING: dict[type, bool] = {}


def _reads_training(cls: type) -> bool:
    """Whether a method of ``cls`` (other than nn.Module's own) reads ``training``."""
    known = _READS_TRAINING.get(cls)
    if known is None:
        known = _READS_TRAINING[cls] = _scan_for_training(cls)
    return known


def _scan_for_training(cls: type) -> bool:
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        for name, member in vars(klass).items():
            function = getattr(member, "__func__", member)
            if name in _MODE_METHODS or not isinstance(function, types.FunctionType):
                continue
            if "training" in all_names(function.__code__):
                return True
    return False
