"""Runs one generation for the HTTP front through the coordinator: submit, read the spliced
deliveries as text pieces, and abort on the worker whatever way the client leaves early (a
stop string, a dropped connection, a cancelled handler)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from starlette.types import Receive

from cascadeinfer.domain import EngineError, FinishReason
from cascadeinfer.scheduler.coordinator import SHUTTING_DOWN, Coordinator, SchedulingError
from cascadeinfer.scheduler.openai.errors import (
    CLIENT_CLOSED_REQUEST,
    APIError,
    from_grpc,
    invalid,
)
from cascadeinfer.scheduler.openai.params import Job
from cascadeinfer.scheduler.openai.schema import FinishReasonName
from cascadeinfer.scheduler.openai.textstream import TextStream
from cascadeinfer.scheduler.requests import ClientRequest

log = structlog.get_logger(__name__)

FINISH_NAMES: dict[FinishReason, FinishReasonName] = {
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
}
T = TypeVar("T")


@dataclass(frozen=True)
class Step:
    """Text for the client; `finish` ("stop" or "length") on the last one."""

    text: str
    num_tokens: int
    """Output tokens so far (those behind a stop string included, as vLLM counts them)."""
    finish: FinishReasonName | None = None


class Runner:
    """The front's view of the coordinator: one instance per HTTP server."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    async def submit(self, request_id: str, job: Job, owner: str = "") -> ClientRequest:
        """Admits or queues the request for `owner` (`security.credential_owner`); raises
        APIError with the status for a refusal."""
        c = self.c
        try:
            job.sampling.validate()
            rec = c.new_request(
                request_id, job.prompt, job.sampling, job.priority, job.session_id, owner
            )
            await c.submit(rec)
        except EngineError as e:
            c.metrics.refused.labels("INVALID_ARGUMENT").inc()
            raise invalid(e.message) from None
        except SchedulingError as e:
            c.metrics.refused.labels(e.code.name).inc()
            raise from_grpc(e.code, e.message) from None
        log.debug("request_accepted", request_id=request_id, prompt_len=len(job.prompt), api="http")
        return rec

    async def steps(self, rec: ClientRequest, job: Job) -> AsyncIterator[Step]:
        """The request's text as it is produced. Leaving before the last step (or a stop
        string) aborts the request on its worker."""
        assert self.c.tokenizer is not None
        stream = TextStream(self.c.tokenizer, job.stop)
        try:
            while True:
                d = await rec.next_delivery()
                self.c.metrics.tokens.inc(len(d.token_ids))
                piece = stream.feed(d.token_ids, is_last=d.finish is not None)
                if piece.is_stopped:
                    yield Step(piece.text, len(stream.token_ids), "stop")
                    return
                if d.finish is not None:
                    if rec.is_cut_off:
                        raise APIError(503, f"{SHUTTING_DOWN}; the request was ended")
                    if rec.is_overflowed:
                        raise APIError(
                            429,
                            "the client fell more than "
                            f"{self.c.config.max_stream_lag_tokens} tokens behind its stream "
                            "(max_stream_lag_tokens); the request was ended",
                        )
                    if rec.is_aborted_by_client:
                        # Not the 503 below: clients retry a 503 (the openai SDK by default),
                        # and ran the request they had just aborted again, to its end.
                        raise APIError(
                            CLIENT_CLOSED_REQUEST, "the request was ended by its client's Abort"
                        )
                    if d.finish not in FINISH_NAMES:
                        raise APIError(
                            503, "the scheduler ended this request: no worker could finish it"
                        )
                    yield Step(piece.text, len(stream.token_ids), FINISH_NAMES[d.finish])
                    return
                if piece.text:
                    yield Step(piece.text, len(stream.token_ids))
        finally:
            if not rec.is_done:
                self.abort_later(rec)

    def abort_later(self, rec: ClientRequest) -> None:
        """Ends the request now; the coordinator tells its worker in a task of its own (the
        caller may be inside a cancelled scope, where an await would not run)."""
        log.info("client_left", request_id=rec.request_id, tokens_sent=len(rec.tokens))
        self.c.abandon(rec.request_id)


async def until_disconnect(receive: Receive) -> None:
    """Returns when the client closes the connection (the body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work: Awaitable[T], receive: Receive) -> T | None:
    """`work`'s result, or None when the client left first (`work` is then cancelled, which
    aborts its request)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    await asyncio.wait({task})
    if task.cancelled():
        return None
    return task.result()
