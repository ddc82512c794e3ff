"""Worker processes that end with their parent.

``loader(worker_method="process")`` runs its I/O stage in processes that torchdata starts as
daemons; a daemon is only reaped when its parent exits normally, so a SIGKILLed trainer would
leave them running (parent 1), holding its pipes open. A worker calls :func:`exit_with_parent`
as it starts: on Linux the kernel kills it when its parent dies (``PR_SET_PDEATHSIG``);
elsewhere, or if ``prctl`` is unavailable, a daemon thread watches the parent's pid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["exit_with_parent"]

PR_SET_PDEATHSIG = 1
WATCH_SECONDS = 0.5


def exit_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` (its parent, when it started it) is gone."""
    if os.getpid() == parent_pid:
        return
    if not _set_parent_death_signal():
        threading.Thread(
            target=_watch, args=(parent_pid,), name="cachedfeatures-parent-watch", daemon=True
        ).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _set_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCH_SECONDS)
    os._exit(1)
