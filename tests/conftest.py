from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import Backbone, Samples


@pytest.fixture
def store_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh local store path, with lock files kept inside the test's tmp dir."""
    monkeypatch.setenv("CACHEDFEATURES_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path / "features.zarr"


@pytest.fixture
def dataset() -> Samples:
    return Samples(100, "tuple")


@pytest.fixture
def backbone() -> Backbone:
    return Backbone()
