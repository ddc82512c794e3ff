"""A rank lost during a distributed prefill (torchrun, gloo, CPU, 2 ranks), on a local store and
on S3 (the loopback moto server): the job fails within a stated time, and a restarted job
computes only the rows that are not valid yet, every row exact."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cachedfeatures import FeatureStore
from cachedfeatures.pipeline.prefill import owned_chunks
from cachedfeatures.store.writer import DEFAULT_MAX_PENDING
from tests.conftest import S3Server
from tests.helpers import Backbone, Samples, child_pids, reference
from tests.reliability.figures import record

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
ROWS, CHUNK_ROWS, DELAY = 320, 16, 0.02  # 20 chunks, 10 a rank; 0.02 s a row: ~3.5 s of work a rank
# torchrun stops the other ranks when one dies: it notices within its monitor interval and
# gives them its 30 s grace to end (they end at once on SIGTERM); the job ends well within this.
DEATH_BOUND_S = 45.0


def _store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, dict[str, Any] | None]:
    if kind == "local":
        return str(request.getfixturevalue("store_path")), None
    s3: S3Server = request.getfixturevalue("s3_server")
    return s3.new_url(), s3.storage_options


def _launch(
    store: str, options: dict[str, Any] | None, log_dir: Path, *extra: str, **env: str
) -> subprocess.Popen[str]:
    log_dir.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    if options is not None:
        environment["CF_STORAGE_OPTIONS"] = json.dumps(options)
    command = [
        TORCHRUN,
        "--standalone",
        "--nproc_per_node=2",
        *extra,
        str(ROOT / "tests" / "prefill_ranks.py"),
    ]
    job = subprocess.Popen(
        [*command, store, str(log_dir), str(ROWS), str(DELAY)],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a failed test kills the whole job
    )
    _JOBS.append(job)
    return job


_JOBS: list[subprocess.Popen[str]] = []


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (torchrun starts each rank in a session of its own, so killing
    torchrun's process group leaves the ranks running)."""
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(child_pids(tree[-1]))
    return tree


def _finish(job: subprocess.Popen[str], timeout: float) -> str:
    """Wait for ``job`` to end; its output. Past ``timeout``: kill it and its ranks and fail with
    the end of what it printed."""
    try:
        out, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(job)
        out, _ = job.communicate(timeout=30)
        raise AssertionError(f"the job did not end within {timeout:g} s:\n{out[-6000:]}") from None
    return out


