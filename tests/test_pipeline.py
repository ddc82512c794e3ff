"""The miss pipeline: ``cached.loader(...)`` on torchdata.nodes, its resume, the CUDA guard."""

from __future__ import annotations

import os
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from cachedfeatures import (
    CachedFeatureDataset,
    CachingPausedWarning,
    DeviceInWorkerError,
    InputKeyError,
    WriterError,
)
from cachedfeatures.pipeline.nodes import Indices, WorkerMethod
from tests.helpers import SHAPES, Backbone, BrokenSampleError, FailingSamples, Samples, features_of, reference


def names_of(batch: dict[str, Any]) -> list[int]:
    """Row indices of a batch of dict samples (their 'name' field is 'sample-<i>')."""
    return [int(name.split("-")[1]) for name in batch["name"]]


def logged_loads(log_dir: Path) -> dict[int, list[int]]:
    """Loads per pid, from ``Samples(log_dir=...)``."""
    loads = {}
    for path in log_dir.glob("loads-*"):
        loads[int(path.name.split("-")[1])] = [int(line) for line in path.read_text().split()]
    return loads


@pytest.mark.parametrize("shape", SHAPES)
def test_loader_serves_every_sample_once_with_correct_features(store_path: Path, shape: str) -> None:
    dataset, backbone = Samples(70, shape), Backbone()
    key = "image" if shape == "dict" else 0
    cached = CachedFeatureDataset(dataset, backbone, store_path, input_key=key, batch_size=16, chunk_rows=16)
    loader = cached.loader(batch_size=32, shuffle=True, num_workers=2, seed=3)
    assert len(loader) == 3
    for _epoch in range(2):
        batches = list(loader)
        assert [len(features_of(batch, shape)) for batch in batches] == [32, 32, 6]  # last kept
        features = torch.cat([features_of(batch, shape) for batch in batches])
        if shape == "dict":
            rows = [row for batch in batches for row in names_of(batch)]
            assert sorted(rows) == list(range(70))
            labels = torch.cat([batch["label"] for batch in batches])
            assert labels.tolist() == [row % 7 for row in rows]
        else:
            rows = Indices(70, True, 3).order(_epoch).tolist()
        expected = torch.stack([reference(backbone, dataset, row) for row in rows])
        assert torch.equal(features, expected)
    assert cached.entry is not None and cached.entry.valid_mask().all()


def test_epochs_follow_the_seeded_permutation(store_path: Path) -> None:
    cached = CachedFeatureDataset(
        Samples(50, "dict"), Backbone(), store_path, input_key="image", chunk_rows=16
    )
    loader = cached.loader(batch_size=8, shuffle=True, seed=11)
    orders = [[row for batch in loader for row in names_of(batch)] for _ in range(3)]
    for epoch, order in enumerate(orders):
        assert order == Indices(50, True, 11).order(epoch).tolist()
    assert orders[0] != orders[1]
    unshuffled = cached.loader(batch_size=8)
    assert [row for batch in unshuffled for row in names_of(batch)] == list(range(50))


def test_loader_takes_any_sampler(store_path: Path) -> None:
    cached = CachedFeatureDataset(
        Samples(50, "dict"), Backbone(), store_path, input_key="image", chunk_rows=16
    )
    rows = [41, 3, 17, 8, 29]

    def sampler() -> torch.utils.data.Sampler[int]:
        return torch.utils.data.SubsetRandomSampler(rows, generator=torch.Generator().manual_seed(0))

    loader = cached.loader(batch_size=2, sampler=sampler())
    assert len(loader) == 3
    served = [row for batch in loader for row in names_of(batch)]
    assert served == list(sampler())
    assert sorted(served) == sorted(rows)


