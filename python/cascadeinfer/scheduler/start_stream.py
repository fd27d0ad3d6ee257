"""The scheduler's placements on one worker, batched over one StartDetached stream.

A detached Generate call per placement costs the scheduler a whole gRPC call (a call object,
metadata, a send and a few completions) for one small message; at thousands of new streams a
second that was the largest cost left in its process (docs/benchmarks.md, "Data plane"). Here
every placement made while a batch is being written goes out in the next one, and the
worker answers each batch with one message. Each `start` still gets its own result, as the
single call gave it.

Bounds: what waits here is placements the coordinator made and awaits (each with a timeout),
and aborts of starts whose caller left meanwhile (one short call each);
the stream is reopened on the next placement after it breaks, and the placements in flight on a
broken stream fail with its status (the coordinator re-places them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from typing import TYPE_CHECKING

import grpc
import structlog

from cascadeinfer.proto.v1 import worker_pb2
from cascadeinfer.scheduler.worker_errors import WorkerCallError

if TYPE_CHECKING:
    from cascadeinfer.proto.v1.worker_pb2_grpc import WorkerServiceAsyncStub

Call = grpc.aio.StreamStreamCall[worker_pb2.StartBatch, worker_pb2.StartResults]

log = structlog.get_logger(__name__)
STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
BROKE = (grpc.StatusCode.UNAVAILABLE, "the start stream broke")
UNANSWERED = (grpc.StatusCode.DEADLINE_EXCEEDED, "the worker did not answer a batch of starts")
FAILED = (grpc.StatusCode.INTERNAL, "the start stream failed")


class StartStream:
    """Batched detached starts on one worker; `start` is what `WorkerClient.start_detached`
    does."""

    def __init__(
        self, stub: WorkerServiceAsyncStub, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        """Sent with the stream: the scheduler's name on its placements."""
        self._call: Call | None = None
        self._queued: list[tuple[worker_pb2.GenerateRequest, asyncio.Future[None]]] = []
        self._in_flight: deque[tuple[str, asyncio.Future[None]]] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._aborts: set[asyncio.Task[None]] = set()
        """Aborts of starts whose caller left (`_abandon`), and the ends of broken calls."""
        self._timeout_s = 10.0
        """How long the worker has to answer a batch (the callers' timeout) before the stream
        is taken to be broken."""

    async def start(self, request: worker_pb2.GenerateRequest, timeout_s: float) -> None:
        """Returns once the worker admitted `request`; raises WorkerCallError with its refusal
        (or the stream's failure, or DEADLINE_EXCEEDED)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued.append((request, future))
        self._timeout_s = timeout_s
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(
                self._write(), name="start_stream_write"
            )
        try:
            async with asyncio.timeout(timeout_s):
                # Shielded: a caller cancelled while the start is in flight must not lose its
                # answer (see `_abandon`).
                await asyncio.shield(future)
        except TimeoutError:
            future.cancel()  # not sent yet: never sent; answered late: the answer is ignored
            raise WorkerCallError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the worker did not answer the start in time"
            ) from None
        except asyncio.CancelledError:
            self._abandon(request.request_id, future)
            raise

    def _abandon(self, request_id: str, future: asyncio.Future[None]) -> None:
        """The caller left (its client cancelled, or its deadline passed, while the request was
        being placed). A start not sent yet is dropped; one the worker may accept would run
        there with nobody reading it, to its max_tokens: it is aborted once accepted."""
        if any(f is future for _, f in self._queued):
            future.cancel()
            return
        future.add_done_callback(functools.partial(self._abort_if_started, request_id))

    def _abort_if_started(self, request_id: str, future: asyncio.Future[None]) -> None:
        if future.cancelled() or future.exception() is not None:
            return  # refused, or the stream broke: nothing runs there for this start
        task = asyncio.get_running_loop().create_task(self._abort(request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _abort(self, request_id: str) -> None:
        try:
            await self._stub.Abort(
                worker_pb2.AbortRequest(request_id=request_id), timeout=self._timeout_s
            )
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
            log.info("abandoned_start_abort_failed", request_id=request_id, error=str(e))

    def _open(self) -> Call:
        if self._call is not None:
            return self._call
        call: Call = self._stub.StartDetached(metadata=self._metadata)
        self._call = call
        self._reader = asyncio.get_running_loop().create_task(
            self._read(call), name="start_stream_read"
        )
        return call

    async def _write(self) -> None:
        """Sends what is queued, one batch per write, with at most one batch unanswered: the
        placements made until the worker answers go out together in the next one (Nagle's rule,
        for placements). At low load a placement goes out at once; under load batches grow to
        what arrives in one round trip, and the worker's engine thread takes each in one call."""
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                live = [(r, f) for r, f in batch if not f.done()]  # timed out while queued
                if not live:
                    continue
                call = self._open()
                self._in_flight.extend((r.request_id, f) for r, f in live)
                try:
                    await call.write(worker_pb2.StartBatch(requests=[r for r, _ in live]))
                except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                    # The stream broke; what is in flight on it fails with its status.
                    self._broken(call, BROKE)
                    continue
                answered, _ = await asyncio.wait([live[-1][1]], timeout=self._timeout_s)
                if not answered:
                    self._broken(call, UNANSWERED)
        except Exception:
            log.exception("start_stream_write_failed")
            self._broken(self._call, FAILED)
        finally:
            self._writer = None

    async def _read(self, call: Call) -> None:
        error = (grpc.StatusCode.UNAVAILABLE, "the start stream ended")
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    break
                assert isinstance(message, worker_pb2.StartResults)
                for result in message.results:
                    if not self._in_flight or self._in_flight[0][0] != result.request_id:
                        error = (grpc.StatusCode.INTERNAL, "start results out of order")
                        call.cancel()
                        return
                    _, future = self._in_flight.popleft()
                    if future.done():  # its caller timed out
                        continue
                    if result.code == 0:
                        future.set_result(None)
                    else:
                        code = STATUS_BY_NUMBER.get(result.code, grpc.StatusCode.UNKNOWN)
                        future.set_exception(WorkerCallError(code, result.message))
        except grpc.aio.AioRpcError as e:
            error = (e.code(), e.details() or "")
        except asyncio.CancelledError:
            error = (grpc.StatusCode.CANCELLED, "the start stream was closed")
            raise
        finally:
            self._broken(call, error)

    def _broken(self, call: Call | None, error: tuple[grpc.StatusCode, str]) -> None:
        """Fails every start in flight on `call` with the status `error`; the next start opens
        a new stream."""
        if call is None or call is not self._call:
            return
        self._call = None
        call.cancel()
        # A call that ended by itself (the worker died) ignores cancel(), and on a channel with
        # interceptors (the cluster token) the task grpc feeds it from then waits for the next
        # write for good: destroyed pending when collected, asyncio logged two errors at each
        # worker failure. Ending the writes ends that task.
        task = asyncio.get_running_loop().create_task(_end_writes(call))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)
        while self._in_flight:
            _, future = self._in_flight.popleft()
            if not future.done():
                future.set_exception(WorkerCallError(*error))
                future.exception()  # retrieved: its caller may have gone

    async def close(self) -> None:
        for task in (self._writer, self._reader, *self._aborts):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


async def _end_writes(call: Call) -> None:
    with contextlib.suppress(Exception):  # it may have ended its writes already
        await call.done_writing()
