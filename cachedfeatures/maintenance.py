"""Looking after a store: describe its entries, verify every chunk, remove entries.

These back the ``cachedfeatures`` command line (``info``, ``verify``, ``rm``) and return
plain JSON-ready dicts, so scripts and notebooks can use them too.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from zarr.core.sync import sync

from cachedfeatures.format.names import ACCESS, VALID, offsets_name, values_name
from cachedfeatures.format.specs import ArraySpec
from cachedfeatures.pruning import (
    STALE_PARTIAL_SECONDS,
    measure,
    open_entries,
    remove_orphans,
)
from cachedfeatures.store.access import last_used, read_access
from cachedfeatures.store.chunk_bytes import (
    chunk_keys,
    compression_ratio,
    decoded_chunk_nbytes,
    drop_chunk,
)
from cachedfeatures.store.explore import plural, view_coverage
from cachedfeatures.store.feature_store import (
    Entry,
    FeatureStore,
    _create_array,
    _create_valid,
    _with_checksum,
    default_compressor,
    holds_entries,
    rebuild_root,
)
from cachedfeatures.store.ragged import create_ragged

__all__ = ["describe_store", "remove_entry", "repair_root", "verify_store"]


def describe_store(store: FeatureStore) -> dict[str, Any]:
    """Every entry with its descriptions, rows valid, bytes, compression, layout and use."""
    usage = measure(store, per_array=True)
    readable, broken = open_entries(store)
    entries = []
    for entry in readable:
        stored = usage.chunks.get(entry.name, {})
        sizes = usage.array_chunks.get(entry.name, {})
        decoded = decoded_chunk_nbytes(entry)
        ratio = compression_ratio(entry, sizes)
        views: list[int] | None = None
        try:
            mask = entry.valid_mask()
            rows_valid: int | None = int(mask.sum())
            coverage = view_coverage(entry, mask)
            views = None if coverage is None else list(coverage)
        except Exception:  # a damaged valid chunk: verify says which
            rows_valid = None
        try:
            used = _iso(last_used(entry))
        except Exception:  # damaged statistics: verify says so
            used = None
        entries.append(
            {
                "name": entry.name,
                "module": entry.module_description,
                "dataset": entry.dataset_description,
                "rows": entry.num_rows,
                "rows_valid": rows_valid,
                "views_valid": views,  # with views=K: valid rows of each view, else None
                "view_samples": entry.meta["views"]["samples"] if entry.meta.get("views") else None,
                "bytes": usage.entries.get(entry.name, 0),
                # What the stored chunks decode to, and that over their stored bytes (None: no chunk).
                "logical_bytes": sum(decoded.get(name, 0) for name, _ in sizes),
                "compression_ratio": None if ratio != ratio else ratio,
                "arrays": [
                    {
                        "name": spec.name,
                        "dtype": _dtype_name(spec),
                        "shape": ["L", *spec.shape] if spec.ragged else list(spec.shape),
                        **({"ragged": True} if spec.ragged else {}),
                    }
                    for spec in entry.specs
                ],
                "chunk_rows": entry.chunk_rows,
                "chunks": entry.num_chunks,
                "chunks_stored": len(stored),
                "created": entry.created,
                "last_used": used,
            }
        )
    return {
        "store": store.location,
        "bytes": usage.total,
        "orphans": len(usage.orphans),
        "entries": entries,
        "broken": [{"name": name, "problem": why} for name, why in broken.items()],
    }


def remove_entry(store: FeatureStore, name: str) -> int:
    """Delete entry ``name`` and everything in it; returns the bytes freed.

    Its metadata goes first, so from that moment it is no longer an entry.
    """
    freed = measure(store).entries.get(name, 0)
    zarr_store = store.root.store
    prefix = f"{store.root.path}/{name}" if store.root.path else name
    with store.locks.entry(name):

        async def delete() -> None:
            await zarr_store.delete(f"{prefix}/zarr.json")
            await zarr_store.delete_dir(prefix)

        sync(delete())
    return freed


def repair_root(path: str) -> dict[str, Any] | None:
    """Rebuild the root ``zarr.json`` of a local store that lost it (or holds garbage there)
    while its entries are still in place; the problem found, marked repaired, or ``None``."""
    directory = Path(path)
    target = directory / "zarr.json"
    if not directory.is_dir() or not holds_entries(directory):
        return None
    try:
        json.loads(target.read_text())
        return None  # readable: the normal checks apply
    except FileNotFoundError:
        why = "missing"
    except (OSError, ValueError):
        why = "unreadable"
    rebuild_root(directory)
    detail = f"the store's root metadata (zarr.json) was {why}; rebuilt it (the entries are kept)"
    return _problem("metadata", "<root>", None, detail, True)


def verify_store(store: FeatureStore, *, repair: bool = False) -> dict[str, Any]:
    """Decode every stored chunk and check it against the entry's metadata.

    Problems: arrays whose shape, dtype or chunking differ from the metadata (``layout``),
    chunks that do not decode (``unreadable``), rows marked valid whose chunk is absent in
    some array (``missing``), groups that are not complete entries (``incomplete``), and
    stale ``*.partial`` files (``orphan``). With ``repair``, damaged chunks are cleared
    (valid bits first, then bytes) so their rows are recomputed, and stale orphans deleted;
    ``layout`` and ``incomplete`` problems need ``cachedfeatures rm``.
    """
    problems: list[dict[str, Any]] = []
    checked = 0
    entries, broken = open_entries(store)
    for name, why in broken.items():
        kind = "metadata" if why.startswith("metadata") else "incomplete"
        if repair and _drop_broken(store, name):
            problems.append(
                _problem(kind, name, None, f"{why}; dropped the entry (its rows are recomputed)", True)
            )
        else:
            problems.append(_problem(kind, name, None, f"{why}; run with --repair to drop it, or 'rm' it"))
    for entry in entries:
        layout = _layout_problems(entry)
        if layout and repair:
            rebuilt = _rebuild_arrays(entry, layout)
            for problem in layout:
                if problem["array"] in rebuilt:
                    problem["detail"] += "; rebuilt it empty (the entry's rows are recomputed)"
                    problem["repaired"] = True
        for problem in layout:
            problem.pop("array", None)
        problems.extend(layout)
        if layout:
            continue
        for chunk in range(entry.num_chunks):
            found = _chunk_problems(entry, chunk)
            checked += 1
            if found and repair:
                drop_chunk(entry, chunk)
                for problem in found:
                    problem["repaired"] = True
            problems.extend(found)
    stale = [key for key in measure(store).orphans if _is_stale(store, key)]
    removed = set(remove_orphans(store) if repair else [])
    for key in stale:
        problems.append(
            _problem("orphan", key.split("/")[0], None, f"leftover temporary file {key}", key in removed)
        )
    return {
        "store": store.location,
        "entries": len(entries) + len(broken),
        "chunks_checked": checked,
        "ok": not problems,
        "problems": problems,
    }


def _layout_problems(entry: Entry) -> list[dict[str, Any]]:
    problems = []
    expected: dict[str, tuple[tuple[int, ...], tuple[int, ...], str]] = {
        spec.name: ((entry.num_rows, *spec.shape), (entry.chunk_rows, *spec.shape), spec.dtype)
        for spec in entry.specs
        if not spec.ragged
    }
    for spec in entry.specs:  # a ragged array's offsets (its values are checked chunk by chunk)
        if spec.ragged:
            expected[offsets_name(spec.name)] = ((entry.num_rows, 2), (entry.chunk_rows, 2), "int64")
    expected[VALID] = ((entry.num_rows,), (entry.chunk_rows,), "bool")
    for name, (shape, chunks, dtype) in expected.items():
        try:
            array = entry.group[name]
        except KeyError:
            problems.append(
                {**_problem("layout", entry.name, None, f"array {name!r} is missing"), "array": name}
            )
            continue
        except Exception as error:
            problem = _problem("layout", entry.name, None, f"array {name!r} unreadable: {error}")
            problems.append({**problem, "array": name})
            continue
        if not isinstance(array, zarr.Array):
            problems.append(_problem("layout", entry.name, None, f"{name!r} is not an array"))
            continue
        if array.shape != shape or array.chunks != chunks or not _same_dtype(array.dtype, dtype):
            problems.append(
                _problem(
                    "layout",
                    entry.name,
                    None,
                    f"array {name!r} has shape {array.shape}, chunks {array.chunks}, dtype {array.dtype}; "
                    f"the metadata says shape {shape}, chunks {chunks}, dtype {dtype}",
                )
            )
    try:
        access = entry.group[ACCESS]
        if not isinstance(access, zarr.Array) or access.shape != (entry.num_chunks, 2):
            raise ValueError(f"expected a ({entry.num_chunks}, 2) array")
        read_access(entry)
    except KeyError:
        pass  # never recorded
    except Exception as error:
        problems.append(_problem("layout", entry.name, None, f"access statistics unreadable: {error}"))
    return problems


def _drop_broken(store: FeatureStore, name: str) -> bool:
    """Delete a group that is not a readable, complete entry; whether it did.

    Under the entry lock, and only if it is still broken then: an entry being created holds
    that lock until its metadata is complete.
    """
    with store.locks.entry(name):
        try:
            if store.entry(name) is not None:
                return False
        except Exception:
            pass
        zarr_store = store.root.store
        prefix = f"{store.root.path}/{name}" if store.root.path else name
        sync(zarr_store.delete_dir(prefix))
        return True


def _rebuild_arrays(entry: Entry, problems: list[dict[str, Any]]) -> set[str]:
    """Recreate the entry's missing or unreadable arrays, empty, from its metadata.

    ``valid`` is recreated first, all false, whichever array was lost (a row is only valid with
    all its arrays), so the entry becomes one with no valid rows whose other bytes are
    overwritten as rows are recomputed. Arrays whose shape or dtype disagree with the metadata
    are left to ``rm``. Returns the names rebuilt.
    """
    lost = {problem["array"] for problem in problems if problem.get("array")}
    if not lost:
        return set()
    specs = {spec.name: spec for spec in entry.specs}
    specs.update({offsets_name(spec.name): spec for spec in entry.specs if spec.ragged})
    codec, checksum = _codecs_of(entry, lost)
    zarr_store = entry.group.store
    with entry.locks.entry(entry.name):
        for name in sorted(lost | {VALID}):  # what is left of them: nothing of it is served
            sync(zarr_store.delete_dir(f"{entry.group.path}/{name}"))
            if name in specs and specs[name].ragged:  # and the values of a ragged array's offsets
                sync(zarr_store.delete_dir(f"{entry.group.path}/{values_name(specs[name].name)}"))
        _create_valid(entry.group, entry.num_rows, entry.chunk_rows, True)
        for name in sorted(lost - {VALID}):
            spec = specs[name]
            if spec.ragged:
                compressors = _with_checksum(codec, checksum)
                create_ragged(entry.group, spec, entry.num_rows, entry.chunk_rows, compressors)
            else:
                _create_array(entry.group, spec, entry.num_rows, entry.chunk_rows, codec, checksum)
    return lost | {VALID}


def _codecs_of(entry: Entry, lost: set[str]) -> tuple[Any, bool]:
    """The compressor and checksum of the entry's readable data arrays (default: Blosc, crc32c)."""
    for spec in entry.specs:
        name = offsets_name(spec.name) if spec.ragged else spec.name
        if name in lost:
            continue
        try:
            array = entry.group[name]
        except Exception:
            continue
        if isinstance(array, zarr.Array):
            codecs = list(array.compressors)
            checksum = any(isinstance(codec, zarr.codecs.Crc32cCodec) for codec in codecs)
            others = [codec for codec in codecs if not isinstance(codec, zarr.codecs.Crc32cCodec)]
            return (others[0] if others else None), checksum
    return default_compressor(), True


