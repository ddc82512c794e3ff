"""A flush that runs when the process exits, wherever it exits.

Zarr's local I/O goes through a thread pool that shuts down in threading's exit hooks, before
``atexit`` handlers run, so a flush that writes to a store must be a threading exit hook
(registered after the pool's, so it runs first). DataLoader worker processes leave through
``os._exit`` after multiprocessing's finalizers, so it is one of those too, at a priority that
orders it among the others (higher runs first).
"""

from __future__ import annotations

import atexit
import multiprocessing.util
import os
import threading
from collections.abc import Callable

__all__ = ["at_exit"]

_registered: dict[Callable[[], None], int] = {}  # hook -> the process it is registered in


def at_exit(hook: Callable[[], None], priority: int) -> None:
    """Run ``hook`` once when this process exits (main process or DataLoader worker).

    Registered once per process: a forked child registers again on its first call.
    """
    if _registered.get(hook) == os.getpid():
        return
    _registered[hook] = os.getpid()
    register = getattr(threading, "_register_atexit", atexit.register)
    try:
        register(hook)
    except RuntimeError:  # already shutting down
        return
    multiprocessing.util.Finalize(None, hook, exitpriority=priority)
