"""The parent watch of vLLM's helper processes (`parent_watch.py`), with real processes: a
stand-in daemon starts a helper the way vLLM starts its engine core, and is killed with SIGKILL
before or after the helper's watch has started."""

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
from cascadeinfer.worker.engines.parent_watch import mark_daemon
mark_daemon()
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


def helper_outlives_daemon_by(delay_s: float, kill_after_s: float) -> float:
    """Seconds the helper ran on after its daemon was killed (inf: still running after 15 s)."""
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON, HELPER.format(delay=delay_s)],
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
    """Killed during start-up is the case that used to leave the helper running for ever: its
    watch started after it had already been re-parented."""
    ran_on = helper_outlives_daemon_by(delay_s, kill_after_s)
    assert ran_on < delay_s + 5.0
