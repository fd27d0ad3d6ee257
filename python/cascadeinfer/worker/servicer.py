"""WorkerService handlers: short, each delegating to the engine loop, the hub or migration."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, TypeVar

import grpc
import structlog

from cascadeinfer.domain import check_request_id
from cascadeinfer.log_throttle import LogThrottle
from cascadeinfer.memory import release_freed_memory
from cascadeinfer.proto.v1 import worker_pb2, worker_pb2_grpc
from cascadeinfer.wire import PLACED_BY_KEY
from cascadeinfer.worker import convert, kv_stream
from cascadeinfer.worker.claim import HeldByAnotherScheduler, SchedulerRank
from cascadeinfer.worker.engine import (
    Engine,
    EngineError,
    ErrorCode,
    FinishReason,
    KVSnapshot,
    kv_peer_of,
)
from cascadeinfer.worker.engine_loop import EngineDead
from cascadeinfer.worker.errors import fail
from cascadeinfer.worker.hub import Hub, StreamEnd, StreamItem
from cascadeinfer.worker.migration import MigrationFailed, migrate_out
from cascadeinfer.worker.starts import NOT_THE_HOLDER, start_batch
from cascadeinfer.worker.state import WorkerState

log = structlog.get_logger(__name__)
Context = grpc.aio.ServicerContext[object, object]


async def _abort_unknown(context: Context, request_id: str) -> None:
    """NOT_FOUND for an id this worker does not hold; INVALID_ARGUMENT, without echoing it, for
    one no request can have (over MAX_REQUEST_ID_CHARS)."""
    try:
        check_request_id(request_id)
    except EngineError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
    await context.abort(grpc.StatusCode.NOT_FOUND, f"no request {request_id!r} on this worker")


def _end_response(request_id: str, end: StreamEnd) -> worker_pb2.GenerateResponse:
    return worker_pb2.GenerateResponse(
        request_id=request_id,
        finish_reason=convert.FINISH_TO_PROTO[end.reason],
        context_len=end.context_len,
        migrated_to=end.migrated_to,
    )


def coalesce(item: StreamItem, queue: asyncio.Queue[StreamItem]) -> StreamItem:
    """Merges the token chunks already queued behind `item` into one, so a reader that falls
    behind gets fewer, larger messages instead of one per engine step."""
    if isinstance(item, StreamEnd):
        return item
    tokens = list(item.new_token_ids)
    last = item
    while not queue.empty() and last.finish_reason is None:
        nxt = queue.get_nowait()
        if isinstance(nxt, StreamEnd):
            # Leave the end for the next read; it must come after these tokens.
            queue.put_nowait(nxt)  # re-queued at the back: nothing else can follow an end
            break
        tokens.extend(nxt.new_token_ids)
        last = nxt
    return replace(last, new_token_ids=tuple(tokens), first_index=item.first_index)


DRAINED = "worker drained; send the request elsewhere"

T = TypeVar("T")


async def until_set(items: AsyncIterator[T], event: asyncio.Event) -> AsyncIterator[T]:
    """`items` until they end or `event` is set; a read under way then is cancelled (an item
    read by then is still handed over)."""
    it = aiter(items)
    stop = asyncio.ensure_future(event.wait())
    read: asyncio.Future[T] | None = None
    try:
        while not event.is_set():
            read = asyncio.ensure_future(anext(it))
            await asyncio.wait((read, stop), return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                return
            try:
                item = read.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        stop.cancel()
        if read is not None:  # also when the caller is cancelled
            # A read may end by itself in the instant the call is cancelled (the caller's link
            # broke: grpc ends the request iterator, StopAsyncIteration, and cancels the
            # handler): done, never looked at, asyncio logged "Task exception was never
            # retrieved" at error level on every worker at each scheduler crash or cut link.
            read.cancel()
            read.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a cancelled read's outcome seen (it may end with the call's error instead)."""
    if not future.cancelled():
        future.exception()


def _placed_by(context: Context) -> str:
    """The scheduler a placement names (`PLACED_BY_KEY` metadata); empty for none."""
    for key, value in context.invocation_metadata() or ():
        if key == PLACED_BY_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


