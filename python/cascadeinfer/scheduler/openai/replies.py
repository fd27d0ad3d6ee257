"""The answer shapes of the HTTP front: one JSON object with `usage`, or Server-Sent Events
(a chunk per text piece, an optional usage chunk, then `data: [DONE]`), built from a
generation's steps."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import structlog
from pydantic import BaseModel
from starlette.responses import StreamingResponse

from cascadeinfer.scheduler.openai.errors import APIError
from cascadeinfer.scheduler.openai.generation import Step
from cascadeinfer.scheduler.openai.schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    Delta,
    FinishReasonName,
    Usage,
)

log = structlog.get_logger(__name__)


class Reply:
    """The answer objects of one request, whole or as stream chunks."""

    def __init__(self, request_id: str, model: str, num_prompt_tokens: int) -> None:
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.num_prompt_tokens = num_prompt_tokens

    def usage(self, num_tokens: int) -> Usage:
        n = self.num_prompt_tokens
        return Usage(prompt_tokens=n, completion_tokens=num_tokens, total_tokens=n + num_tokens)

    def completion(self, text: str, finish: FinishReasonName | None, num_tokens: int) -> Completion:
        choice = CompletionChoice(text=text, finish_reason=finish)
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=self.usage(num_tokens),
        )

    def chat(self, text: str, finish: FinishReasonName | None, num_tokens: int) -> ChatCompletion:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish)
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=self.usage(num_tokens),
        )

    async def completion_events(
        self, steps: AsyncIterator[Step], include_usage: bool
    ) -> AsyncIterator[str]:
        num_tokens = 0
        async for step in steps:
            num_tokens = step.num_tokens
            choice = CompletionChoice(text=step.text, finish_reason=step.finish)
            chunk = Completion(id=self.id, created=self.created, model=self.model, choices=[choice])
            yield _event(chunk)
        if include_usage:
            yield _event(
                Completion(
                    id=self.id,
                    created=self.created,
                    model=self.model,
                    choices=[],
                    usage=self.usage(num_tokens),
                )
            )

    async def chat_events(
        self, steps: AsyncIterator[Step], include_usage: bool
    ) -> AsyncIterator[str]:
        def chunk(delta: Delta, finish: FinishReasonName | None = None) -> str:
            choice = ChatChunkChoice(delta=delta, finish_reason=finish)
            return _event(
                ChatCompletionChunk(
                    id=self.id, created=self.created, model=self.model, choices=[choice]
                )
            )

        num_tokens = 0
        is_first = True
        async for step in steps:
            if is_first:
                is_first = False
                # The role goes out with the first output, as vLLM sends it, so a client's
                # time to first token measures a token, not the admission.
                yield chunk(Delta(role="assistant", content=""))
            num_tokens = step.num_tokens
            if step.text:
                yield chunk(Delta(content=step.text))
            if step.finish is not None:
                yield chunk(Delta(), step.finish)
        if include_usage:
            yield _event(
                ChatCompletionChunk(
                    id=self.id,
                    created=self.created,
                    model=self.model,
                    choices=[],
                    usage=self.usage(num_tokens),
                )
            )


async def gather(steps: AsyncIterator[Step]) -> tuple[str, FinishReasonName | None, int]:
    parts: list[str] = []
    finish = None
    num_tokens = 0
    async for step in steps:
        parts.append(step.text)
        finish, num_tokens = step.finish, step.num_tokens
    return "".join(parts), finish, num_tokens


def _event(obj: BaseModel) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


async def _with_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Ends every stream with [DONE]; an error after the 200 went out is sent as an event."""
    try:
        async for e in events:
            yield e
    except APIError as e:
        yield f"data: {e.body().model_dump_json()}\n\n"
    except Exception:
        log.exception("http_stream_error")
        yield f"data: {APIError(500, 'internal error').body().model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


def sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        _with_errors(events),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
