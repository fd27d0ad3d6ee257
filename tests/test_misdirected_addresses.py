"""Daemons given an address that answers gRPC but is not what they need (a worker's
--scheduler naming a worker, a scheduler's --workers naming itself) say so once, at once.
Before, the worker said nothing at all while it retried, and the scheduler said only, after
30 s, that it waited for an "unreachable" address that was answering every call."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cascadeinfer.launcher import SCHEDULER, spawn

from tests.worker.daemons import SIM_WORKER, free_port, start_worker, workers


def _wait_for_event(log_path: Path, name: str, timeout: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("event") == name:
                return dict(json.loads(line))
        time.sleep(0.2)
    raise AssertionError(f"no {name} within {timeout} s:\n{log_path.read_text()[-2000:]}")


def test_a_worker_whose_scheduler_is_a_worker_says_so(tmp_path: Path) -> None:
    with workers([SIM_WORKER], tmp_path) as (target,):
        misdirected = start_worker([*SIM_WORKER, "--scheduler", target.address], tmp_path)
        try:
            event = _wait_for_event(misdirected.log_path, "scheduler_address_not_a_scheduler")
            assert event["scheduler"] == target.address
            assert event["level"] == "error"
        finally:
            misdirected.kill()


def test_a_scheduler_listing_itself_as_a_worker_says_so(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    process, log_path = spawn(SCHEDULER, ["--port", str(port), "--workers", address], tmp_path)
    try:
        event = _wait_for_event(log_path, "worker_address_not_a_worker")
        assert event["address"] == address
    finally:
        process.kill()
        process.wait()
