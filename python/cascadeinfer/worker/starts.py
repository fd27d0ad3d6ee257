"""Batched starts of detached requests (StartDetached): a scheduler's placements of one event-loop
turn arrive as one message, are checked here, enter the engine in one engine-thread call, and
are answered as one message with a result per request, in order.

Each request is admitted or refused exactly as a detached Generate would be (the same checks,
the same status codes), so a scheduler may use either.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import structlog

from cascadeinfer.domain import check_request_id
from cascadeinfer.proto.v1 import worker_pb2
from cascadeinfer.worker import convert
from cascadeinfer.worker.engine import Engine, EngineError, EngineRequest, ErrorCode
from cascadeinfer.worker.engine_loop import EngineDead
from cascadeinfer.worker.errors import ENGINE_DEAD, STATUS
from cascadeinfer.worker.state import WorkerState

log = structlog.get_logger(__name__)
OK = grpc.StatusCode.OK.value[0]


def _refused(request_id: str, code: grpc.StatusCode, message: str) -> worker_pb2.StartResult:
    return worker_pb2.StartResult(request_id=request_id, code=code.value[0], message=message)


def _error_result(request_id: str, error: Exception) -> worker_pb2.StartResult:
    """An EngineError with its own status; anything else INTERNAL, logged with its traceback
    (the scheduler gets a short message, never the exception text)."""
    if isinstance(error, EngineError):
        return _refused(request_id, STATUS[error.code], error.message)
    if isinstance(error, EngineDead):
        return _refused(request_id, grpc.StatusCode.UNAVAILABLE, ENGINE_DEAD)
    log.error("internal_error", exc_info=error, request_id=request_id)
    return _refused(request_id, grpc.StatusCode.INTERNAL, "internal error; see the worker's log")


def _add_all(engine: Engine, requests: list[EngineRequest]) -> list[Exception | None]:
    """On the engine thread: adds each request; one refusal does not stop the others."""
    outcomes: list[Exception | None] = []
    for r in requests:
        try:
            engine.add_request(r)
        except Exception as e:
            engine.check_health()  # a dead engine fails the whole call (EngineDead)
            outcomes.append(e)
        else:
            outcomes.append(None)
    return outcomes


NOT_THE_HOLDER = (
    "this worker serves another scheduler (its step feed is not this scheduler's): send the "
    "request elsewhere"
)


async def start_batch(
    state: WorkerState, batch: Sequence[worker_pb2.GenerateRequest], placed_by: str = ""
) -> worker_pb2.StartResults:
    """Starts `batch`, each request answered apart. A batch named by a scheduler that does not
    hold this worker (`placed_by`, `SchedulerClaim.accepts_placement`) is refused whole, UNAVAILABLE:
    a scheduler that lost the worker to another must not run requests nobody reads here."""
    results: list[worker_pb2.StartResult | None] = [None] * len(batch)
    accepted: list[tuple[int, EngineRequest]] = []
    hub = state.hub
    is_holder = state.claim.accepts_placement(placed_by)
    for i, m in enumerate(batch):
        rid = m.request_id
        if state.is_draining:
            results[i] = _refused(
                rid, grpc.StatusCode.UNAVAILABLE, "worker is draining; send the request elsewhere"
            )
            continue
        if not is_holder:
            results[i] = _refused(rid, grpc.StatusCode.UNAVAILABLE, NOT_THE_HOLDER)
            continue
        try:
            check_request_id(rid)
            if rid in hub.requests:
                raise EngineError(ErrorCode.ALREADY_EXISTS, f"request id {rid!r} is in use")
            req = convert.request_from_generate(m, state.loop.engine.max_model_len)
        except Exception as e:
            results[i] = _error_result(rid, e)
            continue
        hub.track(rid, req.context_len, len(req.output_token_ids))
        accepted.append((i, req))
    if accepted:
        requests = [req for _, req in accepted]
        try:
            outcomes = await state.loop.call(lambda e: _add_all(e, requests))
        except Exception as e:  # the engine loop itself failed: none of them is in
            outcomes = [e] * len(accepted)
        for (i, req), error in zip(accepted, outcomes, strict=True):
            if error is not None:
                hub.requests.pop(req.request_id, None)
                results[i] = _error_result(req.request_id, error)
                continue
            results[i] = worker_pb2.StartResult(
                request_id=req.request_id, code=OK, context_len=req.context_len
            )
            log.info(
                "request_started",
                request_id=req.request_id,
                prompt_len=len(req.prompt_token_ids),
                detached=True,
            )
    answered = [r for r in results if r is not None]
    assert len(answered) == len(batch)
    return worker_pb2.StartResults(results=answered)
