"""Ends a vLLM helper process (engine core, model worker) when the process that started it dies.

vLLM's engine core outlives a daemon killed with SIGKILL (or one that crashed): it is
re-parented to init and keeps its model and KV cache in memory, on a GPU host its GPU memory,
forever. Each helper process that loads our code (the KV connector in the engine core, the
worker extension in the model workers) starts this watch; when its parent is gone it exits,
and vLLM's own shutdown path takes the workers with it.
"""

from __future__ import annotations

import os
import threading
import time

_POLL_S = 1.0
_started = False


def watch_parent() -> None:
    """Starts the watch once per process (a no-op on later calls)."""
    global _started
    if _started:
        return
    _started = True
    parent = os.getppid()
    threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_POLL_S)
    os._exit(1)
