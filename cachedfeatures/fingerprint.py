"""Fingerprints of the module, the dataset and the options: never serve stale features.

An entry in the store is keyed by all three. The module's fingerprint covers its class, its
configuration (``repr``), the code of its own (non-torch) classes and a hash of every weight
and buffer, so a fine-tuned checkpoint loaded into the same class is a different module. The
dataset's covers its class, its length and a hash of a few probe samples, so a changed
transform or changed files give a new entry. Comments, docstrings and formatting are not part
of any fingerprint: a fingerprint changes only when something that affects values changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cachedfeatures import _hashing
from cachedfeatures.errors import NonDeterministicDatasetError

FORMAT_VERSION = 1
NUM_PROBES = 3


@dataclass(frozen=True)
class Fingerprint:
    """A digest plus the words and details that explain it (stored in the entry's attrs)."""

    digest: str
    description: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "description": self.description, **self.details}


def qualified_name(obj: object) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def module_fingerprint(module: Callable[..., Any], version: str | None = None) -> Fingerprint:
    """Fingerprint ``module`` (an ``nn.Module`` or a plain function of tensors).

    With ``version``, the user vouches for the weights and code: only the class and the
    version string are hashed, which skips hashing a very large model at start-up.
    """
    if not isinstance(module, torch.nn.Module):
        name = getattr(module, "__qualname__", qualified_name(module))
        if version is not None:
            return Fingerprint(_hashing.hash_strings("fn", name, version), f"{name} (version {version!r})")
        code = _hashing.code_fingerprint(module)
        return Fingerprint(
            _hashing.hash_strings("fn", name, code), f"function {name}", {"class": name, "code": code}
        )

    cls_name = qualified_name(module)
    if version is not None:
        digest = _hashing.hash_strings("module", cls_name, version)
        return Fingerprint(
            digest, f"{cls_name} (version {version!r})", {"class": cls_name, "version": version}
        )

    classes = sorted({type(m) for m in module.modules()}, key=qualified_name)
    own = [cls for cls in classes if not cls.__module__.startswith("torch.")]
    code = _hashing.hash_strings(*(f"{qualified_name(c)}:{_hashing.code_fingerprint(c)}" for c in own))
    config = _hashing.hash_strings(repr(module))

    hasher = _hashing.new_hasher()
    num_params = 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        hasher.update(name.encode())
        _hashing.update_value(hasher, tensor)
        num_params += tensor.numel()
    weights = hasher.hexdigest()

    digest = _hashing.hash_strings("module", cls_name, config, code, weights)
    description = (
        f"{cls_name}, {_count(num_params)} weights and buffers, weights {weights[:12]}, "
        f"config {config[:12]}, code {code[:12]}"
    )
    details = {
        "class": cls_name,
        "config": config,
        "code": code,
        "weights": weights,
        "num_weights": num_params,
        "repr": repr(module)[:2000],
    }
    return Fingerprint(digest, description, details)


def probe_indices(length: int, num_probes: int = NUM_PROBES) -> list[int]:
    """Spread probes over the dataset: first, evenly spaced middles, last."""
    if length == 0 or num_probes == 0:
        return []
    if num_probes == 1:
        return [0]
    step = (length - 1) / (num_probes - 1)
    return sorted({round(i * step) for i in range(num_probes)})


def dataset_fingerprint(
    dataset: Any,
    probes: Sequence[tuple[int, Any]],
    extract_input: Callable[[Any], Any],
    *,
    version: str | None = None,
    allow_nondeterministic: bool = False,
    reload: Callable[[int], Any] | None = None,
) -> Fingerprint:
    """Fingerprint ``dataset`` from its class, its length and the given probe samples.

    ``reload`` loads a probe again; if its input differs from the first load, the dataset
    draws random augmentations, and caching would freeze one draw: that raises
    :class:`NonDeterministicDatasetError` unless ``allow_nondeterministic`` is set, in which
    case only the non-input fields of the probes are hashed.
    """
    cls_name = qualified_name(dataset)
    length = len(dataset)
    if version is not None:
        digest = _hashing.hash_strings("dataset", cls_name, str(length), version)
        return Fingerprint(
            digest,
            f"{cls_name} of {length} samples (version {version!r})",
            {"class": cls_name, "length": length, "version": version},
        )

    deterministic = True
    if probes and reload is not None:
        index, sample = probes[0]
        again = reload(index)
        deterministic = _hashing.hash_value(extract_input(sample)) == _hashing.hash_value(
            extract_input(again)
        )
        if not deterministic and not allow_nondeterministic:
            raise NonDeterministicDatasetError(
                f"sample {index} of {cls_name} loaded twice gave two different inputs: the "
                "dataset applies random augmentation (or reads changing data). Caching would "
                "freeze one random draw and serve it every epoch. Cache the dataset without its "
                "random transforms and apply them to the features or after the cache, or pass "
                "allow_nondeterministic=True to cache one draw on purpose."
            )

    hasher = _hashing.new_hasher()
    for index, sample in probes:
        hasher.update(str(index).encode())
        if deterministic:
            _hashing.update_value(hasher, sample)
        else:  # only the fields that do not change from load to load
            _hashing.update_value(hasher, _without_input(sample, extract_input))
    samples = hasher.hexdigest()
    digest = _hashing.hash_strings("dataset", cls_name, str(length), samples)
    description = f"{cls_name} of {length} samples, probes {[i for i, _ in probes]} hash {samples[:12]}"
    if not deterministic:
        description += " (non-deterministic inputs, not hashed)"
    details = {
        "class": cls_name,
        "length": length,
        "probes": [i for i, _ in probes],
        "samples": samples,
        "deterministic": deterministic,
    }
    return Fingerprint(digest, description, details)


def _without_input(sample: Any, extract_input: Callable[[Any], Any]) -> Any:
    target = extract_input(sample)
    if sample is target:
        return None
    if isinstance(sample, Mapping):
        return {k: v for k, v in sample.items() if v is not target}
    if isinstance(sample, (tuple, list)):
        return [v for v in sample if v is not target]
    return None


def options_json(options: Mapping[str, Any]) -> str:
    return json.dumps({"format_version": FORMAT_VERSION, **options}, sort_keys=True, default=str)


def entry_id(module: Fingerprint, dataset: Fingerprint, options: Mapping[str, Any]) -> str:
    """The entry key: one entry per (module, dataset, options) triple."""
    return _hashing.hash_strings(module.digest, dataset.digest, options_json(options))[:16]


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
