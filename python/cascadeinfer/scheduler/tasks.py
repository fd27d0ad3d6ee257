"""Background tasks of the scheduler (worker feeds, migrations, the tick loop): a failure is
logged with its traceback and counted by task name, never dropped with the task; the tasks the
scheduler cannot go on without end it (`watch_essential`), so a supervisor restarts it instead
of a process that looks alive and no longer schedules."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from prometheus_client import Counter

log = structlog.get_logger(__name__)


def report_failure(task: asyncio.Task[Any], failures: Counter) -> BaseException | None:
    """The exception `task` died of (None when it returned or was cancelled), logged once and
    counted under the task's name."""
    if task.cancelled():
        return None
    error = task.exception()
    if error is None:
        return None
    name = task.get_name()
    failures.labels(name).inc()
    log.error("background_task_failed", task=name, error=repr(error), exc_info=error)
    return error


def watch_essential(task: asyncio.Task[Any], failures: Counter, stop: asyncio.Event) -> None:
    """Sets `stop` if `task` fails: the daemon shuts down and exits with status 1."""

    def done(t: asyncio.Task[Any]) -> None:
        if report_failure(t, failures) is not None:
            log.critical("essential_task_failed", task=t.get_name())
            stop.set()

    task.add_done_callback(done)
