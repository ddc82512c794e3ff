"""``@cached_module`` over one Zarr store shared by several processes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from cachedfeatures import FeatureStore, cached_module
from tests.helpers import Backbone
from tests.script_server import SCRIPTS, Child

# Run in a new process (a child of a script server): compute the rows [start, stop) of a fixed
# image set in batches, through a cached Backbone on `store`; print how many rows it computed.
SCRIPT = """
import json, sys, torch
from cachedfeatures import cached_module
from tests.helpers import Backbone
store, start, stop, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
images = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
module = cached_module(store=store, chunk_rows=4)(Backbone)().requires_grad_(False)
for i in range(start, stop, batch):
    module(images[i : min(i + batch, stop)])
print(json.dumps({"computed": sum(module.batch_sizes)}))
"""


def images() -> torch.Tensor:
    return torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def launch(store: Path, start: int, stop: int, batch: int) -> Child:
    return SCRIPTS.start(SCRIPT, str(store), str(start), str(stop), str(batch))


def finish(process: Child) -> int:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return int(json.loads(out.strip().splitlines()[-1])["computed"])


def reference(x: torch.Tensor) -> torch.Tensor:
    module = Backbone().requires_grad_(False)
    with torch.no_grad():
        return module(x)  # type: ignore[no-any-return]


@pytest.mark.slow  # new processes
def test_rows_written_by_another_process_are_hits(store_path: Path) -> None:
    assert finish(launch(store_path, 0, 40, 8)) == 40
    module = cached_module(store=store_path, chunk_rows=4)(Backbone)().requires_grad_(False)
    out = module(images()[:40])
    assert module.calls == 0
    assert torch.equal(out, reference(images()[:40]))


@pytest.mark.slow  # new processes
def test_concurrent_writers_lose_no_row(store_path: Path) -> None:
    # Two processes append overlapping ranges at once: rows are reserved under the entry
    # lock and chunks written under chunk locks, so every row of both lands intact.
    writers = [launch(store_path, 0, 48, 5), launch(store_path, 16, 64, 3)]
    computed = [finish(writer) for writer in writers]
    assert sum(computed) >= 64
    module = cached_module(store=store_path, chunk_rows=4, max_memory_bytes=0)(Backbone)()
    module.requires_grad_(False)
    out = module(images())
    assert module.calls == 0
    assert torch.equal(out, reference(images()))
    (entry,) = FeatureStore.open(store_path).entries
    assert int(entry.group["next_row"][0]) == sum(computed)  # duplicates allowed, losses not


@pytest.mark.slow  # new processes
def test_a_reader_catches_up_with_a_writer_between_calls(store_path: Path) -> None:
    module = cached_module(store=store_path, chunk_rows=4, max_memory_bytes=0)(Backbone)()
    module.requires_grad_(False)
    module(images()[:8])  # opens the entry and indexes its rows
    assert finish(launch(store_path, 8, 32, 8)) == 24  # another process appends more
    out = module(images()[:32])
    assert module.batch_sizes == [8]  # the other process's rows were found, not recomputed
    assert torch.equal(out, reference(images()[:32]))


@cached_module()
class Embedder(torch.nn.Module):
    """A decorated class at module level pickles like any module (spawned workers, checkpoints)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_decorated_module_pickles_with_a_fresh_cache() -> None:
    module = Embedder()
    x = torch.randn(3, 4)
    out = module(x)
    copy = pickle.loads(pickle.dumps(module))
    assert type(copy) is Embedder
    assert torch.equal(copy(x), out)
    assert copy.module_cache.miss_rows == 3 and module.module_cache.miss_rows == 3
