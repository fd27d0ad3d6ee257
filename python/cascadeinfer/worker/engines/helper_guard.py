"""Ends a worker daemon's helper processes once the daemon is gone, however it ended.

The parent watch (`parent_watch.py`) runs in a helper only once our code has loaded there. An
engine core still waiting for its start-up handshake, or loading a model, has none of it yet,
so a daemon killed with SIGKILL then (an impatient operator, the OOM killer, a supervisor's
stop timeout) left the engine core running for five minutes (vLLM's handshake timeout), and
on a GPU host holding the memory the daemon's replacement needs.

The guard is a small process the daemon starts before any helper. It learns of the daemon's
end from its stdin, a pipe only the daemon holds (EOF when the daemon exits, whatever the
cause), or from being re-parented, and then ends every process whose environment carries the
daemon's mark, which vLLM's spawned processes inherit: SIGTERM, then SIGKILL after a grace.
An environment, unlike a parent pid, survives the daemon's death, so processes already
re-parented to init are still found. On a clean exit the daemon has ended its helpers itself
and the guard finds none.

It runs as a script with the standard library only (`python -I helper_guard.py MARK PID`), so
it starts in milliseconds and holds a few MB; it ignores SIGINT, SIGTERM and SIGHUP, which a
terminal or a supervisor sends the whole process group, so that it outlives the daemon.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

MARK_ENV = "CASCADE_WORKER_HELPER_MARK"
"""Names the daemon's helpers: set in the daemon's environment, inherited by what it spawns."""
GRACE_S = 3.0
"""How long a helper has after SIGTERM (an engine core in start-up notes one and goes on)."""
_POLL_S = 1.0


def marked(mark: str) -> list[int]:
    """Processes whose environment holds `MARK_ENV=mark` (those this user may read), this one
    left out."""
    needle = f"{MARK_ENV}={mark}".encode()
    me = os.getpid()
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read()
            except OSError:
                continue  # ended meanwhile, or another user's
            if needle in environ.split(b"\0"):
                found.append(int(entry))
    return found


def end(pids: list[int], grace_s: float) -> None:
    """SIGTERM to each of `pids`, SIGKILL to those still running after `grace_s`."""
    signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_is_running(p) for p in pids):
        time.sleep(0.05)
    signal_all([p for p in pids if _is_running(p)], signal.SIGKILL)


def wait_for_daemon_end(daemon_pid: int) -> None:
    """Returns once the daemon is gone: EOF on stdin, or this process re-parented (should a
    process forked from the daemon without exec still hold the pipe's other end)."""
    while os.getppid() == daemon_pid:
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], _POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            return


def _is_running(pid: int) -> bool:
    """Exists and is not a zombie (one that exited holds nothing and needs no signal)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[2].isdigit():
        print(f"usage: {argv[0]} MARK DAEMON_PID", file=sys.stderr)
        return 2
    mark, daemon_pid = argv[1], int(argv[2])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    wait_for_daemon_end(daemon_pid)
    end(marked(mark), GRACE_S)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
