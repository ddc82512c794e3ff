"""Run under ``torchrun``: prefill one store across ranks (gloo, CPU).

Each rank logs every chunk its writer stores to ``<log_dir>/writes-rank<r>.log``, its pid to
``<log_dir>/pid-rank<r>-attempt<a>`` (``a``: torchrun's restart count), every row it loads
during prefill to ``<log_dir>/loads-attempt<a>/`` and its result to
``<log_dir>/result-rank<r>.json``, so a test can check that no chunk had two writers, and
kill a rank mid-way. Used by ``tests/test_distributed.py``, ``tests/reliability/test_lost_rank.py``
and ``benchmarks/bench_prefill_ranks.py``.

    torchrun --standalone --nproc_per_node=2 tests/prefill_ranks.py STORE LOG_DIR [ROWS] [DELAY]

Environment: ``CF_STORAGE_OPTIONS`` (JSON fsspec options for a URL store), ``CF_TIMEOUT``
(``prefill(timeout=...)``), ``CF_HANG_RANK`` (that rank hangs before its first prefill load,
in the first attempt only), ``CF_VERSION_BY_RANK`` (each rank wraps a different dataset version).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from cachedfeatures import CachedFeatureDataset, build_on_ranks
from tests.helpers import Backbone, SlowSamples

CONNECT_TIMEOUT_S = 30.0


def _connect_hung() -> None:
    print(f"gloo's connect hung for {CONNECT_TIMEOUT_S:g} s: exiting, so torchrun restarts", flush=True)
    os._exit(3)


def _init_group(attempt: int) -> None:
    """``init_process_group`` as ``env://`` does, with gloo's keys under a prefix of this attempt.

    Without it, a restarted group now and then reads the addresses of the attempt torchrun killed
    from the store and fails to connect ("Connection refused" to a port no rank listens on), five
    restarts in a row in one run here.
    """
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=CONNECT_TIMEOUT_S)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0,
        timeout=timeout,
    )
    prefixed = dist.PrefixStore(f"attempt-{attempt}", store)
    dist.init_process_group("gloo", store=prefixed, rank=rank, world_size=world_size, timeout=timeout)


class MaybeHanging(SlowSamples):
    """SlowSamples that hang for good (until killed) once ``hang`` is set: a hung rank."""

    hang = False

    def __getitem__(self, index: int) -> Any:
        if self.hang:
            Path(self.log_dir or ".", f"hung-{os.getpid()}").touch()
            time.sleep(3600)
        return super().__getitem__(index)


def main() -> None:
    store, log_dir = sys.argv[1], Path(sys.argv[2])
    rows = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    options = json.loads(os.environ.get("CF_STORAGE_OPTIONS", "null"))
    timeout = float(os.environ["CF_TIMEOUT"]) if "CF_TIMEOUT" in os.environ else None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    # A bounded connect. A group that torchrun restarted hangs in gloo's connect in about one run
    # of three here: both ranks wait in Pair::waitUntilConnected, past the group's timeout (the
    # listener's side of a pair drops it: pytorch/gloo#520). The rank then exits, and torchrun
    # restarts the group again, as a user's job would want. A connect takes a second or two, and
    # every collective of the job a few seconds.
    watchdog = threading.Timer(CONNECT_TIMEOUT_S, _connect_hung)
    watchdog.daemon = True  # a connect that fails must not wait for it
    watchdog.start()
    try:
        _init_group(attempt)
    finally:
        watchdog.cancel()
    rank = dist.get_rank()
    (log_dir / f"pid-rank{rank}-attempt{attempt}").write_text(str(os.getpid()))
    handler = logging.FileHandler(log_dir / f"writes-rank{rank}.log")
    writer_log = logging.getLogger("cachedfeatures.store.writer")
    writer_log.setLevel(logging.DEBUG)
    writer_log.addHandler(handler)

    data = MaybeHanging(rows, delay=delay)
    cached = build_on_ranks(  # rank 0 creates the entry; the other ranks then open it
        lambda: CachedFeatureDataset(
            data,
            Backbone(),
            store,
            batch_size=16,
            chunk_rows=16,
            dataset_version=f"v{rank}" if "CF_VERSION_BY_RANK" in os.environ else "v",
            storage_options=options,
        )
    )
    dist.barrier()
    loads = log_dir / f"loads-attempt{attempt}"
    loads.mkdir(exist_ok=True)
    data.log_dir = str(loads)  # after the fingerprint: only prefill's loads are logged
    data.hang = attempt == 0 and os.environ.get("CF_HANG_RANK") == str(rank)
    started = time.perf_counter()
    result = cached.prefill(progress=False, timeout=timeout)
    seconds = time.perf_counter() - started
    entry = cached.entry
    assert entry is not None
    summary = {
        "rank": rank,
        "attempt": attempt,
        "world_size": dist.get_world_size(),
        "computed": result.computed,
        "skipped": result.skipped,
        "seconds": seconds,
        "all_valid_after_barrier": bool(entry.valid_mask().all()),
    }
    (log_dir / f"result-rank{rank}.json").write_text(json.dumps(summary))
    handler.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
