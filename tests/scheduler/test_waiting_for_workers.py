"""A scheduler whose --workers are not all there says, again and again, which it waits for and
why: a wrong address or a worker refusing its token must not look like a slow start."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from cascadeinfer.scheduler import server
from cascadeinfer.scheduler.worker_client import WorkerCallError
from cascadeinfer.scheduler.workers import WorkerUnreachable
from structlog.testing import capture_logs


class _Workers:
    """`add_worker` as a coordinator answers it: one address never up, one refusing the
    token, one that comes up on its third try."""

    def __init__(self) -> None:
        self.tries: dict[str, int] = {}

    async def add_worker(self, address: str) -> None:
        self.tries[address] = self.tries.get(address, 0) + 1
        if address == "down:1":
            raise WorkerUnreachable(f"{address}: connection refused")
        if address == "refuses:1":
            raise WorkerCallError(grpc.StatusCode.UNAUTHENTICATED, "bad bearer token")
        if self.tries[address] < 3:
            raise WorkerUnreachable(f"{address}: not up yet")


def test_the_workers_still_missing_are_named_with_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "WAITING_LOG_S", 0.2)
    workers: Any = _Workers()

    async def wait() -> None:
        task = asyncio.create_task(
            server.connect_static_workers(workers, ("down:1", "refuses:1", "late:1"))
        )
        await asyncio.sleep(2.0)
        task.cancel()

    with capture_logs() as logs:
        asyncio.run(wait())
    waiting = [e for e in logs if e["event"] == "waiting_for_workers"]
    assert len(waiting) >= 3, "said again while waiting"
    assert waiting[-1]["unreachable"] == ["down:1"]
    assert waiting[-1]["errors"] == {"down:1": "down:1: connection refused"}
    assert waiting[-1]["refused_token"] == ["refuses:1"]
    assert sum(e["event"] == "worker_refused_token" for e in logs) == 1
