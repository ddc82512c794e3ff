"""A flush that runs when the process exits, wherever it exits, and when a SIGTERM ends it.

Zarr's local I/O goes through a thread pool that shuts down in threading's exit hooks, before
``atexit`` handlers run, so a flush that writes to a store must be a threading exit hook
(registered after the pool's, so it runs first). DataLoader worker processes leave through
``os._exit`` after multiprocessing's finalizers, so it is one of those too, at a priority that
orders it among the others (higher runs first).

Neither runs when a SIGTERM ends the process, which is how persistent DataLoader workers end at
program exit (multiprocessing terminates its daemonic children) and how a worker that outstays
``_shutdown_workers``' join is ended. In such a process :func:`exit_on_terminate` makes a
SIGTERM run the exit hooks, then end the process with status 0 (so that the DataLoader reports
no killed worker). A handler runs on the main thread between two of its bytecodes, so code
there that holds what a hook needs (a buffer's lock) runs inside :func:`terminate_deferred`: a
SIGTERM arriving inside it is handled at its end.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

__all__ = ["at_exit", "exit_on_terminate", "terminate_deferred"]

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
# Only the main thread touches these (signal handlers run there too).
_terminate_pid = 0  # the process whose handler is installed (a forked child installs its own)
_previous: Any = signal.SIG_DFL  # the handler ours replaced
_depth = 0  # regions of terminate_deferred the main thread is in
_deferred: int | None = None  # a SIGTERM that arrived inside one


def exit_on_terminate() -> bool:
    """Make a SIGTERM run this process's exit hooks, then end it (status 0).

    For a process that multiprocessing ends by SIGTERM (a DataLoader worker). Installs the
    handler once per process, from the main thread only (where Python sets signal handlers);
    whether it is installed. A handler set before ours (a ``worker_init_fn``'s) runs after the
    hooks instead of the exit, and one that ignored the signal still does.
    """
    global _terminate_pid, _previous
    if _terminate_pid == os.getpid():
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        previous = signal.signal(signal.SIGTERM, _on_terminate)
    except (ValueError, OSError):  # no signals here (an embedded interpreter)
        return False
    _terminate_pid = os.getpid()
    _previous = signal.SIG_DFL if previous is None else previous
    return True


@contextmanager
def terminate_deferred() -> Iterator[None]:
    """A region the SIGTERM hooks must not interrupt: a SIGTERM inside it runs them at its end.

    Enter it before taking what the hooks take (a lock this thread would otherwise hold while
    the handler waits for it). Other threads than the main one are never interrupted by a
    handler, so there it does nothing.
    """
    global _depth, _deferred
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _deferred is not None:
            signum, _deferred = _deferred, None
            _on_terminate(signum, None)


def _on_terminate(signum: int, frame: types.FrameType | None) -> None:
    global _deferred
    if _depth > 0:  # the main thread holds what the hooks need: at the region's end
        _deferred = signum
        return
    _run_exit_hooks()
    previous = _previous
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
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