@pytest.mark.parametrize("method", ["thread", "process"])
def test_module_runs_only_in_this_process_and_workers_do_io(
    store_path: Path, tmp_path: Path, method: str
) -> None:
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    dataset, backbone = Samples(64, "tuple", log_dir=str(log_dir)), Backbone()
    cached = CachedFeatureDataset(
        dataset, backbone, store_path, batch_size=8, chunk_rows=16, dataset_version="v1"
    )
    (log_dir / f"loads-{os.getpid()}").unlink(missing_ok=True)  # the construction probe
    calls_before = backbone.calls
    loader = cached.loader(batch_size=16, shuffle=True, num_workers=2, worker_method=method)
    assert sum(len(batch[0]) for batch in loader) == 64

    assert backbone.calls > calls_before
    assert set(backbone.pids) == {os.getpid()}  # never called in a worker
    assert all(backbone.inference_modes)
    assert max(backbone.batch_sizes) <= 8  # misses go through the module in cached.batch_size
    loads = logged_loads(log_dir)
    # The only raw loads besides the misses are the spot check's, which runs in the compute
    # stage of this process (a batch of its own, once per epoch).
    checked = cached.spot_checked_rows
    if method == "process":
        assert sorted(loads.pop(os.getpid(), [])) == sorted(checked)
        assert len(loads) >= 1  # every miss loaded in workers
        checked = []
    assert sorted(row for rows in loads.values() for row in rows) == sorted([*range(1, 64), *checked])
    checked = cached.spot_checked_rows

    calls, spot_calls = backbone.calls, cached.spot_check_calls
    assert sum(len(batch[0]) for batch in loader) == 64  # second epoch: all hits
    assert cached.spot_check_calls == spot_calls + 1  # one spot-check batch per epoch
    assert backbone.calls == calls + 1  # and no other module call
    again = cached.spot_checked_rows[len(checked) :]
    assert len(again) == 8
    total = len([row for rows in logged_loads(log_dir).values() for row in rows])
    assert total == 63 + len(checked) + len(again)


def test_rows_served_before_leaving_an_epoch_early_are_stored(store_path: Path) -> None:
    cached = CachedFeatureDataset(
        Samples(64, "dict"), Backbone(), store_path, input_key="image", chunk_rows=16
    )
    loader = cached.loader(batch_size=8, shuffle=True)
    served = []
    for batch in loader:
        served += names_of(batch)
        if len(served) == 16:
            break
    iter(loader)  # the next epoch (or a resume) starts by storing what was computed
    assert cached.entry is not None
    assert cached.entry.valid_mask()[served].all()
    loader.close()


def test_write_failure_pauses_caching_and_the_training_loop_goes_on(store_path: Path) -> None:
    """A store fault in the writer thread is a pause (issue 6), not a crash: one warning."""
    cached = CachedFeatureDataset(Samples(64, "tuple"), Backbone(), store_path, chunk_rows=16)
    assert cached.entry is not None
    # A directory where chunk 2 of the features must go: writing it fails, even as root.
    (store_path / cached.entry_name / "features" / "c" / "2" / "0").mkdir(parents=True)
    served = 0
    with pytest.warns(CachingPausedWarning, match="caching paused") as caught:
        for batch in cached.loader(batch_size=16, shuffle=True):
            served += len(batch[0])
    assert served == 64 and len(caught) == 1
    valid = cached.entry.valid_mask()
    assert not valid[32:48].any()  # the chunk whose bytes were not written is not valid


def test_writer_error_is_raised_in_the_training_loop(store_path: Path) -> None:
    """Asked to stop on a paused cache (warnings as errors), the loop gets a WriterError."""
    cached = CachedFeatureDataset(Samples(64, "tuple"), Backbone(), store_path, chunk_rows=16)
    assert cached.entry is not None
    (store_path / cached.entry_name / "features" / "c" / "2" / "0").mkdir(parents=True)
    loader = cached.loader(batch_size=16, shuffle=True)
    served = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", CachingPausedWarning)
        with pytest.raises(WriterError, match="failed") as raised:
            for batch in loader:
                served += len(batch[0])
    assert isinstance(raised.value.__cause__, CachingPausedWarning)
    assert isinstance(raised.value.__cause__.__context__, OSError)  # the real cause, chained
    assert served <= 64
    valid = cached.entry.valid_mask()
    assert not valid[32:48].any()  # the chunk whose bytes were not written is not valid


def test_loader_resumes_mid_epoch_from_state_dict(store_path: Path) -> None:
    def make(path: Path) -> Any:
        cached = CachedFeatureDataset(
            Samples(90, "dict"), Backbone(), path, input_key="image", chunk_rows=16, batch_size=8
        )
        return cached.loader(batch_size=10, shuffle=True, num_workers=2, seed=5)

    reference_run = make(store_path.with_name("reference.zarr"))
    list(reference_run)  # epoch 0
    expected = [names_of(batch) for batch in reference_run]  # epoch 1

    loader = make(store_path)
    list(loader)
    iterator = iter(loader)
    served = [names_of(next(iterator)) for _ in range(4)]
    state = loader.state_dict()
    loader.close()

    resumed = make(store_path)  # a new process would build it the same way
    resumed.load_state_dict(state)
    rest = [names_of(batch) for batch in resumed]
    assert served + rest == expected
    rows = [row for batch in served + rest for row in batch]
    assert sorted(rows) == list(range(90))  # no sample twice, none lost
    # The epoch after the resumed one is the same as in the uninterrupted run.
    after = [names_of(batch) for batch in resumed]
    assert after == [names_of(batch) for batch in reference_run]


