"""Stable content hashes of tensors, arrays, nested samples and code.

Hashes must be equal across processes and sessions for equal content, and differ when the
content differs. They cover every byte (no subsampling), with BLAKE2b, which hashes at
about 1 GB/s on one core.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from cachedfeatures.compute import state_hash

DIGEST_SIZE = 16
Hasher = hashlib.blake2b


def new_hasher() -> Hasher:
    return hashlib.blake2b(digest_size=DIGEST_SIZE)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of ``tensor``, on CPU and contiguous (bfloat16 included)."""
    source = tensor.detach().to("cpu").reshape(-1)
    if source.numel() == 0:  # an empty tensor has stride 0, which view(uint8) refuses
        return memoryview(b"")
    # A fresh dense copy: contiguous() keeps odd strides on size-1 dims (a[..., 0] of shape
    # (1, 2)), and view(uint8) needs stride 1.
    flat = torch.empty(source.shape, dtype=source.dtype).copy_(source)
    return memoryview(flat.view(torch.uint8).numpy().data)


def update_value(hasher: Hasher, value: Any) -> None:
    """Feed ``value`` (tensors, arrays, scalars, strings, nested containers) to ``hasher``."""
    if isinstance(value, torch.Tensor):
        hasher.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        hasher.update(tensor_bytes(value))
    elif isinstance(value, np.ndarray):
        hasher.update(f"A{value.dtype.str}{value.shape}".encode())
        if value.dtype.hasobject:
            hasher.update(pickle.dumps(value.tolist()))
        else:
            hasher.update(np.ascontiguousarray(value).tobytes())  # .data.cast fails on empty arrays
    elif isinstance(value, Mapping):
        hasher.update(f"D{len(value)}".encode())
        items = list(value.items())
        if type(value) is dict:  # equal dicts hash alike, whatever order they were built in
            items.sort(key=lambda item: hash_value(item[0]))
        for key, item in items:
            hasher.update(repr(key).encode())
            update_value(hasher, item)
    elif isinstance(value, (tuple, list)):
        hasher.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            update_value(hasher, item)
    elif value is None or isinstance(value, (bool, int, float, str, bytes, np.generic)):
        hasher.update(f"S{type(value).__name__}:{value!r}".encode())
    else:  # sets, dataclasses, other objects: walked, never pickled (pickles of tensors
        # name their storage by address, and of sets follow the hash seed)
        state = state_hash.StateHasher()
        state.update(value, type(value).__qualname__)
        hasher.update(f"O{type(value).__qualname__}{state.hexdigest()}".encode())


def hash_value(value: Any) -> str:
    hasher = new_hasher()
    update_value(hasher, value)
    return hasher.hexdigest()


def hash_strings(*parts: str) -> str:
    hasher = new_hasher()
    for part in parts:
        hasher.update(part.encode())
        hasher.update(b"\x00")
    return hasher.hexdigest()


def code_fingerprint(obj: Callable[..., Any] | type) -> str:
    """A hash of what ``obj``'s code does, blind to comments, docstrings and formatting.

    See :func:`cachedfeatures.compute.state_hash.code_digest`.
    """
    return state_hash.code_digest(obj)
