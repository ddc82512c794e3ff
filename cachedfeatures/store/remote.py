"""Stores behind fsspec URLs (``s3://bucket/features.zarr``, ``gs://...``, ``memory://...``).

The store layer hides local-vs-remote: a URL becomes a ``zarr.storage.FsspecStore`` and
everything above it is unchanged. Object stores have no locks, so concurrent writers must
follow the chunk-ownership rule (:mod:`cachedfeatures.store.ownership`). fsspec's async file
systems refuse to be used in a forked child (``This class is not fork-safe``), so a process
that finds itself forked reopens the store from its URL (:func:`open_url_store`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from zarr.abc.store import Store

from cachedfeatures.errors import ArgumentTypeError, InvalidArgumentError
from cachedfeatures.parse import expected

__all__ = ["is_url", "open_url_store", "parse_storage_options"]


def is_url(store: object) -> bool:
    """Whether ``store`` is an fsspec URL (``protocol://...``) rather than a local path."""
    if isinstance(store, os.PathLike):
        store = os.fspath(store)
    return isinstance(store, str) and "://" in store and not store.startswith("file://")


def parse_storage_options(storage_options: object, store: object) -> dict[str, Any] | None:
    """``None`` or a dict of fsspec options, given only with a URL store."""
    if storage_options is None:
        return None
    if not isinstance(storage_options, Mapping):
        raise ArgumentTypeError(expected("storage_options to be a dict or None", storage_options))
    if not is_url(store):
        raise InvalidArgumentError(
            "Expected a URL store (such as 's3://bucket/features.zarr'), since storage_options apply "
            f"only to URL stores. Got store={store!r}. Drop storage_options or pass a URL."
        )
    return dict(storage_options)


def open_url_store(url: str, storage_options: Mapping[str, Any] | None, *, read_only: bool) -> Store:
    """A zarr ``FsspecStore`` for ``url`` (needs the fsspec backend, e.g. ``s3fs`` for s3://)."""
    from zarr.storage import FsspecStore

    try:
        return FsspecStore.from_url(url, storage_options=dict(storage_options or {}), read_only=read_only)
    except ImportError as error:
        protocol = url.split("://", 1)[0]
        hint = (
            "pip install 'cachedfeatures[s3]'" if protocol in ("s3", "s3a") else "install its fsspec backend"
        )
        raise ImportError(f"store {url!r} needs an fsspec backend for {protocol}://; {hint}.") from error
