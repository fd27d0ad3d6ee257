"""SchedulerService and WorkerRegistry handlers: validate, hand to the coordinator, stream."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import NoReturn

import grpc
import structlog

from cascadeinfer.domain import MAX_WORKER_ID_CHARS, EngineError, worker_id_problem
from cascadeinfer.log_throttle import LogThrottle
from cascadeinfer.proto.v1 import (
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
)
from cascadeinfer.scheduler.coordinator import SHUTTING_DOWN, Coordinator, SchedulingError
from cascadeinfer.scheduler.metrics import REFUSAL_REASONS
from cascadeinfer.scheduler.requests import ClientRequest, Delivery
from cascadeinfer.scheduler.text import Detokenizer
from cascadeinfer.scheduler.worker_client import WorkerCallError
from cascadeinfer.scheduler.workers import (
    WorkerIdInUse,
    WorkerIdMismatch,
    WorkerLeaving,
    WorkerLink,
    WorkerNotDraining,
    WorkerServesAnotherModel,
    WorkerServesAnotherScheduler,
    WorkerTooShort,
    WorkerUnreachable,
)
from cascadeinfer.security import credential_owner
from cascadeinfer.wire import FINISH_TO_PROTO, sampling_from_proto

log = structlog.get_logger(__name__)
Context = grpc.aio.ServicerContext[object, object]
HEARTBEAT_S = 2.0


def _owner(context: Context) -> str:
    """The caller's credential as an owner (`security.credential_owner`)."""
    metadata = dict(context.invocation_metadata() or ())
    return credential_owner(str(metadata.get("authorization", "")))


def _timings(rec: ClientRequest) -> scheduler_pb2.RequestTimings:
    end = rec.finished_at or rec.arrived_at
    first = rec.first_token_at or end
    decoded = max(len(rec.tokens) - 1, 1)
    return scheduler_pb2.RequestTimings(
        queue_s=(rec.admitted_at or end) - rec.arrived_at,
        ttft_s=first - rec.arrived_at,
        tpot_s=(end - first) / decoded,
        total_s=end - rec.arrived_at,
        num_migrations=rec.num_migrations,
    )


