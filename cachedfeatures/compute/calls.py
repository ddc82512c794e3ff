"""How the module is called on a collated batch, and which part of what it returns is cached.

``call=`` picks the call convention:

- ``"positional"``: ``module(batch)``, whatever the batch is.
- ``"kwargs"``: ``module(**batch)``; the batch must be a :class:`~collections.abc.Mapping` with
  string keys (a ``dict``, a tokenizer's ``BatchEncoding``).
- ``"auto"`` (the default): ``module(**batch)`` when the batch is a non-empty ``Mapping`` whose
  keys are all strings that name parameters of the module's ``forward`` (of the callable itself
  for a function), each of which can be passed by keyword (``**kwargs`` does not count);
  ``module(batch)`` otherwise. A ``transformers`` model given a tokenizer's output is called
  with keywords (``input_ids``, ``attention_mask`` are parameters of its ``forward``); a
  ``SentenceTransformer`` (``forward(input)``) and a module whose ``forward(self, batch)`` reads
  a dict get the dict as one argument.

``output=`` picks what to cache from what the module returns: a key of a ``Mapping`` (a
``transformers`` ``ModelOutput``, a ``SentenceTransformer``'s features dict), an attribute of
another object, an index of a tuple (or the position in a ``ModelOutput``), or a callable
``output -> tensors``, which runs under ``torch.inference_mode()`` right after the module. A
callable that takes two arguments is called as ``selection(output, batch)`` with the batch the
module was given (on the device): mean pooling needs the batch's ``attention_mask``. The
selection is part of the entry key; a callable is hashed with what it reads, like
``collate_fn``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

import torch

from cachedfeatures.compute.fingerprint import callable_digest
from cachedfeatures.compute.state_hash import unwrap_compiled
from cachedfeatures.errors import CallConventionError, ModuleOutputError

__all__ = [
    "Call",
    "ModuleCaller",
    "OutputSelection",
    "describe_selection",
    "keyword_parameters",
    "non_tensor_output_message",
    "parse_call",
    "parse_output",
    "select_output",
    "takes_batch",
]

Call = Literal["positional", "kwargs", "auto"]
OutputSelection = str | int | Callable[..., Any]

# Outputs to suggest first in an error, most likely to be what a user caches.
_LIKELY_OUTPUTS = ("sentence_embedding", "pooler_output", "last_hidden_state", "embeddings", "logits")


def parse_call(call: object) -> Call:
    if isinstance(call, str) and call in get_args(Call):
        return call  # type: ignore[return-value]
    raise ValueError(f"Expected call to be one of {list(get_args(Call))}. Got {call!r}.")


def parse_output(output: object) -> OutputSelection | None:
    if output is None or callable(output):
        return output  # type: ignore[return-value]
    if isinstance(output, str) and output:
        return output
    if isinstance(output, int) and not isinstance(output, bool):
        return output
    raise TypeError(
        "Expected output to be a key or attribute name (str), an index (int), a callable "
        f"output -> tensors, or None. Got {output!r}."
    )


def describe_selection(output: OutputSelection) -> str:
    """The selection as it goes into the entry key: a callable by its name and digest."""
    if callable(output):
        name = getattr(output, "__qualname__", type(output).__qualname__)
        return f"{name}:{callable_digest(output)[:16]}"
    return repr(output)


def keyword_parameters(module: Callable[..., Any]) -> frozenset[str]:
    """The parameters of the module's ``forward`` (or of the callable) that take a keyword."""
    target: Any = module
    if isinstance(module, torch.nn.Module):
        target = unwrap_compiled(module).forward
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature
        return frozenset()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(name for name, p in signature.parameters.items() if p.kind in kinds)


def _string_keys(batch: Any) -> bool:
    return isinstance(batch, Mapping) and all(isinstance(key, str) for key in batch)


class ModuleCaller:
    """Calls ``module`` on a batch by the ``call`` convention (see the module docstring)."""

    def __init__(self, module: Callable[..., Any], call: Call = "auto") -> None:
        self.module = module
        self.call = call
        self._keywords: frozenset[str] | None = None

    def uses_kwargs(self, batch: Any) -> bool:
        """Whether ``batch`` is passed as keyword arguments."""
        if self.call == "positional":
            return False
        if self.call == "kwargs":
            if not _string_keys(batch):
                raise CallConventionError(
                    "call='kwargs' passes the batch as keyword arguments (module(**batch)), so it "
                    "must be a Mapping with string keys (a dict, a tokenizer's BatchEncoding). "
                    f"Got {_describe(batch)} from collate_fn. Return a dict from collate_fn, or "
                    "pass call='positional' to call module(batch)."
                )
            return True
        if not _string_keys(batch) or not batch:
            return False
        if self._keywords is None:
            self._keywords = keyword_parameters(self.module)
        return all(key in self._keywords for key in batch)

    def __call__(self, batch: Any) -> Any:
        if self.uses_kwargs(batch):
            return self.module(**batch)
        return self.module(batch)

    def explain(self, batch: Any) -> str | None:
        """Why a Mapping batch was passed as one argument under ``"auto"``, for an error note."""
        if self.call != "auto" or not isinstance(batch, Mapping) or self.uses_kwargs(batch):
            return None
        keys = list(batch)
        if self._keywords is None:
            self._keywords = keyword_parameters(self.module)
        others = [key for key in keys if key not in self._keywords]
        return (
            f"the batch (a {type(batch).__name__} with keys {keys}) was passed as one argument, "
            f"module(batch), because {others} are not parameters of the module's forward "
            f"{sorted(self._keywords)}; pass call='kwargs' to call module(**batch) (dropping "
            "those keys in collate_fn), or keep call='auto' for a forward that takes the dict."
        )


