"""Spot checks: cached rows recomputed at run time catch what no fingerprint sees.

The stale cases edit a dataset's files in place (same size, same modification time) between
two runs in separate processes on one store, with the dataset's fingerprint pinned by
``dataset_version=``: only a spot check can tell that the stored features are now wrong.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cachedfeatures import CachedFeatureDataset, FeatureStore, StaleFeaturesError
from cachedfeatures.compute.spot_check import compare_columns, parse_spot_check, tolerance
from cachedfeatures.errors import CacheError
from cachedfeatures.format.specs import ArraySpec
from tests.helpers import Backbone, run_script

N = 64


class FileSamples(Dataset[Any]):
    """``(image, label)`` read from two ``.npy`` files at every access, as a dataset of files is.

    ``log_dir`` records every load from any process (one file per pid).
    """

    def __init__(self, directory: str, log_dir: str | None = None) -> None:
        self.images = os.path.join(directory, "images.npy")
        self.labels = os.path.join(directory, "labels.npy")
        self.n = int(np.load(self.labels, mmap_mode="r").shape[0])
        self.log_dir = log_dir

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.log_dir is not None:
            with open(os.path.join(self.log_dir, f"loads-{os.getpid()}"), "a") as log:
                log.write(f"{index}\n")
        image = np.array(np.load(self.images, mmap_mode="r")[index])
        return torch.from_numpy(image), int(np.load(self.labels, mmap_mode="r")[index])


def write_files(directory: Path, n: int = N) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(directory / "images.npy", rng.standard_normal((n, 3, 8, 8), dtype=np.float32))
    np.save(directory / "labels.npy", np.arange(n, dtype=np.int64) % 7)


def edit_in_place(directory: Path, *, images: bool = True, labels: bool = False) -> None:
    """Change every row's values in the files themselves, keeping their size and mtime."""
    for name, wanted in (("images.npy", images), ("labels.npy", labels)):
        if not wanted:
            continue
        path = directory / name
        stat = path.stat()
        data = np.load(path, mmap_mode="r+")
        if name == "images.npy":
            data[:] = data[::-1] * 1.5  # new pixels for every row
        else:
            data[:] = (data + 3) % 7  # a new label map
        data.flush()
        del data
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert path.stat().st_size == stat.st_size


RUN = """
import json, sys
from torch.utils.data import DataLoader
from cachedfeatures import CachedFeatureDataset, StaleFeaturesError
from tests.helpers import Backbone
from tests.test_spot_check import FileSamples

store, data_dir, mode = sys.argv[1:4]
cached = CachedFeatureDataset(FileSamples(data_dir), Backbone(), store, batch_size=16, chunk_rows=16,
                              dataset_version="pinned")
error = None
served = 0
try:
    if mode == "map":
        for epoch in range(2):
            for batch in DataLoader(cached, batch_size=16, shuffle=True):
                served += len(batch[1])
    elif mode == "loader":
        loader = cached.loader(batch_size=16, shuffle=True)
        for epoch in range(2):
            for batch in loader:
                served += len(batch[1])
        loader.close()
    else:
        cached.prefill(progress=False)
except StaleFeaturesError as caught:
    error = {"message": str(caught), "entry": caught.entry, "rows": list(caught.rows),
             "runtime": isinstance(caught, RuntimeError)}
print(json.dumps({"entry": cached.entry_name, "error": error, "served": served,
                  "checked": cached.spot_checked_rows, "calls": cached.module_calls}))
"""


