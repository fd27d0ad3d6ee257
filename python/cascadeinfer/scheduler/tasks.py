"""Background tasks of the scheduler (worker feeds, migrations, the tick loop): a failure is
logged with its traceback and counted by task name, never dropped with the task; the tasks the
scheduler cannot go on without end it (`watch_essential`), so a supervisor restarts it instead
of a process that looks alive and no longer schedules. Long computations run on a thread of
their own (`run_in_daemon_thread`), beside the event loop every RPC shares."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from prometheus_client import Counter

log = structlog.get_logger(__name__)

T = TypeVar("T")


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


async def run_in_daemon_thread(name: str, work: Callable[[], T]) -> T:
    """`work()` on a thread of its own, awaited without holding the event loop. A daemon
    thread, not the loop's executor: the first plan takes seconds to minutes on a large
    fleet, and `asyncio.Runner` waits for the executor's threads at exit, so a scheduler
    stopped while it planned would keep running until the plan was made. Cancelling the
    await leaves the work running to its end; its result is dropped."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            result = work()
        except BaseException as e:  # handed to the awaiting task, which raises it
            error: BaseException | None = e
            result = None
        else:
            error = None
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=body, name=name, daemon=True).start()
    return await done
