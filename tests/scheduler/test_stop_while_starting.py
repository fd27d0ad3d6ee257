"""A scheduler stopped before it serves (Ctrl-C or SIGTERM while it waits for the workers of
its --workers list, say ones not started yet) stops as it does later: at once, exit 0, a log
line, no traceback. Before, SIGINT spilled some 50 lines of tracebacks (exit 130) and SIGTERM
killed it without its shutdown (exit -15)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from cascadeinfer.launcher import SCHEDULER, spawn

from tests.worker.daemons import free_port


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_scheduler_waiting_for_its_workers_stops_cleanly(
    tmp_path: Path, sig: signal.Signals
) -> None:
    absent = f"127.0.0.1:{free_port()}"
    process, log_path = spawn(SCHEDULER, ["--workers", absent], tmp_path)
    try:
        deadline = time.monotonic() + 60
        while '"event": "health"' not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        time.sleep(1.0)  # inside the wait for the absent worker
        process.send_signal(sig)
        assert process.wait(timeout=20) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log_path.read_text()
    assert "Traceback" not in text
    assert '"event": "stopped"' in text