def stored(store: Path) -> dict[str, np.ndarray]:
    """Every stored column of the store's only entry, read afresh, and its valid mask."""
    entry = FeatureStore.open(store).entries[0]
    read = entry.read(np.arange(entry.num_rows))
    return {"valid": entry.valid_mask(), **{name: np.array(a) for name, a in read.arrays.items()}}


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A store filled from the files by another process, and what it holds."""
    data_dir, store = tmp_path / "data", tmp_path / "features.zarr"
    write_files(data_dir)
    first = run_script(RUN, str(store), str(data_dir), "prefill")
    assert first["error"] is None
    before = stored(store)
    assert before["valid"].all()
    return store, data_dir, before


@pytest.mark.slow
def test_a_file_edited_in_place_is_caught_in_every_path_and_nothing_is_lost(
    filled: tuple[Path, Path, dict[str, np.ndarray]],
) -> None:
    store, data_dir, before = filled
    edit_in_place(data_dir)
    for mode in ("map", "loader", "prefill"):
        run = run_script(RUN, str(store), str(data_dir), mode)
        error = run["error"]
        assert error is not None, f"{mode}: stale features served without an error"
        assert error["runtime"] and error["entry"] == run["entry"]
        assert len(error["rows"]) == 8 and set(error["rows"]) == set(run["checked"])
        assert run["served"] == 0  # caught at the first batch, before anything stale is served
        message = error["message"]
        assert run["entry"] in message and str(store) in message
        assert f"row {error['rows'][0]}: 'features' differs by up to" in message
        assert f"cachedfeatures rm {store} {run['entry']}" in message
        assert "dataset_version=" in message and "spot_check=0" in message
        after = stored(store)  # the check itself lost nothing, changed nothing
        assert after.keys() == before.keys()
        for name in before:
            assert np.array_equal(after[name], before[name]), (mode, name)


@pytest.mark.slow
def test_a_label_map_changed_in_place_is_caught_exactly(
    filled: tuple[Path, Path, dict[str, np.ndarray]],
) -> None:
    store, data_dir, _ = filled
    edit_in_place(data_dir, images=False, labels=True)
    run = run_script(RUN, str(store), str(data_dir), "map")
    assert run["error"] is not None
    message = run["error"]["message"]
    assert "'features'" not in message  # the features still match: only the field is stale
    row = run["error"]["rows"][0]
    assert f"row {row}: 'field_1' is {row % 7} in the store but {(row % 7 + 3) % 7} recomputed now" in message


@pytest.mark.slow
def test_no_error_when_nothing_changed_over_epochs_in_every_path(
    filled: tuple[Path, Path, dict[str, np.ndarray]],
) -> None:
    store, data_dir, before = filled
    for mode in ("map", "loader", "prefill"):
        run = run_script(RUN, str(store), str(data_dir), mode)
        assert run["error"] is None
        # prefill checks once; the loader once per epoch; the map-style path at its first hit
        # batch, then after each len(dataset) rows (the first batch of the second epoch).
        checks = {"map": 2, "loader": 2, "prefill": 1}[mode]
        assert len(run["checked"]) == 8 * checks and run["calls"] == checks
        assert run["served"] == (0 if mode == "prefill" else 2 * N)
    after = stored(store)
    for name in before:
        assert np.array_equal(after[name], before[name])


def loads_per_pid(log_dir: Path) -> dict[int, list[int]]:
    return {
        int(path.name.split("-")[1]): [int(line) for line in path.read_text().split()]
        for path in log_dir.glob("loads-*")
    }


@pytest.mark.slow
def test_fork_workers_check_every_epoch_without_false_alarms(
    filled: tuple[Path, Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    store, data_dir, _ = filled
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    dataset = FileSamples(str(data_dir), log_dir=str(log_dir))
    cached = CachedFeatureDataset(
        dataset, Backbone(), store, batch_size=16, chunk_rows=16, dataset_version="pinned"
    )
    loader = DataLoader(cached, batch_size=8, shuffle=True, num_workers=2, multiprocessing_context="fork")
    for _ in range(3):
        assert sum(len(batch[1]) for batch in loader) == N
    loads = loads_per_pid(log_dir)
    # Each epoch forks two new workers; each checks 8 random cached rows at its first batch
    # and loads nothing else (every row is a hit). No check ran in this process.
    assert os.getpid() not in loads
    assert len(loads) == 6 and all(len(rows) == 8 for rows in loads.values())
    assert len({tuple(rows) for rows in loads.values()}) > 1  # each worker draws its own rows


@pytest.mark.slow
def test_the_error_crosses_dataloader_workers_as_stale_features_error(
    filled: tuple[Path, Path, dict[str, np.ndarray]],
) -> None:
    store, data_dir, _ = filled
    edit_in_place(data_dir)
    cached = CachedFeatureDataset(
        FileSamples(str(data_dir)), Backbone(), store, batch_size=16, chunk_rows=16, dataset_version="pinned"
    )
    loader = DataLoader(cached, batch_size=8, num_workers=2)
    with pytest.raises(StaleFeaturesError, match="are stale") as caught:
        for _ in loader:
            pass
    assert isinstance(caught.value, CacheError) and isinstance(caught.value, RuntimeError)
    assert cached.entry_name in str(caught.value)
    assert stored(store)["valid"].all()


@pytest.mark.slow
def test_spot_check_zero_turns_it_off(
    filled: tuple[Path, Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    store, data_dir, _ = filled
    edit_in_place(data_dir)
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    cached = CachedFeatureDataset(
        FileSamples(str(data_dir), log_dir=str(log_dir)),
        Backbone(),
        store,
        batch_size=16,
        chunk_rows=16,
        dataset_version="pinned",
        spot_check=0,
    )
    for _ in range(2):
        assert sum(len(batch[1]) for batch in DataLoader(cached, batch_size=16)) == N
        assert sum(len(batch[1]) for batch in cached.loader(batch_size=16)) == N
    assert cached.prefill(progress=False).computed == 0
    assert cached.spot_check() == 0
    assert cached.spot_checked_rows == [] and cached.module_calls == 0
    assert loads_per_pid(log_dir) == {}  # the stale rows were served as they are: no check


@pytest.mark.slow
def test_a_cuda_dataset_in_a_dataloader_worker_skips_the_check(
    filled: tuple[Path, Path, dict[str, np.ndarray]],
) -> None:
    store, data_dir, _ = filled
    # The device is not part of the entry key: this dataset finds the CPU-filled entry. Its
    # workers cannot run the module on CUDA, so they serve hits without checking (loader()
    # and prefill() check in the main process).
    cached = CachedFeatureDataset(
        FileSamples(str(data_dir)),
        Backbone(),
        store,
        batch_size=16,
        chunk_rows=16,
        dataset_version="pinned",
        device="cuda",
    )
    loader = DataLoader(cached, batch_size=8, num_workers=2)
    assert sum(len(batch[1]) for batch in loader) == N


def test_raw_data_gone_skips_the_check_and_serves_hits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir, store = tmp_path / "data", tmp_path / "features.zarr"
    write_files(data_dir)
    cached = CachedFeatureDataset(
        FileSamples(str(data_dir)), Backbone(), store, batch_size=16, chunk_rows=16, dataset_version="v"
    )
    cached.prefill(progress=False)
    os.remove(data_dir / "images.npy")  # the raw data deleted once cached
    again = CachedFeatureDataset(
        FileSamples(str(data_dir)), Backbone(), store, batch_size=16, chunk_rows=16, dataset_version="v"
    )
    with caplog.at_level(logging.WARNING, logger="cachedfeatures"):
        for _ in range(3):
            assert len(again.__getitems__(list(range(N)))) == N
    skipped = [r for r in caplog.records if "spot check of entry" in r.getMessage()]
    assert len(skipped) == 1 and "FileNotFoundError" in skipped[0].getMessage()
    assert again.spot_checked_rows == []


class MLP(nn.Module):
    """Matrix products whose last bits depend on the batch size (gemv for one row, gemm for more)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(192, 1024), nn.GELU(), nn.Linear(1024, 256), nn.LayerNorm(256))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "dtype,autocast",
    [(None, None), (torch.float16, None), (torch.bfloat16, None), (None, torch.bfloat16)],
    ids=["float32", "float16", "bfloat16", "autocast-bf16"],
)
def test_recomputing_in_another_batch_does_not_false_alarm_but_a_small_change_is_caught(
    tmp_path: Path, dtype: torch.dtype | None, autocast: torch.dtype | None
) -> None:
    data_dir, store = tmp_path / "data", tmp_path / "features.zarr"
    write_files(data_dir, n=256)
    options: dict[str, Any] = {"dtype": dtype, "autocast_dtype": autocast, "dataset_version": "v"}
    cached = CachedFeatureDataset(FileSamples(str(data_dir)), MLP(), store, batch_size=256, **options)
    cached.prefill(progress=False)  # stored from batches of up to 256 rows
    assert cached.entry is not None
    if autocast is None:  # one row alone (gemv) is not bit-identical to it in a batch (gemm)
        stored = cached.entry.read(np.arange(256)).arrays["features"]
        spec = cached.entry.specs[0]
        layout = cached._bound().output_layout
        alone = [cached._computer([cached.dataset[i][0]], layout)["features"] for i in range(256)]
        assert not np.array_equal(spec.tensor_batch_to_numpy(torch.cat(alone)), stored)
    # Rows recomputed one at a time (spot_check(1)) and eight at a time; none may fail.
    for count in [1] * 48 + [8] * 8:
        assert cached.spot_check(count) == count
    # A change far smaller than a stale file's (a normalisation mean moved by 0.2) is caught.
    images = np.load(data_dir / "images.npy", mmap_mode="r+")
    images[:] -= 0.2
    images.flush()
    del images
    with pytest.raises(StaleFeaturesError):
        cached.spot_check(8)


