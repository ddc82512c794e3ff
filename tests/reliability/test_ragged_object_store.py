"""A ragged entry on S3 through fsspec, against a real S3-protocol server (moto) on loopback."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cachedfeatures import CachedFeatureDataset, FeatureStore
from cachedfeatures.maintenance import verify_store
from tests.test_ragged import Embed, Tokens, direct


@pytest.mark.slow
def test_ragged_entry_on_an_object_store(s3_server: Any) -> None:
    url = s3_server.new_url()
    cached = CachedFeatureDataset(
        Tokens(24), Embed().eval(), url, input_key="tokens", collate_fn=list, chunk_rows=8,
        storage_options=s3_server.storage_options, spot_check=0,
    )  # fmt: skip
    cached.__getitems__(list(range(0, 24, 2)))
    cached.__getitems__(list(range(1, 24, 2)))  # every chunk rewritten with its rows moved
    reader = CachedFeatureDataset(
        Tokens(24), Embed().eval(), url, input_key="tokens", collate_fn=list,
        storage_options=s3_server.storage_options, spot_check=0, read_only=True,
    )  # fmt: skip
    loads = reader.dataset.loads
    for index, sample in enumerate(reader.__getitems__(list(range(24)))):
        assert torch.equal(sample["tokens"], direct(index))
    assert reader.dataset.loads == loads
    store = FeatureStore.open(url, mode="a", storage_options=s3_server.storage_options)
    assert verify_store(store)["ok"]
