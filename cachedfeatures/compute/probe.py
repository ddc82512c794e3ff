"""Clear errors when the first sample (the probe that creates an entry) cannot go through the
module: name the sample, the field and its type, and the fix.

The usual causes have a known fix: a ``PIL.Image`` where the module needs a tensor (add
``ToTensor()``), an int label as the input (``input_key`` points at the label), a Hugging Face
``datasets.Dataset`` without ``with_format("torch")`` (rows of Python lists), a string without
a tokenizer. Those become an :class:`~cachedfeatures.errors.InputTypeError` that says so; any
other failure keeps its type and gets a note naming the sample and its input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from cachedfeatures.errors import (
    CacheError,
    FieldNotStorableError,
    InputBatchError,
    InputTypeError,
    ModuleOutputError,
)

__all__ = ["explain_probe_failure"]

_WRAPPER_DEPTH = 4  # Subset(Subset(...)): how far ``.dataset`` is followed to find a HF dataset
_TEXT_DOC = "docs/recipes/text.md"


def explain_probe_failure(
    error: Exception,
    *,
    index: int,
    sample: Any,
    input_key: int | str | Callable[[Any], Any],
    dataset: Any,
    default_collate: bool,
) -> InputTypeError | None:
    """An :class:`InputTypeError` naming the fix when the cause is known, else ``None`` (after
    adding a note with the sample, the field and its type to ``error``).

    Args:
        error: what running the probe through the collate and the module raised.
        index: the probe sample's index in the dataset.
        sample: the probe sample.
        input_key: the dataset's ``input_key``.
        dataset: the wrapped dataset (a Hugging Face dataset is recognised through wrappers).
        default_collate: whether the collate is torch's ``default_collate`` (a custom one may
            take images or strings on purpose).
    """
    if isinstance(error, CacheError) and not isinstance(error, (ModuleOutputError, InputBatchError)):
        # Our own errors of the layout (an input_key not found, a field that cannot be stored, a
        # bad field name) already name the field and the fix. One exception: a label given as
        # the input while the sample holds an image elsewhere (which then is the "field" that
        # cannot be stored): the input_key is what to fix. Arrays can be stored, so with one
        # the field that cannot is something else, and its own message says what.
        label = _is_label(_input(sample, input_key))
        if not (isinstance(error, FieldNotStorableError) and label and _image_fields(sample, input_key)):
            return None
    field = _field(input_key, sample)
    value = _input(sample, input_key)
    failure = f"{type(error).__name__}: {error}"
    where = f"sample {index}'s input {field} is {_describe(value)}"
    fix = _fix(value, sample, input_key, dataset, default_collate)
    if fix is not None:
        return InputTypeError(f"{where}. {fix} (Caching it failed with {failure})")
    if not isinstance(error, CacheError):
        error.add_note(
            f"cachedfeatures: while running sample {index} (the first one, which creates the "
            f"store entry) through the collate and the module; its input {field} is {_describe(value)}."
        )
    return None


def _fix(value: Any, sample: Any, input_key: Any, dataset: Any, default_collate: bool) -> str | None:
    hf = _hugging_face_dataset(dataset)
    unformatted = hf is not None and (hf.format or {}).get("type") in (None, "python")
    with_format = (
        "The wrapped datasets.Dataset has no format, so its rows hold Python lists and PIL images: "
        "wrap dataset.with_format('torch') instead, which gives tensors."
    )
    if _is_label(value):
        others = _tensor_fields(sample, input_key)
        hint = f" pass input_key={others[0]!r}" if others else " pass the input_key of the model's input"
        return f"input_key={input_key!r} probably points at the label, not the model's input;{hint}" + (
            f" (fields that hold arrays: {others})." if others else "."
        )
    if not default_collate:
        return None
    if _is_pil(value):
        if unformatted:
            return with_format
        return (
            "The module needs tensors: add torchvision.transforms.ToTensor() (or v2.ToImage() then "
            "v2.ToDtype(torch.float32, scale=True)) to the dataset's transform, or pass a "
            "collate_fn that turns images into a batch tensor (an image processor)."
        )
    if isinstance(value, str) or (isinstance(value, (list, tuple)) and value and isinstance(value[0], str)):
        return (
            "Text must be tokenized: pass the tokenizer as collate_fn (functools.partial(tokenizer, "
            "padding=True, truncation=True, return_tensors='pt'), or a SentenceTransformer's "
            f"model.preprocess), and output= to pick what to cache; see {_TEXT_DOC}."
        )
    if isinstance(value, (list, tuple)) and unformatted:
        return with_format
    if isinstance(value, list) and value and isinstance(value[0], (int, float, list)):
        return (
            "default_collate turns a list of numbers into a list of tensors, not one tensor: "
            "return a tensor (torch.tensor(values)) from the dataset, or pass a collate_fn."
        )
    return None


def _is_label(value: Any) -> bool:
    """A single integer: the usual label, fed to the module by mistake."""
    if isinstance(value, (bool, int, np.integer)):
        return True
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        return not (
            value.dtype.is_floating_point if isinstance(value, torch.Tensor) else value.dtype.kind == "f"
        )
    return False


def _is_pil(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.")


def _image_fields(sample: Any, input_key: Any) -> list[int | str]:
    """Top-level fields of ``sample`` other than the input that hold PIL images."""
    items: list[tuple[int | str, Any]] = []
    if isinstance(sample, Mapping):
        items = [(key, value) for key, value in sample.items() if isinstance(key, (int, str))]
    elif isinstance(sample, (tuple, list)):
        items = list(enumerate(sample))
    return [key for key, value in items if key != input_key and _is_pil(value)]


def _tensor_fields(sample: Any, input_key: Any) -> list[int | str]:
    """Top-level fields of ``sample`` other than the input that hold arrays or images."""
    items: list[tuple[int | str, Any]] = []
    if isinstance(sample, Mapping):
        items = [(key, value) for key, value in sample.items() if isinstance(key, (int, str))]
    elif isinstance(sample, (tuple, list)):
        items = list(enumerate(sample))
    return [
        key
        for key, value in items
        if key != input_key
        and (_is_pil(value) or (isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim >= 1))
    ]


def _hugging_face_dataset(dataset: Any) -> Any:
    for _ in range(_WRAPPER_DEPTH):
        if type(dataset).__module__.startswith("datasets.") and hasattr(dataset, "format"):
            return dataset
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            return None
    return None


def _input(sample: Any, input_key: Any) -> Any:
    try:
        if callable(input_key):
            return input_key(sample)
        if isinstance(sample, (Mapping, tuple, list)):
            return sample[input_key]
    except Exception:  # the lookup itself fails: describe the sample
        return sample
    return sample


def _field(input_key: Any, sample: Any) -> str:
    if callable(input_key):
        return f"(picked by input_key={getattr(input_key, '__qualname__', repr(input_key))})"
    if not isinstance(sample, (Mapping, tuple, list)):
        return "(the sample itself)"
    return f"sample[{input_key!r}]"


def _describe(value: Any) -> str:
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if type(value).__module__ == "builtins":
        name = type(value).__qualname__
    article = "an" if name[0].lower() in "aeiou" else "a"
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    if _is_pil(value):
        return f"a {name} ({getattr(value, 'mode', '?')}, size {getattr(value, 'size', '?')})"
    if isinstance(value, (bool, int, float, np.generic)):
        return f"{article} {name} ({value!r})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a str ({shown!r})"
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(item).__name__ for item in value[:16]})
        return f"{article} {name} of {len(value)} items ({', '.join(kinds) or 'empty'})"
    return f"{article} {name}"