def _spec(dtype: str, torch_dtype: str | None = None, kind: str = "tensor") -> ArraySpec:
    return ArraySpec("features", kind, dtype, (64,), torch_dtype)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "torch_dtype,ulps",
    [(torch.float32, 64), (torch.float16, 4), (torch.bfloat16, 4), (torch.float64, 64)],
)
def test_last_bit_differences_pass_and_real_changes_fail(torch_dtype: torch.dtype, ulps: int) -> None:
    values = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).to(torch_dtype)
    nudged = values.clone()
    for _ in range(ulps):  # a few units in the last place, in each value
        nudged = torch.nextafter(nudged, torch.full_like(nudged, float("inf")))
    changed = (values.double() * 1.2).to(torch_dtype)
    spec = ArraySpec(
        "features",
        "tensor",
        "uint16" if torch_dtype == torch.bfloat16 else str(torch_dtype).removeprefix("torch."),
        (64,),
        str(torch_dtype).removeprefix("torch."),
    )
    rows = np.arange(8)

    def mismatches(a: torch.Tensor, b: torch.Tensor) -> list[int]:
        columns = [{"features": spec.tensor_batch_to_numpy(t)} for t in (a, b)]
        found = compare_columns([spec], rows, columns[0], columns[1], ["features"], None)
        return [m.row for m in found]

    assert mismatches(values, values) == []
    assert mismatches(values, nudged) == []
    assert mismatches(values, changed) == list(range(8))


