"""A flush that runs when the process exits, wherever it exits, and when a SIGTERM ends it.

Zarr's local I/O goes through a thread pool that shuts down in threading's exit hooks, before
``atexit`` handlers run, so a flush that writes to a store must be a threading exit hook
(registered after the pool's, so it runs first). DataLoader worker processes leave through
``os._exit`` after multiprocessing's finalizers, so it is one of those too, at a priority that
orders it among the others (higher runs first).

Neither runs when a SIGTERM ends the process, which is how persistent DataLoader workers end at
program exit (multiprocessing terminates its daemonic children) and how a worker that outstays
``_shutdown_workers``' join is ended. In such a process :func:`exit_on_terminate` makes a
SIGTERM run the exit hooks, then end the process with status 0, so that the DataLoader reports
no killed worker. The hooks run in a thread of their own, which the handler only wakes: a
handler runs on the main thread between two of its bytecodes, maybe while it holds a lock a
hook takes, so a hook run there could wait on its own thread forever.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import signal
import sys
import threading
import types
from collections.abc import Callable
from contextlib import suppress

__all__ = ["at_exit", "exit_on_terminate"]

logger = logging.getLogger(__name__)

_registered: dict[Callable[[], None], tuple[int, int]] = {}  # hook -> (its process, priority)


def at_exit(hook: Callable[[], None], priority: int) -> None:
    """Run ``hook`` once when this process exits (main process or DataLoader worker).

    Registered once per process: a forked child registers again on its first call.
    """
    if _registered.get(hook, (0, 0))[0] == os.getpid():
        return
    _registered[hook] = (os.getpid(), priority)
    register = getattr(threading, "_register_atexit", atexit.register)
    try:
        register(hook)
    except RuntimeError:  # already shutting down
        return
    multiprocessing.util.Finalize(None, hook, exitpriority=priority)


# -- SIGTERM ----------------------------------------------------------------------------------
_terminate_pid = 0  # the process whose handler is installed (a forked child installs its own)
_terminated = threading.Event()


def exit_on_terminate() -> bool:
    """Make a SIGTERM run this process's exit hooks, then end it (status 0); whether it does.

    For a process that multiprocessing ends by SIGTERM (a DataLoader worker). Installed once per
    process, from the main thread only (where Python sets signal handlers), and only over the
    default handling: a handler of the program's own (a ``worker_init_fn``'s) stays as it is.
    """
    global _terminate_pid, _terminated
    if _terminate_pid == os.getpid():
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return False
    _terminated = threading.Event()  # a forked child's own
    threading.Thread(
        target=_exit_when_terminated, args=(_terminated,), name="cachedfeatures-sigterm", daemon=True
    ).start()
    try:
        signal.signal(signal.SIGTERM, _on_terminate)
    except (ValueError, OSError):  # no signals here (an embedded interpreter)
        return False
    _terminate_pid = os.getpid()
    return True


def _on_terminate(signum: int, frame: types.FrameType | None) -> None:
    _terminated.set()  # the thread below runs the hooks; this thread goes on until it exits


def _exit_when_terminated(terminated: threading.Event) -> None:
    terminated.wait()
    _run_exit_hooks()
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):  # a closed or broken stream: nothing to keep
            stream.flush()
    os._exit(0)  # as a worker leaving normally does, after its finalizers


def _run_exit_hooks() -> None:
    """Run this process's exit hooks now, highest priority first (at exit they run again: each
    is a flush, with nothing left to do then)."""
    pid = os.getpid()
    hooks = [(priority, hook) for hook, (at, priority) in _registered.items() if at == pid]
    for _, hook in sorted(hooks, key=lambda item: -item[0]):
        try:
            hook()
        except Exception as error:  # the process is ending: what is lost is recomputed later
            logger.warning("cachedfeatures: an exit hook run at SIGTERM failed: %s", error)
