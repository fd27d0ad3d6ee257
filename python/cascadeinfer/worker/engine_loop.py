"""Runs an engine on its own thread: commands between steps, steps while there is work.

The gRPC handlers live on the asyncio loop; the engine is synchronous and not thread-safe. Every
engine call goes through `EngineLoop.call`, which queues it for the engine thread and awaits its
result, so commands and steps never overlap. Step reports reach the asyncio side through
`call_soon_threadsafe`, in order, and always before the result of a command issued after them.
The engine is also built on that thread: CPU backends bind their compute threads to the thread
that creates the engine, and stepping from another thread was measured 25-40% slower.

An engine that dies (a step raises, or `check_health` does: vLLM's engine core or model worker
process is gone) ends the thread: `died` resolves with the error, and every call queued or made
after that fails with `EngineDead` instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

from cascadeinfer.worker.engine import Engine, StepReport

T = TypeVar("T")

_IDLE_WAIT_S = 0.05
_Command = tuple[Callable[[], None], Callable[[BaseException], None]]
"""A queued call: what runs on the engine thread, and how it fails if it never runs."""


class EngineDead(Exception):
    """The engine can serve no more (its process died, or a step failed)."""

    @classmethod
    def of(cls, cause: BaseException | None) -> EngineDead:
        """What calls get once the thread ended: `cause` killed the engine (None: stopped)."""
        return cls(f"the engine died: {cause!r}" if cause else "the engine loop is stopped")


class EngineLoop:
    def __init__(
        self,
        build: Callable[[], Engine],
        loop: asyncio.AbstractEventLoop,
        on_step: Callable[[StepReport], None],
    ) -> None:
        self._build = build
        self._loop = loop
        self._on_step = on_step
        self._commands: queue.Queue[_Command | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._stopped = threading.Event()
        self._stopping = threading.Lock()
        """Held while queueing a command and while marking the loop stopped: nothing is queued
        after the thread's last look at the queue."""
        self._ready: asyncio.Future[Engine] = loop.create_future()
        self.died: asyncio.Future[BaseException] = loop.create_future()
        """Resolves with the error that ended the engine thread (never on a plain `stop`)."""
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "EngineLoop.start() has not finished"
        return self._engine

    async def start(self) -> Engine:
        """Builds the engine on the engine thread and returns it once built."""
        self._thread.start()
        return await self._ready

    def stop(self) -> None:
        """Ends the thread after the command queue drains."""
        self._put(None)
        self._thread.join(timeout=30)

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Runs `fn(engine)` on the engine thread and returns its result (or raises its error;
        EngineDead once the engine died)."""
        future: asyncio.Future[T] = self._loop.create_future()

        def settle(result: T | None, error: BaseException | None) -> None:
            if future.cancelled():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        def command() -> None:
            try:
                result = fn(self.engine)
            except BaseException as e:  # handed to the awaiting coroutine
                dead = self._death()
                self._loop.call_soon_threadsafe(settle, None, dead or e)
            else:
                self._loop.call_soon_threadsafe(settle, result, None)

        def fail(error: BaseException) -> None:
            self._loop.call_soon_threadsafe(settle, None, error)

        if not self._put((command, fail)):
            raise self._dead_error()
        return await future

    def _put(self, command: _Command | None) -> bool:
        with self._stopping:
            if self._stopped.is_set():
                return False
            self._commands.put(command)
            return True

    def _dead_error(self) -> EngineDead:
        return EngineDead.of(self.died.result() if self.died.done() else None)

    def _death(self) -> EngineDead | None:
        """EngineDead when the engine can serve no more (a command failed because of that)."""
        try:
            self.engine.check_health()
        except Exception as e:
            return EngineDead.of(e)
        return None

    def _run_commands(self, block: bool) -> bool:
        """Runs queued commands; False once asked to stop."""
        try:
            command = (
                self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
            )
        except queue.Empty:
            return True
        while True:
            if command is None:
                return False
            command[0]()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _settle_ready(self, engine: Engine | None, error: BaseException | None) -> None:
        """Hands the build's outcome to `start`, unless nobody waits for it any more (the
        daemon was stopped during the build and ended the engine's processes)."""
        if self._ready.done():
            return
        if error is not None:
            self._ready.set_exception(error)
        else:
            self._ready.set_result(engine)  # type: ignore[arg-type]

    def _run(self) -> None:
        try:
            engine = self._engine = self._build()
        except BaseException as e:
            self._stopped.set()
            # The loop is closed when the daemon stopped during the build and has exited.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._settle_ready, None, e)
            return
        self._loop.call_soon_threadsafe(self._settle_ready, engine, None)
        error: BaseException | None = None
        try:
            while self._run_commands(block=not engine.has_unfinished()):
                # Also while idle: a dead engine process is noticed without a request.
                engine.check_health()
                if engine.has_unfinished():
                    report = engine.step()
                    self._loop.call_soon_threadsafe(self._on_step, report)
        except Exception as e:
            error = e  # the daemon logs it and exits (server.py)
        finally:
            with self._stopping:
                self._stopped.set()
            if error is not None:
                self._loop.call_soon_threadsafe(self.died.set_result, error)
            self._fail_queued(error)

    def _fail_queued(self, error: BaseException | None) -> None:
        """Commands queued when the thread ended will never run: they fail instead."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command is not None:
                command[1](EngineDead.of(error))