def test_nan_matches_nan_and_infinities_must_agree() -> None:
    spec = _spec("float32", "float32")
    rows = np.arange(3)
    a = np.zeros((3, 64), dtype=np.float32)
    a[:, 0] = np.nan
    a[1, 1] = np.inf
    b = a.copy()
    assert compare_columns([spec], rows, {"features": a}, {"features": b}, ["features"], None) == []
    b[1, 1] = 1e30  # finite where the store has inf
    b[2, 0] = 0.0  # a number where the store has NaN
    found = compare_columns([spec], rows, {"features": a}, {"features": b}, ["features"], None)
    assert [m.row for m in found] == [1, 2]
    assert all("NaN or infinite" in m.detail for m in found)


def test_integers_bools_and_strings_must_be_equal() -> None:
    rows = np.arange(2)
    for spec, a, b in [
        (ArraySpec("label", "int", "<i8", ()), np.array([3, 4]), np.array([3, 5])),
        (ArraySpec("flag", "bool", "|b1", ()), np.array([True, False]), np.array([True, True])),
        (
            ArraySpec("name", "str", "str", ()),
            np.array(["a", "b"], dtype=np.dtypes.StringDType()),
            np.array(["a", "c"], dtype=np.dtypes.StringDType()),
        ),
    ]:
        assert tolerance(spec) is None
        found = compare_columns([spec], rows, {spec.name: a}, {spec.name: b}, [], "bfloat16")
        assert [m.row for m in found] == [1]
        assert "in the store but" in found[0].detail


def test_autocast_and_module_precision_widen_the_tolerance() -> None:
    spec = _spec("float32", "float32")
    tight, wide = tolerance(spec), tolerance(spec, "bfloat16")
    assert tight is not None and wide is not None and wide.rtol > tight.rtol
    stored16 = tolerance(_spec("float16", "float16"))
    assert stored16 is not None and stored16.rtol > tight.rtol


@pytest.mark.parametrize("value", [-1, 1.5, True, "8", None])
def test_spot_check_must_be_a_non_negative_int(tmp_path: Path, value: object) -> None:
    with pytest.raises(ValueError, match=r"Expected spot_check to be an int >= 0.*Got"):
        parse_spot_check(value)
    write_files(tmp_path / "data", n=4)
    with pytest.raises(ValueError, match="spot_check"):
        CachedFeatureDataset(FileSamples(str(tmp_path / "data")), Backbone(), None, spot_check=value)  # type: ignore[arg-type]


def test_allow_nondeterministic_turns_spot_checks_off(tmp_path: Path) -> None:
    write_files(tmp_path / "data", n=16)
    cached = CachedFeatureDataset(
        FileSamples(str(tmp_path / "data")), Backbone(), tmp_path / "f.zarr", allow_nondeterministic=True
    )
    cached.prefill(progress=False)
    assert cached.spot_check() == 0 and cached.spot_checked_rows == []


def test_the_precision_of_a_model_behind_a_lambda_or_partial_is_seen() -> None:
    """A half-precision model wrapped in a lambda or a partial gets the half-precision tolerance."""
    import functools

    from cachedfeatures.compute.spot_check import precision_of

    half = torch.nn.Linear(4, 4).half()
    cpu = torch.device("cpu")

    def encode(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)  # type: ignore[no-any-return]

    assert precision_of(lambda x: half(x), cpu, None) == precision_of(half, cpu, None)
    assert precision_of(functools.partial(encode, half), cpu, None) == precision_of(half, cpu, None)
    assert precision_of(lambda x: x * 2, cpu, None) is None