def takes_batch(selection: Callable[..., Any]) -> bool:
    """Whether a callable ``output=`` takes the batch as a second argument."""
    try:
        parameters = list(inspect.signature(selection).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return True
    return sum(p.kind in positional for p in parameters) >= 2


def select_output(output: Any, selection: OutputSelection | None, batch: Any = None) -> Any:
    """The part of the module's ``output`` to cache (see the module docstring); ``batch`` is
    what the module was given, for a callable that takes two arguments."""
    if selection is None:
        return output
    if callable(selection):
        return selection(output, batch) if takes_batch(selection) else selection(output)
    if isinstance(selection, str):
        if isinstance(output, Mapping):
            if selection in output:
                return output[selection]
            raise ModuleOutputError(
                f"output={selection!r} is not a key of the {type(output).__name__} the module "
                f"returned; its keys are {list(output)}. Pass one of them (a ModelOutput leaves "
                "out fields that are None)."
            )
        if hasattr(output, selection):
            return getattr(output, selection)
        raise ModuleOutputError(
            f"output={selection!r} is not an attribute of the {type(output).__name__} the module "
            f"returned; its attributes are {_attributes(output)}. Pass one of them."
        )
    if isinstance(output, Mapping):
        items = list(output.values())
    elif isinstance(output, (tuple, list)):
        items = list(output)
    else:
        raise ModuleOutputError(
            f"output={selection!r} indexes a tuple or a ModelOutput, but the module returned "
            f"{_describe(output)}; leave output out to cache it whole, or pass a callable."
        )
    if not -len(items) <= selection < len(items):
        raise ModuleOutputError(
            f"output={selection!r} is out of range: the module returned {_describe(output)}; pass "
            f"an index from 0 to {len(items) - 1}."
        )
    return items[selection]


def non_tensor_output_message(output: Any) -> str:
    """An error message for an output that is not a tensor or a tuple/dict of tensors.

    It names the offending key or attribute and suggests ``output=`` with a tensor that is there.
    """
    what = _describe(output)
    tensors: list[str | int] = []
    offending: list[str] = []
    if isinstance(output, Mapping):
        for key, value in output.items():
            if isinstance(value, torch.Tensor):
                tensors.append(key)
            else:
                offending.append(f"{key!r} is a {type(value).__name__}")
    elif isinstance(output, (tuple, list)):
        for index, value in enumerate(output):
            if isinstance(value, torch.Tensor):
                tensors.append(index)
            else:
                offending.append(f"item {index} is a {type(value).__name__}")
    elif not isinstance(output, (str, bytes, int, float, bool)) and output is not None:
        for name in _attributes(output):
            if isinstance(getattr(output, name, None), torch.Tensor):
                tensors.append(name)
    detail = f" ({', '.join(offending[:6])}, not a tensor)" if offending else ""
    if tensors:
        likely = next((k for k in _LIKELY_OUTPUTS if k in tensors), tensors[0])
        kind = (
            "keys"
            if isinstance(output, Mapping)
            else ("indices" if isinstance(likely, int) else "attributes")
        )
        hint = (
            f"Pass output={likely!r} to cache one of its tensors (tensor {kind}: {tensors}), or "
            "output=<callable> to compute what to cache from it (mean pooling, say)."
        )
    else:
        hint = "Pass output=<callable> that picks or computes the tensors to cache from it."
    return (
        f"the module returned {what}{detail}; it must return a tensor, or a tuple or dict (with "
        f"string keys) of tensors, each with the batch as its first dimension. {hint}"
    )


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a Tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list, Mapping)):
        inner = value.values() if isinstance(value, Mapping) else value
        return f"a {type(value).__name__} of {[type(v).__name__ for v in inner]}"
    return f"a {type(value).__name__}"


def _attributes(value: Any) -> list[str]:
    try:
        names = list(vars(value))
    except TypeError:
        names = [name for name in dir(value) if not name.startswith("_")]
    return [name for name in names if not name.startswith("_")]