def _kill(job: subprocess.Popen[str]) -> None:
    for pid in _tree(job.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test() -> Any:
    """A test that fails mid-way (a timeout) must not leave torchrun and its ranks running."""
    yield
    while _JOBS:
        job = _JOBS.pop()
        if job.poll() is None:
            _kill(job)
            job.communicate(timeout=30)
        if job.stdout is not None:
            job.stdout.close()


def _wait_for(condition: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _chunks_written(log_dir: Path, rank: int) -> int:
    log = log_dir / f"writes-rank{rank}.log"
    return log.read_text().count("of chunk") if log.exists() else 0


def _pid(log_dir: Path, rank: int, attempt: int = 0) -> int:
    path = log_dir / f"pid-rank{rank}-attempt{attempt}"
    _wait_for(lambda: path.exists() and path.read_text(), f"rank {rank}'s pid")
    return int(path.read_text())


def _open(store: str, options: dict[str, Any] | None) -> Any:
    (entry,) = FeatureStore.open(store, mode="r", storage_options=options).entries
    return entry


def _loaded(log_dir: Path, attempt: int) -> np.ndarray:
    rows = [
        int(line)
        for path in (log_dir / f"loads-attempt{attempt}").glob("loads-*")
        for line in path.read_text().split()
    ]
    return np.unique(np.asarray(rows, dtype=np.int64))


def _assert_every_row_exact(store: str, options: dict[str, Any] | None) -> None:
    entry = _open(store, options)
    read = entry.read(np.arange(ROWS))
    assert read.hit.all()
    dataset, backbone = Samples(ROWS, "tuple"), Backbone()
    expected = torch.stack([reference(backbone, dataset, i) for i in range(ROWS)])
    assert torch.equal(torch.from_numpy(read.arrays["features"]), expected)


def _results(log_dir: Path) -> list[dict[str, Any]]:
    return [json.loads((log_dir / f"result-rank{rank}.json").read_text()) for rank in range(2)]


def _restart(store: str, options: dict[str, Any] | None, log_dir: Path) -> list[dict[str, Any]]:
    job = _launch(store, options, log_dir)
    out = _finish(job, 300)
    assert job.returncode == 0, out
    return _results(log_dir)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_killed_rank_ends_the_job_and_a_restart_computes_only_rows_not_valid(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store, options = _store(kind, tmp_path, request)
    first = tmp_path / "first"
    job = _launch(store, options, first)
    victim = _pid(first, 1)
    _wait_for(lambda: _chunks_written(first, 1) >= 3, "rank 1 to store 3 chunks")
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    out = _finish(job, DEATH_BOUND_S + 60)
    ended = time.monotonic() - killed
    assert job.returncode != 0, out
    assert ended < DEATH_BOUND_S, out

    valid = _open(store, options).valid_mask()
    assert 0 < valid.sum() < ROWS  # killed mid-way
    num_chunks = ROWS // CHUNK_ROWS
    lost_chunks = {}
    for rank in range(2):
        mine = owned_chunks(num_chunks, rank, 2)
        done = [bool(valid[c * CHUNK_ROWS : (c + 1) * CHUNK_ROWS].all()) for c in mine]
        assert done == sorted(done, reverse=True)  # a rank's valid chunks: a prefix of its own
    # Work lost: rows computed in the first job and not stored. Only the chunks in flight when
    # the ranks stopped: the one being computed and the writer's queue.
    loaded = _loaded(first, 0)
    wasted = loaded[~valid[loaded]]
    for rank in range(2):
        lost_chunks[rank] = len({int(c) for c in wasted // CHUNK_ROWS if c % 2 == rank})
        assert lost_chunks[rank] <= DEFAULT_MAX_PENDING + 1

    second = tmp_path / "second"
    results = _restart(store, options, second)
    assert sum(r["computed"] for r in results) == int((~valid).sum())  # only rows not valid
    assert set(_loaded(second, 0).tolist()) >= set(np.flatnonzero(~valid).tolist())
    _assert_every_row_exact(store, options)
    record(
        f"lost rank ({kind}): job end after SIGKILL, chunks in flight lost per rank, rows recomputed",
        f"{ended:.1f}s, {lost_chunks}, {int((~valid).sum())} of {ROWS}",
    )


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_hung_rank_fails_the_job_after_the_prefill_timeout(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store, options = _store(kind, tmp_path, request)
    first = tmp_path / "first"
    timeout = 5.0
    started = time.monotonic()
    job = _launch(store, options, first, CF_HANG_RANK="1", CF_TIMEOUT=str(timeout))
    out = _finish(job, 300)
    ended = time.monotonic() - started
    assert job.returncode != 0, out
    assert "RankLostError" in out and f"within {timeout:g}s" in out, out
    assert list((first / "loads-attempt0").glob("hung-*")), "rank 1 never hung"
    # Rank 0 stores all of its chunks (~3.5 s), then waits `timeout` for rank 1 and raises.
    work = (ROWS // 2) * DELAY
    assert ended < 30 + work + timeout + DEATH_BOUND_S, out

    valid = _open(store, options).valid_mask()
    num_chunks = ROWS // CHUNK_ROWS
    rank0 = np.concatenate(
        [np.arange(c * CHUNK_ROWS, (c + 1) * CHUNK_ROWS) for c in owned_chunks(num_chunks, 0, 2)]
    )
    assert valid[rank0].all()
    results = _restart(store, options, tmp_path / "second")
    assert results[0]["computed"] == 0
    assert results[1]["computed"] == int((~valid).sum())
    _assert_every_row_exact(store, options)
    record(f"hung rank ({kind}): job end with prefill(timeout={timeout:g})", f"{ended:.1f}s")


def test_an_elastic_restart_continues_from_the_rows_stored(store_path: Path, tmp_path: Path) -> None:
    store = str(store_path)
    log_dir = tmp_path / "log"
    # One restart is what the job needs. The others cover gloo's connect of a restarted group,
    # which on two loaded cores now and then fails at once ("connectFullMesh ... Connection
    # refused": the rendezvous still hands out an address of the killed attempt) or hangs (the
    # ranks then exit after 30 s: tests/prefill_ranks.py); torchrun restarts again and the next
    # attempt connects (one or the other seen in about 1 of 3 runs here).
    job = _launch(store, None, log_dir, "--max-restarts=5")
    victim = _pid(log_dir, 1, attempt=0)
    _wait_for(lambda: _chunks_written(log_dir, 1) >= 3, "rank 1 to store 3 chunks")
    os.kill(victim, signal.SIGKILL)
    valid = _open(store, None).valid_mask()  # rank 0 may store more before it is stopped
    out = _finish(job, 300)
    assert job.returncode == 0, out
    results = _results(log_dir)
    assert all(r["attempt"] >= 1 for r in results)  # a restarted attempt finished the job
    assert 0 < sum(r["computed"] for r in results) <= int((~valid).sum())
    assert all(r["all_valid_after_barrier"] for r in results)
    _assert_every_row_exact(store, None)


def test_ranks_that_fill_different_entries_all_raise_before_computing(
    store_path: Path, tmp_path: Path
) -> None:
    """A rank with other weights or data would fill half of another entry; every rank raises."""
    job = _launch(str(store_path), None, tmp_path / "log", CF_VERSION_BY_RANK="1")
    out = _finish(job, 300)
    assert job.returncode != 0, out
    assert out.count("RankMismatchError: the ranks of this prefill do not fill one entry") == 2, out
    assert not list((tmp_path / "log" / "loads-attempt0").glob("loads-*"))  # nothing computed