# torchdata 0.11's StatefulDataLoader calls torch.set_vital, which torch 2.13 deprecates.
@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")
def test_dataset_resumes_inside_stateful_dataloader(store_path: Path) -> None:
    cached = CachedFeatureDataset(
        Samples(60, "dict"), Backbone(), store_path, input_key="image", chunk_rows=16
    )

    def make() -> StatefulDataLoader:
        return StatefulDataLoader(
            cached, batch_size=7, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(1)
        )

    expected = [names_of(batch) for batch in make()]
    loader = make()
    iterator = iter(loader)
    served = [names_of(next(iterator)) for _ in range(3)]
    state = loader.state_dict()
    del iterator

    resumed = make()
    resumed.load_state_dict(state)
    rest = [names_of(batch) for batch in resumed]
    assert served + rest == expected
    assert sorted(row for batch in served + rest for row in batch) == list(range(60))


def test_cuda_device_in_plain_dataloader_worker_says_what_to_do(store_path: Path) -> None:
    dataset, backbone = Samples(40, "tuple"), Backbone()
    filled = CachedFeatureDataset(dataset, backbone, store_path, chunk_rows=8)
    filled.compute(np.arange(20))  # rows 0..19 cached, 20..39 missing
    # Reopen for CUDA: the entry exists, so nothing runs on the device while constructing.
    on_cuda = CachedFeatureDataset(dataset, backbone, store_path, chunk_rows=8, device="cuda")
    assert on_cuda.entry_name == filled.entry_name

    hits = DataLoader(torch.utils.data.Subset(on_cuda, range(20)), batch_size=10, num_workers=2)
    assert sum(len(batch[0]) for batch in hits) == 20  # hits in workers are fine

    batches = iter(DataLoader(on_cuda, batch_size=10, num_workers=2))
    with pytest.raises(DeviceInWorkerError, match=r"cached\.loader\(.*prefill\(\)"):
        for _ in batches:
            pass
    # An iterator that raised is only shut down by the cycle collector, which stalls ~5 s per
    # worker in torch's DataLoader; shut it down now instead (torch's own method).
    batches._shutdown_workers()  # type: ignore[attr-defined]


def test_autocast_dtype_is_part_of_the_entry_and_applied(store_path: Path) -> None:
    dataset, backbone = Samples(8, "tuple"), Backbone()
    plain = CachedFeatureDataset(dataset, backbone, store_path, dataset_version="v")
    mixed = CachedFeatureDataset(
        dataset, backbone, store_path, dataset_version="v", autocast_dtype=torch.bfloat16
    )
    assert mixed.entry_name != plain.entry_name
    assert mixed.entry is not None and mixed.entry.meta["options"]["autocast"] == "torch.bfloat16"
    features = torch.cat([batch for batch, _ in mixed.loader(batch_size=4)])
    images = torch.stack([dataset.image(i) for i in range(8)])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = Backbone.forward(backbone, images)
    assert features.dtype == torch.bfloat16
    assert torch.equal(features, expected)
    full_precision = torch.cat([batch for batch, _ in plain.loader(batch_size=4)])
    assert full_precision.dtype == torch.float32
    assert not torch.equal(features.float(), full_precision)  # autocast changed the values


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loader_with_pinned_memory_and_process_workers(store_path: Path) -> None:
    dataset, backbone = Samples(64, "tuple"), Backbone()
    cached = CachedFeatureDataset(dataset, backbone, store_path, device="cuda", batch_size=16)
    loader = cached.loader(batch_size=16, num_workers=2, worker_method="process", pin_memory=True)
    for epoch in range(2):
        batches = list(loader)
        assert all(batch[0].is_pinned() for batch in batches)
        features = torch.cat([batch[0].to("cuda", non_blocking=True) for batch in batches]).cpu()
        expected = torch.stack([reference(Backbone(), dataset, i) for i in range(64)])
        torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
        if epoch == 0:
            assert set(backbone.devices) == {"cuda:0"}
            assert set(backbone.pids) == {os.getpid()}


