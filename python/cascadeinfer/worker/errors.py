"""Engine errors to gRPC status codes, in one place."""

from __future__ import annotations

from typing import NoReturn

import grpc
import structlog

from cascadeinfer.worker.engine import EngineError, ErrorCode
from cascadeinfer.worker.engine_loop import EngineDead

log = structlog.get_logger(__name__)

STATUS = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
}

ENGINE_DEAD = "the worker's engine died; send the request elsewhere"


async def fail(
    context: grpc.aio.ServicerContext[object, object], error: BaseException, **log_keys: object
) -> NoReturn:
    """Ends the RPC: an EngineError with its own status, a dead engine as UNAVAILABLE (the
    daemon is exiting), anything else as INTERNAL after logging the traceback (the client
    gets a short message, never the exception text)."""
    if isinstance(error, grpc.aio.AbortError):
        raise error  # the status is already set (a request stream that did not parse)
    if isinstance(error, EngineError):
        await context.abort(STATUS[error.code], error.message)
    if isinstance(error, EngineDead):
        await context.abort(grpc.StatusCode.UNAVAILABLE, ENGINE_DEAD)
    log.error("internal_error", exc_info=error, **log_keys)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the worker's log")
