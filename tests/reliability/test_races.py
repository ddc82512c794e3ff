"""Races between real processes: first opens of a new store, budgets shared by several
``cached_module`` processes, and loader workers outliving a killed trainer."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from cachedfeatures import FeatureStore
from cachedfeatures.format.specs import ArraySpec
from tests.helpers import ROOT, child_pids
from tests.reliability.figures import record
from tests.script_server import SCRIPTS

PROCESSES, ROUNDS = 4, 12


def _open_new_stores(base: str, rounds: int, barrier: Any, errors: Any) -> None:
    """Open (creating) store ``r`` and its entry at the same moment as the other processes."""
    for r in range(rounds):
        barrier.wait(timeout=60)
        try:
            store = FeatureStore.open(f"{base}/s{r}.zarr", mode="a")
            store.create_entry(
                "entry",
                {"module": {"description": "m"}, "dataset": {"description": "d"}},
                [ArraySpec("features", "tensor", "float32", (4,))],
                num_rows=16,
                chunk_rows=4,
                compressor=None,
            )
        except Exception:
            errors.put(f"round {r}: {traceback.format_exc()}")


@pytest.mark.slow  # several processes, many rounds
def test_processes_opening_a_new_store_at_once_all_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHEDFEATURES_LOCK_DIR", str(tmp_path / "locks"))
    context = multiprocessing.get_context("fork")
    barrier, errors = context.Barrier(PROCESSES), context.Queue()
    processes = [
        context.Process(target=_open_new_stores, args=(str(tmp_path), ROUNDS, barrier, errors))
        for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, f"{len(found)} of {PROCESSES * ROUNDS} opens failed:\n" + "\n".join(found[:2])
    assert all(process.exitcode == 0 for process in processes)
    for r in range(ROUNDS):
        store = FeatureStore.open(tmp_path / f"s{r}.zarr", mode="r")
        assert [entry.name for entry in store.entries] == ["entry"]
    record("processes opening one new store at once", f"{PROCESSES * ROUNDS}/{PROCESSES * ROUNDS} opens ok")


# Each process calls a cached function under a small budget (the entry's metadata, about 6 kB,
# and a few chunks) on its own inputs, so every append measures the entry while the others
# prune it.
BUDGET_SCRIPT = """
import json, sys, torch
from cachedfeatures import cached_module
store, seed = sys.argv[1], int(sys.argv[2])

@cached_module(store=store, chunk_rows=4, max_bytes=8000, max_memory_bytes=0, version="v")
def embed(x):
    return x * 2

g = torch.Generator().manual_seed(seed)
for _ in range(80):
    x = torch.randn(4, 16, generator=g)
    assert torch.equal(embed(x), x * 2)
print(json.dumps({"ok": True}))
"""


@pytest.mark.slow  # six processes at once
def test_cached_module_budget_in_several_processes(store_path: Path) -> None:
    processes = [SCRIPTS.start(BUDGET_SCRIPT, str(store_path), str(seed)) for seed in range(6)]
    failures = []
    for process in processes:
        _, err = process.communicate(timeout=300)
        if process.returncode != 0:
            failures.append(err[-1500:])
    assert not failures, f"{len(failures)} of 6 processes died:\n" + failures[0]
    record("cached_module under max_bytes in 6 processes", "6/6 finished, every output equal to x * 2")


TRAINER_SCRIPT = """
import sys, time
from cachedfeatures import CachedFeatureDataset
from tests.helpers import Backbone, SlowSamples
cached = CachedFeatureDataset(SlowSamples(4096, 0.05), Backbone(), sys.argv[1], batch_size=4,
                              dataset_version="v")
loader = cached.loader(num_workers=2, worker_method="process")
for i, _ in enumerate(loader):
    if i == 1:
        print("training", flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent (now init) has not reaped it


@pytest.mark.slow  # a fresh interpreter and two worker processes
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_process_workers_exit_when_the_trainer_is_killed(store_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER_SCRIPT, str(store_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert trainer.stdout is not None
        assert trainer.stdout.readline().strip() == "training", (
            trainer.stderr.read() if trainer.stderr else ""
        )
        workers = child_pids(trainer.pid)
        assert len(workers) >= 2, workers
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(30)
    killed = time.monotonic()
    deadline = killed + 5
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.05)
    alive = [pid for pid in workers if _alive(pid)]
    for pid in alive:  # don't leave them behind
        os.kill(pid, signal.SIGKILL)
    for pipe in (trainer.stdout, trainer.stderr):
        if pipe is not None:
            pipe.close()
    assert not alive, f"workers {alive} outlived their killed trainer by 5 s"
    record("process workers gone after SIGKILL of the trainer", f"{time.monotonic() - killed:.2f} s")


def _death_signal(results: Any) -> None:
    import ctypes

    value = ctypes.c_int(-1)
    ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
    results.put(value.value)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl")
def test_other_children_forked_meanwhile_keep_their_lifetime(store_path: Path) -> None:
    """Only the stage's own worker processes are tied to their parent, not the user's children."""
    from cachedfeatures import CachedFeatureDataset
    from cachedfeatures.pipeline.nodes import ReadOrLoad
    from tests.helpers import Backbone, Samples

    cached = CachedFeatureDataset(Samples(8), Backbone(), store_path)
    assert cached.entry is not None
    stage = ReadOrLoad(cached.hit_reader(), cached.row_loader(), in_processes=True)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_death_signal, args=(results,))
    child.start()
    child.join(30)
    assert results.get(timeout=10) == 0 and child.exitcode == 0
    mine = context.Process(target=stage, args=([0, 1],))  # a process running the stage itself
    mine.start()
    mine.join(30)
    assert mine.exitcode == 0
