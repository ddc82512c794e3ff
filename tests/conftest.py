from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Backbone, Samples
from tests.s3_server import S3Server, moto_server

__all__ = ["S3Server"]  # the tests import it from here


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


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """Start ``moto_server`` in its own process on 127.0.0.1 for the session."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    with moto_server() as server:
        yield server
