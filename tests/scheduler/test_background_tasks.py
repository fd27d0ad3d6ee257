"""Background tasks of the scheduler: a failure is logged and counted, not dropped with the
task, and the death of the tick loop shuts the daemon down with a FatalError, which
`run_daemon` turns into exit status 1 (a real scheduler, in process, on a loopback port) instead of leaving a process that serves and never schedules."""

from __future__ import annotations

import asyncio

import pytest
from cascadeinfer.daemon import FatalError
from cascadeinfer.scheduler import server
from cascadeinfer.scheduler.config import SchedulerConfig
from cascadeinfer.scheduler.coordinator import Coordinator


def _failures(coordinator: Coordinator, task: str) -> float:
    value = coordinator.metrics.registry.get_sample_value(
        "cascade_scheduler_background_failures_total", {"task": task}
    )
    return value or 0.0


async def test_a_failed_background_task_is_counted_by_name() -> None:
    coordinator = Coordinator(SchedulerConfig(host="127.0.0.1", port=0))

    async def _follow() -> None:
        raise RuntimeError("feed broke")

    async def _migrate() -> None:
        await asyncio.sleep(0)

    coordinator._spawn(_follow())
    coordinator._spawn(_migrate())
    for _ in range(5):
        await asyncio.sleep(0)
    assert _failures(coordinator, "_follow") == 1
    assert _failures(coordinator, "_migrate") == 0
    assert not coordinator._tasks  # both done, neither left behind
    await coordinator.close()


async def test_the_scheduler_exits_1_when_its_tick_loop_dies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken_tick(self: Coordinator) -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("tick failed")

    monkeypatch.setattr(Coordinator, "tick_forever", broken_tick)
    config = SchedulerConfig(host="127.0.0.1", port=0)
    with pytest.raises(FatalError, match="tick_forever failed: RuntimeError"):
        await asyncio.wait_for(server.serve(config), timeout=30)
