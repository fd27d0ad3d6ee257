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

A daemon stopped (SIGTERM, SIGINT) before its engine is built ends those processes itself
(`end_helper_processes`): an engine core still waiting for its start-up handshake has loaded
none of our code, so no watch runs in it, and it would wait five minutes for the handshake.
A daemon killed then (SIGKILL) cannot; the helper guard it started first does
(`helper_guard.py`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import secrets
import subprocess
import sys
import threading
import time

from cascadeinfer.worker.engines import helper_guard

DAEMON_PID_ENV = "CASCADE_WORKER_DAEMON_PID"
"""The worker daemon's pid, inherited by the engine core and its workers."""
_POLL_S = 1.0
_started = False
_guard: subprocess.Popen[bytes] | None = None
"""The helper guard; held for the daemon's life (its stdin is the pipe whose EOF it waits for)."""


def mark_daemon() -> None:
    """Called by the daemon before it starts helper processes: they inherit its pid and its
    mark, and the helper guard, started here once, ends the marked ones when it is gone."""
    global _guard
    os.environ[DAEMON_PID_ENV] = str(os.getpid())
    if _guard is not None and _guard.poll() is None:
        return
    mark = secrets.token_hex(8)
    os.environ[helper_guard.MARK_ENV] = mark
    unmarked = {k: v for k, v in os.environ.items() if k != helper_guard.MARK_ENV}
    _guard = subprocess.Popen(
        [sys.executable, "-I", helper_guard.__file__, mark, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,  # it prints nothing; a reader of the daemon's waits for EOF
        env=unmarked,
    )


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


def end_helper_processes(grace_s: float = 3.0) -> int:
    """The daemon's side, for a stop before its engine was built: ends the processes this one
    started through multiprocessing (vLLM's engine core) and theirs (its model workers, which
    would otherwise load their model to the end before they notice): SIGTERM, then SIGKILL
    for those still there after `grace_s` (an engine core that is waiting for its handshake,
    or loading a model, notes a SIGTERM and goes on). Returns how many processes it ended."""
    helpers = multiprocessing.active_children()
    pids = [q for p in helpers if p.pid is not None for q in (p.pid, *_descendants(p.pid))]
    helper_guard.end(pids, grace_s)  # an exited child, a zombie until joined, counts as ended
    for p in helpers:
        p.join(5)
    return len(pids)


def _descendants(pid: int) -> list[int]:
    """The processes below `pid`, from /proc (none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # ended meanwhile
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
