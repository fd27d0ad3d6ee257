"""The parent watch of vLLM's helper processes (`parent_watch.py`) and the daemon's helper
guard (`helper_guard.py`), with real processes: a stand-in daemon starts a helper the way vLLM
starts its engine core, and is killed with SIGKILL before or after the helper's watch has
started, or before the helper ever loads our code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DAEMON = """
import subprocess, sys, time
from cascadeinfer.worker.engines import parent_watch
parent_watch.mark_daemon()
if sys.argv[2] == "watch-only":
    parent_watch._guard.kill()
    parent_watch._guard.wait()
helper = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(helper.pid, flush=True)
time.sleep(120)
"""

HELPER = """
import time
time.sleep({delay})  # vLLM setting the process up before our code loads in it
from cascadeinfer.worker.engines.parent_watch import watch_parent
watch_parent()
time.sleep(120)
"""


def has_exited(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet (it no longer holds anything)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" in status.read_text()
    except FileNotFoundError:
        return True


def helper_outlives_daemon_by(delay_s: float, kill_after_s: float, guard: str) -> float:
    """Seconds the helper ran on after its daemon was killed (inf: still running after 15 s)."""
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON, HELPER.format(delay=delay_s), guard],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert daemon.stdout is not None
    helper = int(daemon.stdout.readline())
    try:
        time.sleep(kill_after_s)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=10)
        killed = time.monotonic()
        while time.monotonic() - killed < 15:
            if has_exited(helper):
                return time.monotonic() - killed
            time.sleep(0.1)
        return float("inf")
    finally:
        if not has_exited(helper):
            os.kill(helper, signal.SIGKILL)


@pytest.mark.parametrize(
    ("delay_s", "kill_after_s"),
    [(0.0, 1.5), (2.0, 0.5)],
    ids=["daemon-killed-after-the-watch-started", "daemon-killed-during-start-up"],
)
def test_a_helper_ends_soon_after_its_daemon_is_killed(delay_s: float, kill_after_s: float) -> None:
    """The watch alone (the guard killed first). Killed during start-up is the case that used
    to leave the helper running for ever: its watch started after it had already been
    re-parented."""
    ran_on = helper_outlives_daemon_by(delay_s, kill_after_s, "watch-only")
    assert ran_on < delay_s + 5.0


def test_the_guard_ends_a_helper_that_never_loaded_our_code() -> None:
    """An engine core waiting for its start-up handshake runs none of our code, so no watch;
    it used to outlive a daemon killed then by five minutes. The guard ends it within its
    grace (a plain sleeping helper dies of the SIGTERM at once)."""
    ran_on = helper_outlives_daemon_by(300.0, 1.0, "guarded")
    assert ran_on < 5.0


def test_the_guard_finds_only_its_own_daemons_helpers() -> None:
    """`marked` matches the mark in a process's environment exactly: not another daemon's
    helpers, not a mark that merely starts the same."""
    from cascadeinfer.worker.engines.helper_guard import MARK_ENV, marked

    env = {**os.environ, MARK_ENV: "abc123"}
    mine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], env={**env, MARK_ENV: "abc1234"}
    )
    try:
        deadline = time.monotonic() + 10
        while mine.pid not in marked("abc123") and time.monotonic() < deadline:
            time.sleep(0.05)  # /proc shows the environment once the exec is done
        found = marked("abc123")
        assert mine.pid in found
        assert other.pid not in found
    finally:
        mine.kill()
        other.kill()
        mine.wait()
        other.wait()
