"""Two creators of one entry with storage options that are not part of its name (compressor,
chunk_rows, checksum): the second gets an ``EntryConflictError`` and the first keeps its rows.

On a local store the entry lock serialises creators, so a late one finds the entry complete
and uses it; on an object store nothing does, and a creator may look before another's attrs
land. The tests stand in for that: a creator whose first look saw no entry, and one that
starts while another is between its arrays and its attrs (a shared in-memory store, which has
no lock between its ``FeatureStore`` objects, as an object store has none between processes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from zarr.storage import MemoryStore

from cachedfeatures import CachedFeatureDataset, EntryConflictError, FeatureStore
from cachedfeatures.format.names import CREATING_KEY
from cachedfeatures.store import feature_store
from tests.helpers import Backbone, Samples, reference

N = 32


def make(store: Any, **options: Any) -> CachedFeatureDataset:
    return CachedFeatureDataset(Samples(N, "tuple"), Backbone(), store, spot_check=0, **options)


def assert_all_rows_kept(store: Any, **options: Any) -> None:
    again = make(store, **options)
    served = torch.stack([again[i][0] for i in range(N)])
    assert again.module_calls == 0  # every row a hit: nothing was replaced
    expected = torch.stack([reference(Backbone(), Samples(N, "tuple"), i) for i in range(N)])
    torch.testing.assert_close(served, expected, rtol=0, atol=0)


def test_a_creator_that_looked_before_the_entry_was_complete_gets_an_error_not_its_rows(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make(store_path, compressor=None, chunk_rows=8)
    first.__getitems__(list(range(N)))
    assert first.module_calls > 0
    # The second creator's looks for the entry happen before the first one's attrs land.
    monkeypatch.setattr(FeatureStore, "entry", lambda self, name: None)
    with pytest.raises(EntryConflictError) as raised:
        make(store_path, chunk_rows=16)  # the default compressor, other chunks
    monkeypatch.undo()
    message = str(raised.value)
    assert "has been created by another process" in message and first.entry_name in message
    assert "compressor=None there" in message and "chunk_rows=8 there, chunk_rows=16 here" in message
    assert "checksum" not in message.split("(")[1].split(")")[0]  # it is the same
    assert "Pass the same compressor, chunk_rows and checksum" in message and "another store" in message
    assert_all_rows_kept(store_path, compressor=None, chunk_rows=8)


def test_a_creator_starting_while_another_is_creating_gets_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    shared = MemoryStore()
    create_valid = feature_store._create_valid
    raised: list[EntryConflictError] = []

    def second_creator_arrives(*args: Any, **kwargs: Any) -> None:
        create_valid(*args, **kwargs)  # the first creator's arrays are all there, its attrs not yet
        monkeypatch.setattr(feature_store, "_create_valid", create_valid)
        with pytest.raises(EntryConflictError) as second:
            make(shared, checksum=False)
        raised.append(second.value)

    monkeypatch.setattr(feature_store, "_create_valid", second_creator_arrives)
    first = make(shared)
    assert len(raised) == 1
    message = str(raised[0])
    assert "is being created by another process" in message
    assert "checksum=True there, checksum=False here" in message
    first.__getitems__(list(range(N)))
    group = FeatureStore.open(shared).root[first.entry_name]
    assert CREATING_KEY not in group.attrs  # the note goes when the entry is complete
    assert_all_rows_kept(shared)


def test_the_arrays_of_a_creator_that_died_are_replaced_by_one_with_other_options(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A creation that died between its arrays and its attrs leaves no rows; once its note is
    old, a creator with other options replaces its arrays (before that, it is told to wait)."""

    def dies(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # the process is gone before the valid mask and the attrs

    monkeypatch.setattr(feature_store, "_create_valid", dies)
    with pytest.raises(KeyboardInterrupt):
        make(store_path, compressor=None)
    monkeypatch.undo()
    with pytest.raises(EntryConflictError, match="is being created"):
        make(store_path)
    store = FeatureStore.open(store_path, mode="a")
    (name,) = [name for name, _ in store.root.groups()]
    group = store.root[name]
    note = dict(group.attrs[CREATING_KEY])
    group.attrs[CREATING_KEY] = {**note, "started": note["started"] - feature_store.CREATION_STALE_SECONDS}
    cached = make(store_path)  # the default compressor
    cached.__getitems__(list(range(N)))
    assert cached.entry is not None and "Blosc" in cached.entry.meta["compressor"]
    assert np.asarray(cached.entry.valid_mask()).all()
    assert_all_rows_kept(store_path)