def _response(rec: ClientRequest, d: Delivery) -> scheduler_pb2.ClientGenerateResponse:
    r = scheduler_pb2.ClientGenerateResponse(
        request_id=rec.client_id,
        tokens=common_pb2.TokenChunk(token_ids=d.token_ids, first_index=d.first_index),
    )
    if rec.detokenizer is not None:
        upto = d.first_index + len(d.token_ids)
        # The delivery was just taken, so it usually ends where the tokens do: no copy.
        sent = rec.tokens if upto == len(rec.tokens) else rec.tokens[:upto]
        r.text = rec.detokenizer.delta(sent, is_last=d.finish is not None)
    if d.finish is not None:
        r.finish_reason = FINISH_TO_PROTO[d.finish]
        r.timings.CopyFrom(_timings(rec))
    return r


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    async def Generate(  # type: ignore[override]  # the stubs know only the iterator form
        self, request: scheduler_pb2.ClientGenerateRequest, context: Context
    ) -> None:
        """Streams with `context.write`, not `yield`, so that a write the client holds up can
        be given up (`note_ended_by_scheduler`): gRPC's aio API takes either form."""
        rec = await self._admit(request, context)
        front = asyncio.current_task()
        assert front is not None  # a handler runs as a task
        done = False
        try:
            while not done:
                delivery = await rec.next_delivery()
                done = delivery.finish is not None
                if done and rec.is_ended_by_scheduler:
                    await self._abort_ended(rec, context)
                self.c.metrics.tokens.inc(len(delivery.token_ids))
                rec.writing_front = front
                try:
                    await context.write(_response(rec, delivery))
                except asyncio.CancelledError:
                    # The scheduler ended the request while this write waited on a client that
                    # stopped reading (`note_ended_by_scheduler`): end the stream with why.
                    # Otherwise the client left and gRPC cancelled this handler.
                    if not rec.is_ended_by_scheduler or context.cancelled():
                        raise
                    front.uncancel()
                    done = True
                    await self._abort_ended(rec, context)
                except Exception as e:
                    # The client left during a write that waited on it: gRPC fails the write
                    # (ExecuteBatchError) without cancelling the handler. Raised on, or
                    # returned from, that is logged at error level with a traceback, as a
                    # failure of this handler; a cancelled handler ends quietly, as when the
                    # client leaves between writes. The finally below aborts the request.
                    raise asyncio.CancelledError from e
                finally:
                    rec.writing_front = None
        finally:
            if not done:
                log.info(
                    "client_disconnected",
                    request_id=rec.request_id,
                    worker_id=rec.worker_id,
                    tokens_sent=len(rec.tokens),
                    tokens_pending=sorted(rec.pending)[:3],
                    migrations=rec.num_migrations,
                )
                self.c.abandon(rec.request_id)

    async def _abort_ended(self, rec: ClientRequest, context: Context) -> NoReturn:
        """Ends the stream of a request the scheduler ended, with the status that says why."""
        if rec.is_cut_off:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"{SHUTTING_DOWN}; the request was ended"
            )
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the client fell more than {self.c.config.max_stream_lag_tokens} "
            "tokens behind its stream (max_stream_lag_tokens); the request was ended",
        )

    async def _admit(
        self, request: scheduler_pb2.ClientGenerateRequest, context: Context
    ) -> ClientRequest:
        try:
            prompt = await self._prompt(request)
            sampling = sampling_from_proto(request.sampling)
            sampling.validate()
            rid = request.request_id or uuid.uuid4().hex
            rec = self.c.new_request(
                rid,
                prompt,
                sampling,
                request.priority,
                request.session_id or None,
                owner=_owner(context),
            )
            if request.HasField("text"):
                assert self.c.tokenizer is not None
                rec.detokenizer = Detokenizer(self.c.tokenizer)
            await self.c.submit(rec)
        except EngineError as e:
            self.c.metrics.refused.labels(grpc.StatusCode.INVALID_ARGUMENT.name).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        except SchedulingError as e:
            self.c.metrics.refused.labels(e.code.name).inc()
            await context.abort(e.code, e.message)
        log.debug("request_accepted", request_id=rid, prompt_len=len(prompt))
        return rec

    async def _prompt(self, request: scheduler_pb2.ClientGenerateRequest) -> tuple[int, ...]:
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise SchedulingError(
                grpc.StatusCode.INVALID_ARGUMENT, "give the prompt as prompt_token_ids or text"
            )
        if kind == "text":
            return await self.c.encode_text(request.text)
        ids = request.prompt_token_ids.ids
        if not ids:
            raise SchedulingError(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
        self.c.check_fits(len(ids), max(request.sampling.max_tokens, 1))  # before tuple()
        return tuple(ids)

    async def Abort(
        self, request: scheduler_pb2.ClientAbortRequest, context: Context
    ) -> scheduler_pb2.ClientAbortResponse:
        try:
            await self.c.abort(request.request_id, owner=_owner(context))
        except SchedulingError as e:
            await context.abort(e.code, e.message)
        return scheduler_pb2.ClientAbortResponse()

    async def GetClusterState(
        self, request: scheduler_pb2.GetClusterStateRequest, context: Context
    ) -> scheduler_pb2.ClusterState:
        c = self.c
        stages = c.policy.stages() if c.policy is not None else []
        stage_of = {inst: k for k, (_, _, insts) in enumerate(stages) for inst in insts}
        state = scheduler_pb2.ClusterState(
            policy=c.serving_policy,
            plan_changed_at=c.counters.plan_changed_at,
            num_plan_changes=c.counters.num_plan_changes,
            queue_depth=c.queue_depth,
            num_migrations=c.counters.num_migrations,
        )
        for lo, hi, insts in stages:
            ids = [c.pool.by_instance[i].worker_id for i in insts]
            state.stages.append(scheduler_pb2.StageState(min_len=lo, max_len=hi, worker_ids=ids))
        links = list(c.pool.by_id.values())
        loads = await asyncio.gather(*(_live_load(w) for w in links))
        for w, load in zip(links, loads, strict=True):
            # An idle worker sends no step feed, so its last step report goes stale; ask it.
            # A worker that is not healthy shows nothing running: what it ran when its feed
            # broke was resumed elsewhere or ended, and counting it twice overstated the load
            # (the sixteenth probe: a killed worker showed 18 running for as long as it was gone).
            now = load or (w.last_step if w.is_healthy else None)
            state.workers.append(
                scheduler_pb2.WorkerState(
                    worker_id=w.worker_id,
                    address=w.address,
                    stage=stage_of.get(w.instance, -1) if w.is_healthy else -1,
                    is_healthy=w.is_healthy,
                    num_running=now.num_running if now else 0,
                    num_waiting=now.num_waiting if now else 0,
                    kv_blocks_used=now.kv_blocks_used if now else 0,
                    kv_blocks_free=now.kv_blocks_free if now else 0,
                    engine=w.info.engine,
                )
            )
        return state


MAX_REGISTRATION_FIELD = MAX_WORKER_ID_CHARS
"""Longest worker id or address a registration may give (both are logged and listed)."""
MAX_LOGGED_FIELD = 64
"""Characters of a caller's worker id or address put into a refusal's log line (of its error
message, four times as many): never a caller's string unbounded."""
REFUSAL_LOG_INTERVAL_S = 60.0
"""A refusal of the same call for the same reason, worker id and address is logged once in this
long (a refused worker tries again every second); every refusal is counted."""


def _clip(value: str, limit: int = MAX_LOGGED_FIELD) -> str:
    """A caller's string cut to `limit` characters for a log line."""
    return value if len(value) <= limit else value[:limit] + "..."


class RegistryServicer(registry_pb2_grpc.WorkerRegistryServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self._refusals_logged = LogThrottle(REFUSAL_LOG_INTERVAL_S)
        """By (call, reason, worker id, address)."""

    async def _refuse(
        self,
        context: Context,
        rpc: str,
        reason: str,
        code: grpc.StatusCode,
        message: str,
        worker_id: str,
        address: str = "",
        *,
        is_said: bool = False,
    ) -> NoReturn:
        """Counts (`registrations_refused`, by `reason`, one of REFUSAL_REASONS), logs (cut
        short, once per REFUSAL_LOG_INTERVAL_S for the same caller's refusal) and refuses a
        registry call. Failed registrations used to leave no trace on the scheduler.
        `is_said`: a line of its own said it already (`worker_id_in_use`), and this one is not
        written: an id in use was logged twice, as an error and as this warning."""
        assert reason in REFUSAL_REASONS, reason
        self.c.metrics.registrations_refused.labels(rpc, reason).inc()
        key = (rpc, reason, _clip(worker_id), _clip(address))
        if not is_said and self._refusals_logged.should_log(key, time.monotonic()):
            log.warning(
                "worker_registration_refused",
                rpc=rpc,
                reason=reason,
                code=code.name,
                worker_id=key[2],
                address=key[3],
                peer=_clip(context.peer() or ""),
                error=_clip(message, 4 * MAX_LOGGED_FIELD),
            )
        await context.abort(code, message)

    async def RegisterWorker(
        self, request: registry_pb2.RegisterWorkerRequest, context: Context
    ) -> registry_pb2.RegisterWorkerResponse:
        worker_id, address = request.worker_id, request.address

        async def refuse(
            reason: str, code: grpc.StatusCode, message: str, *, is_said: bool = False
        ) -> NoReturn:
            await self._refuse(
                context, "register", reason, code, message, worker_id, address, is_said=is_said
            )

        if not worker_id or not address:
            await refuse(
                "invalid_argument",
                grpc.StatusCode.INVALID_ARGUMENT,
                "worker_id and address are required",
            )
        # Neither is echoed: a long value in the error overflowed gRPC's metadata limit.
        if (problem := worker_id_problem(worker_id)) is not None:
            await refuse("invalid_argument", grpc.StatusCode.INVALID_ARGUMENT, problem)
        if len(address) > MAX_REGISTRATION_FIELD:
            await refuse(
                "invalid_argument",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"address is longer than {MAX_REGISTRATION_FIELD} characters",
            )
        try:
            await self.c.add_worker(address, worker_id)
        except WorkerCallError as e:
            await refuse(
                "unreachable", grpc.StatusCode.UNAVAILABLE, f"cannot reach {address}: {e.details}"
            )
        except WorkerIdInUse as e:
            self.c.say_id_in_use(address, str(e))
            await refuse("id_in_use", grpc.StatusCode.ALREADY_EXISTS, str(e), is_said=True)
        except WorkerIdMismatch as e:
            await refuse("id_mismatch", grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except WorkerTooShort as e:
            await refuse("too_short", grpc.StatusCode.FAILED_PRECONDITION, str(e), is_said=True)
        except WorkerServesAnotherModel as e:
            await refuse("another_model", grpc.StatusCode.FAILED_PRECONDITION, str(e), is_said=True)
        except WorkerServesAnotherScheduler as e:
            await refuse(
                "another_scheduler", grpc.StatusCode.FAILED_PRECONDITION, str(e), is_said=True
            )
        except WorkerLeaving as e:
            await refuse("leaving", grpc.StatusCode.UNAVAILABLE, str(e))
        except WorkerUnreachable as e:
            await refuse("unreachable", grpc.StatusCode.UNAVAILABLE, str(e))
        return registry_pb2.RegisterWorkerResponse(heartbeat_interval_s=HEARTBEAT_S)

    async def DeregisterWorker(
        self, request: registry_pb2.DeregisterWorkerRequest, context: Context
    ) -> registry_pb2.DeregisterWorkerResponse:
        """Honoured once the worker confirms it: see `Coordinator.deregister`."""
        worker_id = request.worker_id

        async def refuse(reason: str, code: grpc.StatusCode, message: str) -> NoReturn:
            await self._refuse(context, "deregister", reason, code, message, worker_id)

        if len(worker_id) > MAX_REGISTRATION_FIELD:
            await refuse(
                "invalid_argument",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"worker_id is longer than {MAX_REGISTRATION_FIELD} characters",
            )
        link = self.c.pool.by_id.get(worker_id)
        if link is None:
            await refuse("unknown_worker", grpc.StatusCode.NOT_FOUND, f"no worker {worker_id!r}")
        try:
            await self.c.deregister(link)
        except WorkerNotDraining as e:
            await refuse("not_draining", grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return registry_pb2.DeregisterWorkerResponse()


LIVE_LOAD_TIMEOUT_S = 0.5
"""How long GetClusterState waits for a worker's own load report before showing the counts of
its last step feed instead (a stopped or slow worker must not stall an operator's status)."""


async def _live_load(w: WorkerLink) -> worker_pb2.LoadReport | None:
    if not w.is_healthy:
        return None
    try:
        report = await w.client.load(LIVE_LOAD_TIMEOUT_S)
    except WorkerCallError:
        return None
    return report
