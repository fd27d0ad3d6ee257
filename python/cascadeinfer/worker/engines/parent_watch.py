"""Ends a vLLM helper process (engine core, model worker) when the daemon that started it dies.

vLLM's engine core outlives a daemon killed with SIGKILL (or one that crashed): it is
re-parented to init and keeps its model and KV cache in memory, on a GPU host its GPU memory,
forever. Each helper process that loads our code (the KV connector in the engine core, the
worker extension in the model workers) starts this watch; it exits when its parent is gone or
when the daemon is, and vLLM's own shutdown path takes the workers with it.

The daemon's pid comes in the environment (`mark_daemon`, before the engine starts), because a
helper starts its watch only once our code loads in it, after vLLM has set the process up:
a daemon killed during that start-up (a big model loads for minutes) is already gone when the
watch starts, so "my parent changed" alone would never fire there.
"""

from __future__ import annotations

import os
import threading
import time

DAEMON_PID_ENV = "CASCADE_WORKER_DAEMON_PID"
"""The worker daemon's pid, inherited by the engine core and its workers."""
_POLL_S = 1.0
_started = False


def mark_daemon() -> None:
    """Called by the daemon before it starts helper processes: they inherit its pid."""
    os.environ[DAEMON_PID_ENV] = str(os.getpid())


def watch_parent() -> None:
    """Starts the watch once per process (a no-op on later calls)."""
    global _started
    if _started:
        return
    _started = True
    daemon = os.environ.get(DAEMON_PID_ENV, "")
    daemon_pid = int(daemon) if daemon.isdigit() and int(daemon) != os.getpid() else None
    parent = os.getppid()
    threading.Thread(
        target=_watch, args=(parent, daemon_pid), name="parent-watch", daemon=True
    ).start()


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _watch(parent: int, daemon_pid: int | None) -> None:
    while os.getppid() == parent and (daemon_pid is None or is_alive(daemon_pid)):
        time.sleep(_POLL_S)
    os._exit(1)