def test_loader_writes_within_the_size_budget(store_path: Path) -> None:
    dataset, backbone = Samples(256, "tuple"), Backbone()
    full = CachedFeatureDataset(
        dataset, backbone, store_path.with_name("full.zarr"), chunk_rows=16, dataset_version="v"
    )
    full.prefill(progress=False)
    budget = full.store.nbytes_stored() // 2
    cached = CachedFeatureDataset(
        dataset, backbone, store_path, chunk_rows=16, dataset_version="v", max_bytes=budget
    )
    loader = cached.loader(batch_size=32, shuffle=True, num_workers=2)
    expected = torch.stack([reference(backbone, dataset, i) for i in range(256)])
    for epoch in range(2):
        order = Indices(256, True, 0).order(epoch)
        features = torch.cat([batch[0] for batch in loader])
        assert torch.equal(features, expected[order])  # served right, cached or recomputed
    assert cached.store.nbytes_stored() <= budget
    assert cached.entry is not None
    assert 0 < cached.entry.valid_mask().sum() < 256  # part of the entry kept, within budget


class ThreadCounting(Backbone):
    """Records torch's intra-op thread count each time the module runs."""

    __cachedfeatures_exclude__ = (*Backbone.__cachedfeatures_exclude__, "seen_threads")

    def __init__(self) -> None:
        super().__init__()
        self.seen_threads: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_threads.append(torch.get_num_threads())
        return super().forward(x)


@pytest.mark.parametrize("worker_method", ["thread", "process"])
def test_module_runs_on_the_process_thread_count_with_workers(store_path: Path, worker_method: str) -> None:
    """torchdata's thread workers set torch's thread count to 1, and the thread that runs the
    module inherits it: the module would run on one core. It runs on the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        module = ThreadCounting()
        cached = CachedFeatureDataset(
            Samples(96, "tuple"), module, store_path, batch_size=16, chunk_rows=16, spot_check=0
        )
        module.seen_threads.clear()  # the dataset probe ran the module in this thread
        for _ in cached.loader(batch_size=32, num_workers=2, worker_method=worker_method):
            pass
        assert module.seen_threads and set(module.seen_threads) == {2}
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("num_workers", "worker_method"), [(0, "thread"), (2, "thread"), (2, "process")])
@pytest.mark.parametrize("failure", ["key", "user"])
def test_dataset_errors_reach_the_training_loop_as_their_own_type(
    store_path: Path, num_workers: int, worker_method: WorkerMethod, failure: str
) -> None:
    """Not torchdata's ``ValueError: Caught ... in _populate_queue``: the original type, its
    message, and the traceback of where it was raised."""
    dataset = FailingSamples(64, fail_from=40)
    cached = CachedFeatureDataset(dataset, Backbone(), store_path, input_key="image", chunk_rows=16)
    dataset.failure = failure
    expected: type[Exception] = InputKeyError if failure == "key" else BrokenSampleError
    loader = cached.loader(batch_size=16, num_workers=num_workers, worker_method=worker_method)
    with pytest.raises(expected) as raised:
        for _batch in loader:
            pass
    message = str(raised.value)
    assert "sample 40 is broken" in message if failure == "user" else "'image'" in message
    assert "Caught" not in message
    text = "".join(traceback.format_exception(raised.value))
    raised_in = "in __getitem__" if failure == "user" else "in _lookup"
    assert raised_in in text  # where it was raised, even in a worker process
    loader.close()


class _FailingModule(Backbone):
    """A module that raises the user's own error on its second batch."""

    __cachedfeatures_exclude__ = (*Backbone.__cachedfeatures_exclude__, "armed")

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> Any:
        if self.armed and self.calls >= 2:
            raise BrokenSampleError("the module gave up")
        return super().forward(x)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_module_errors_reach_the_training_loop_as_their_own_type(store_path: Path, num_workers: int) -> None:
    module = _FailingModule()
    cached = CachedFeatureDataset(Samples(64, "dict"), module, store_path, input_key="image", chunk_rows=16)
    module.armed = True
    loader = cached.loader(batch_size=16, num_workers=num_workers)
    with pytest.raises(BrokenSampleError) as raised:
        for _batch in loader:
            pass
    assert str(raised.value) == "the module gave up"  # its own message, not torchdata's text
    loader.close()