def _chunk_problems(entry: Entry, chunk: int) -> list[dict[str, Any]]:
    start = chunk * entry.chunk_rows
    stop = min(start + entry.chunk_rows, entry.num_rows)
    problems = []
    try:
        valid_rows = int(np.asarray(entry.valid[start:stop], dtype=bool).sum())
    except Exception as error:
        valid_rows = stop - start  # unknown: treat every row as possibly served
        problems.append(_problem("unreadable", entry.name, chunk, f"'valid' does not decode: {error}"))
    keys = chunk_keys(entry, chunk)
    store = entry.group.store
    try:
        accepted = entry.accepted_checksums(chunk) if valid_rows else None
    except Exception as error:
        accepted = None
        problems.append(_problem("unreadable", entry.name, chunk, f"its checksums do not decode: {error}"))
    specs = {spec.name: spec for spec in entry.specs}
    outputs = entry.feature_names
    for name, ragged in entry.ragged.items():
        if not sync(store.exists(ragged.offsets_chunk_key(chunk))):
            if valid_rows:
                detail = f"{valid_rows} row(s) marked valid but {name!r} has no offsets for this chunk"
                problems.append(_problem("missing", entry.name, chunk, detail))
            continue
        try:
            found = ragged.read_chunk(chunk, start, stop)
            found.check(np.asarray(entry.valid[start:stop], dtype=bool) if valid_rows else None)
            entry.check_rows(name, chunk, found.offsets, accepted, found.values)
        except Exception as error:
            problems.append(_problem("unreadable", entry.name, chunk, f"{name!r} does not decode: {error}"))
    for name, array in entry.arrays.items():
        if not sync(store.exists(keys[name])):
            # Zarr skips chunks equal to the fill value, so only output arrays must be present.
            if valid_rows and name in outputs:
                problems.append(
                    _problem(
                        "missing",
                        entry.name,
                        chunk,
                        f"{plural(valid_rows, 'row')} marked valid but {name!r} has no bytes for this chunk",
                    )
                )
            continue
        try:
            data = np.asarray(array[start:stop])
        except Exception as error:
            problems.append(_problem("unreadable", entry.name, chunk, f"{name!r} does not decode: {error}"))
            continue
        try:
            entry.check_rows(name, chunk, data, accepted)
        except ValueError as error:  # another chunk's (or entry's) rows, or changed after writing
            problems.append(_problem("unreadable", entry.name, chunk, str(error)))
            continue
        want = (stop - start, *specs[name].shape)
        if data.shape != want or not _same_dtype(data.dtype, specs[name].dtype):
            problems.append(
                _problem(
                    "unreadable",
                    entry.name,
                    chunk,
                    f"{name!r} decodes to shape {data.shape} {data.dtype}; "
                    f"expected {want} {specs[name].dtype}",
                )
            )
    return problems


def _dtype_name(spec: ArraySpec) -> str:
    if spec.torch_dtype:
        return spec.torch_dtype
    return "str" if spec.dtype == "str" else np.dtype(spec.dtype).name


def _same_dtype(actual: Any, expected: str) -> bool:
    if expected == "str":
        return np.dtype(actual).kind in "TUO"
    return bool(np.dtype(actual) == np.dtype(expected))


def _problem(kind: str, entry: str, chunk: int | None, detail: str, repaired: bool = False) -> dict[str, Any]:
    return {"kind": kind, "entry": entry, "chunk": chunk, "detail": detail, "repaired": repaired}


def _is_stale(store: FeatureStore, key: str) -> bool:
    if store.backend.root is None:
        return False
    try:
        mtime = (store.backend.root / store.root.path / key).stat().st_mtime
    except FileNotFoundError:
        return False
    return _dt.datetime.now().timestamp() - mtime >= STALE_PARTIAL_SECONDS


def _iso(timestamp: float | None) -> str | None:
    if not timestamp:
        return None
    return _dt.datetime.fromtimestamp(timestamp, _dt.UTC).isoformat(timespec="seconds")