HELD_LOG_INTERVAL_S = 60.0
"""How often a scheduler refused for another's hold is logged (it tries again every second)."""


class _Draining(Exception):
    """An import completed after the worker began to drain."""


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, state: WorkerState) -> None:
        self.state = state
        self._said_held = LogThrottle(HELD_LOG_INTERVAL_S)

    async def _stream(
        self, request_id: str, queue: asyncio.Queue[StreamItem]
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """Yields a request's output until it finishes; aborts it if the reader goes away."""
        done = False
        try:
            while not done:
                item = coalesce(await queue.get(), queue)
                if isinstance(item, StreamEnd):
                    done = True
                    yield _end_response(request_id, item)
                else:
                    done = item.finish_reason is not None
                    yield convert.progress_to_response(item)
        finally:
            if not done:
                await self._abort_quietly(request_id)

    async def _abort_quietly(self, request_id: str) -> None:
        if request_id not in self.state.hub.requests:
            return
        with contextlib.suppress(EngineError):
            await self.state.loop.call(lambda e: e.abort(request_id))
        self.state.hub.end(request_id, FinishReason.ABORT)
        log.info("aborted_on_disconnect", request_id=request_id)
        with contextlib.suppress(EngineError, EngineDead):
            await self._load_now()

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        if self.state.is_draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "worker is draining; send the request elsewhere"
            )
        rid = request.request_id
        if request.detach and not self.state.claim.accepts_placement(_placed_by(context)):
            await context.abort(grpc.StatusCode.UNAVAILABLE, NOT_THE_HOLDER)
        try:
            check_request_id(rid)
            if rid in self.state.hub.requests:
                raise EngineError(ErrorCode.ALREADY_EXISTS, f"request id {rid!r} is in use")
            req = convert.request_from_generate(request, self.state.loop.engine.max_model_len)
            self.state.hub.track(rid, req.context_len, len(req.output_token_ids))
            # Subscribe before the engine sees it: a short request can finish, and leave the
            # hub, before this coroutine runs again.
            # A detached request is followed on the step feed only: no per-request queue.
            queue = None if request.detach else self.state.hub.subscribe(rid)
            try:
                await self.state.loop.call(lambda e: e.add_request(req))
            except BaseException:
                self.state.hub.requests.pop(rid, None)
                raise
        except Exception as e:
            await fail(context, e, request_id=rid)
        log.info(
            "request_started",
            request_id=rid,
            prompt_len=len(request.prompt_token_ids),
            detached=request.detach,
        )
        if queue is None:
            yield worker_pb2.GenerateResponse(request_id=rid, context_len=req.context_len)
            return
        async for response in self._stream(rid, queue):
            yield response

    async def StartDetached(
        self, request_iterator: AsyncIterator[worker_pb2.StartBatch], context: Context
    ) -> AsyncIterator[worker_pb2.StartResults]:
        """Answers each batch of starts until the caller ends the stream or the drain is over;
        then UNAVAILABLE, as for a start refused while draining (the scheduler re-places what
        was in flight). A scheduler keeps this stream open for its next placement: the server's
        stop waited its whole grace (5 s) for it after every drain."""
        placed_by = _placed_by(context)
        async for batch in until_set(request_iterator, self.state.hub.closed):
            yield await start_batch(self.state, batch.requests, placed_by)
        if self.state.hub.closed.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINED)

    async def Attach(
        self, request: worker_pb2.AttachRequest, context: Context
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        if request.request_id not in self.state.hub.requests:
            await _abort_unknown(context, request.request_id)
        async for response in self._stream(
            request.request_id, self.state.hub.subscribe(request.request_id)
        ):
            yield response

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: Context
    ) -> worker_pb2.AbortResponse:
        rid = request.request_id
        if rid not in self.state.hub.requests:
            await _abort_unknown(context, rid)
        try:
            await self.state.loop.call(lambda e: e.abort(rid))
        except Exception as e:
            await fail(context, e, request_id=rid)
        # Whoever asked (the scheduler that placed it, a migration's source dropping the copy
        # it sent here, an operator), the feeds say it ended: a scheduler still streaming it
        # to a client would otherwise wait for tokens that never come.
        self.state.hub.end(rid, FinishReason.ABORT, tell_feeds=True)
        with contextlib.suppress(EngineError, EngineDead):
            await self._load_now()
        return worker_pb2.AbortResponse()

    async def _load_now(self) -> tuple[int, int, int, int]:
        """(running, waiting, KV blocks used, free) as they are now, also set on the load
        gauges: the last step report goes stale once the engine idles (an abort leaves no step
        to report it), and the hub knows what is here now."""

        def counts(e: Engine) -> tuple[int, int]:
            return e.num_free_blocks(), e.num_blocks_total

        free, total = await self.state.loop.call(counts)
        last = self.state.hub.last_report
        present = len(self.state.hub.requests)
        running = min(last.num_running if last else 0, present)
        self.state.metrics.observe_load(running, present - running, total - free, free)
        return running, present - running, total - free, free

    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: Context
    ) -> worker_pb2.LoadReport:
        running, waiting, used, free = await self._load_now()
        last = self.state.hub.last_report
        return worker_pb2.LoadReport(
            worker_id=self.state.worker_id,
            num_running=running,
            num_waiting=waiting,
            kv_blocks_used=used,
            kv_blocks_free=free,
            kv_block_size=self.state.loop.engine.layout.block_size,
            sum_context_tokens=self.state.hub.sum_context(),
            mean_step_time_s=last.step_time_s if last else 0.0,
            is_draining=self.state.is_draining,
        )

    async def StreamSteps(
        self, request: worker_pb2.StreamStepsRequest, context: Context
    ) -> AsyncIterator[worker_pb2.StepUpdate]:
        hub, claim, scheduler_id = self.state.hub, self.state.claim, request.scheduler_id
        rank = SchedulerRank(
            scheduler_id, request.scheduler_started_at_s, request.scheduler_is_serving
        )
        try:
            taken_over = claim.take(rank, context.peer())
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except HeldByAnotherScheduler as e:
            if self._said_held.should_log(scheduler_id, time.monotonic()):
                log.warning(
                    "feed_refused_another_scheduler", scheduler_id=scheduler_id, error=str(e)
                )
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        try:
            updates = self._steps(hub)
            async for update in updates if taken_over is None else until_set(updates, taken_over):
                yield update
        finally:
            claim.release(taken_over)
        if taken_over is not None and taken_over.is_set():
            holder = claim.holder.scheduler_id if claim.holder else "another scheduler"
            log.warning("feed_taken_over", scheduler_id=scheduler_id, by=holder)
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"scheduler {holder!r} took this worker over (it serves clients and this "
                "scheduler does not yet, or neither does and it started first): a worker serves "
                "one scheduler",
            )

    async def _steps(self, hub: Hub) -> AsyncIterator[worker_pb2.StepUpdate]:
        """A snapshot of what runs here, then one update per step (or change of state)."""
        yield worker_pb2.StepUpdate(
            worker_id=self.state.worker_id,
            step_index=hub.last_report.step_index if hub.last_report else 0,
            requests=[
                worker_pb2.RequestStep(
                    request_id=rid, context_len=t.context_len, is_detached=t.is_detached
                )
                for rid, t in hub.requests.items()
            ],
            is_draining=self.state.is_draining,
        )
        async for report in hub.steps():
            if report is None:  # a change of state, no step
                update = worker_pb2.StepUpdate(worker_id=self.state.worker_id)
            else:
                update = convert.step_to_proto(self.state.worker_id, report)
            update.is_draining = self.state.is_draining
            yield update

    async def GetInfo(
        self, request: worker_pb2.GetInfoRequest, context: Context
    ) -> worker_pb2.WorkerInfo:
        engine = self.state.loop.engine
        return worker_pb2.WorkerInfo(
            worker_id=self.state.worker_id,
            engine=engine.name,
            model=engine.layout.model,
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
            layout=convert.layout_to_proto(engine.layout),
            kv_blocks_total=engine.num_blocks_total,
            kv_peer=convert.kv_peer_to_proto(kv_peer_of(engine)),
        )

    async def ExportKV(
        self, request: worker_pb2.ExportKVRequest, context: Context
    ) -> AsyncIterator[worker_pb2.KVChunk]:
        rid = request.request_id
        if rid not in self.state.hub.requests:
            await _abort_unknown(context, rid)
        try:
            snapshot = await self.state.loop.call(lambda e: e.export_kv(rid))
        except Exception as e:
            await fail(context, e, request_id=rid)
        delivered = False
        try:
            for chunk in kv_stream.snapshot_chunks(snapshot):
                yield chunk
            delivered = True
        finally:
            if delivered:
                self.state.hub.end(
                    rid, FinishReason.MIGRATED, migrated_to=context.peer(), tell_feeds=True
                )
            else:  # the reader went away: the request must not be lost
                await self.state.loop.call(lambda e: e.import_kv(snapshot))

    async def ImportKV(
        self, request_iterator: AsyncIterator[worker_pb2.KVChunk], context: Context
    ) -> worker_pb2.ImportKVResponse:
        if self.state.is_draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
        engine = self.state.loop.engine
        max_blocks = -(-engine.max_model_len // engine.layout.block_size)
        try:
            free = await self.state.loop.call(lambda e: e.num_free_blocks())
            with self.state.import_budget.stream(free, engine.layout.block_bytes) as reserve:
                snapshot = await kv_stream.read_snapshot(
                    request_iterator, engine.layout, max_blocks, reserve
                )
                await self._resume(snapshot)
        except Exception as e:
            self.state.metrics.migration_failures.labels(self.state.engine_name, "in").inc()
            # Once this call is gone, return what its blocks took (up to one request's KV).
            asyncio.get_running_loop().call_later(1.0, release_freed_memory)
            if isinstance(e, _Draining):
                await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
            await fail(context, e)
        num_bytes = sum(len(b) for b in snapshot.blocks)
        self.state.metrics.migrations.labels(
            self.state.engine_name, "in", "kv" if snapshot.num_cached_tokens else "recompute"
        ).inc()
        self.state.metrics.migration_bytes.labels(self.state.engine_name, "in").inc(num_bytes)
        rid = snapshot.request.request_id
        log.info("imported", request_id=rid, blocks=len(snapshot.blocks), bytes=num_bytes)
        return worker_pb2.ImportKVResponse(
            request_id=rid, num_blocks=len(snapshot.blocks), num_bytes=num_bytes
        )

    async def _resume(self, snapshot: KVSnapshot) -> None:
        req = snapshot.request
        if self.state.is_draining:
            # Checked again once the stream is in: an import that began before SIGTERM and
            # ends after the drain looked for requests would run in a process about to exit.
            raise _Draining()
        if req.request_id in self.state.hub.requests:
            raise EngineError(ErrorCode.ALREADY_EXISTS, f"request id {req.request_id!r} is in use")
        if snapshot.transfer_id is not None and kv_peer_of(self.state.loop.engine) is None:
            raise EngineError(
                ErrorCode.FAILED_PRECONDITION, "this worker's engine takes no KV rank to rank"
            )
        self.state.hub.track(req.request_id, req.context_len, len(req.output_token_ids))
        try:
            if snapshot.num_cached_tokens == 0:
                await self.state.loop.call(lambda e: e.add_request(req))
            else:
                await self.state.loop.call(lambda e: e.import_kv(snapshot))
        except BaseException:
            self.state.hub.requests.pop(req.request_id, None)
            raise

    async def MigrateOut(
        self, request: worker_pb2.MigrateOutRequest, context: Context
    ) -> worker_pb2.MigrateOutResponse:
        recompute = request.mode == worker_pb2.MIGRATION_MODE_RECOMPUTE
        try:
            result = await migrate_out(
                self.state, request.request_id, request.target_address, recompute
            )
        except MigrationFailed as e:
            await context.abort(e.code, e.message)
        except Exception as e:
            await fail(context, e, request_id=request.request_id)
        return worker_pb2.MigrateOutResponse(
            request_id=request.request_id,
            context_len=result.context_len,
            num_bytes=result.num_bytes,
            pause_s=result.pause_s,
            total_s=result.total_s,
        )
