"""The answer shapes of the HTTP front: one JSON object with `usage`, or Server-Sent Events
(a chunk per text piece, an optional usage chunk, then `data: [DONE]`), built from a
generation's steps.

Stream chunks are the hot path of the front (one per piece of text): each kind of chunk is
rendered once per request by its model with the text left as a slot (`ChunkTemplate`), so an
event costs a JSON string encoding, not a model built and serialized; the last piece, the usage
chunk and `[DONE]` go out in one write.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator

import structlog
from pydantic import BaseModel

from cascadeinfer.scheduler.openai.errors import APIError
from cascadeinfer.scheduler.openai.events import DONE, EventStream
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
SLOT = "@@text-slot@@"


class ChunkTemplate:
    """One kind of stream chunk as its model renders it, with the text as a slot. The text is
    the last field the client chooses a value of: what follows it is fixed by the schema, so
    the slot is found from the end (an id or model name that contains SLOT cannot move it)."""

    def __init__(self, rendered: str) -> None:
        head, found, tail = rendered.rpartition(json.dumps(SLOT))
        if not found:
            raise ValueError("the chunk has no text slot")
        self._head = "data: " + head
        self._tail = tail + "\n\n"

    def event(self, text: str) -> str:
        return self._head + _sse_json(text) + self._tail


UNICODE_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
"""Characters JSON may carry raw that many line readers end a line at: SSE ends lines at CR and
LF only, but Python's `splitlines` and httpx's `iter_lines` (hand-written clients, scripts) also
split at these, cutting an event's JSON in two. Escaped, they decode to the same text; one
random-weight completion in about 300 had a U+0085 (a byte tokenizer's text)."""


def _sse_json(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).translate(UNICODE_LINE_BREAKS)


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
        templates: dict[FinishReasonName | None, ChunkTemplate] = {}

        def chunk(text: str, finish: FinishReasonName | None) -> str:
            template = templates.get(finish)
            if template is None:
                choice = CompletionChoice(text=SLOT, finish_reason=finish)
                model = Completion(
                    id=self.id, created=self.created, model=self.model, choices=[choice]
                )
                template = templates[finish] = ChunkTemplate(model.model_dump_json())
            return template.event(text)

        num_tokens = 0
        async for step in steps:
            num_tokens = step.num_tokens
            if step.finish is None:
                yield chunk(step.text, None)
                continue
            yield chunk(step.text, step.finish) + self._usage_event(num_tokens, include_usage)
            return
        yield self._usage_event(num_tokens, include_usage)

    def _usage_event(self, num_tokens: int, include_usage: bool, *, is_chat: bool = False) -> str:
        """The usage chunk (when asked for) and `[DONE]`: the end of a stream."""
        if not include_usage:
            return DONE
        usage = self.usage(num_tokens)
        last: BaseModel
        if is_chat:
            last = ChatCompletionChunk(
                id=self.id, created=self.created, model=self.model, choices=[], usage=usage
            )
        else:
            last = Completion(
                id=self.id, created=self.created, model=self.model, choices=[], usage=usage
            )
        return _event(last) + DONE

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

        content = ChunkTemplate(chunk(Delta(content=SLOT)).removeprefix("data: ").rstrip())
        num_tokens = 0
        is_first = True
        async for step in steps:
            # The role goes out with the first output, as vLLM sends it, so a client's time to
            # first token measures a token, not the admission.
            events = chunk(Delta(role="assistant", content="")) if is_first else ""
            is_first = False
            num_tokens = step.num_tokens
            if step.text:
                events += content.event(step.text)
            if step.finish is not None:
                yield (
                    events
                    + chunk(Delta(), step.finish)
                    + self._usage_event(num_tokens, include_usage, is_chat=True)
                )
                return
            if events:
                yield events
        yield self._usage_event(num_tokens, include_usage, is_chat=True)


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


async def _with_errors(events: AsyncIterator[str]) -> AsyncGenerator[str, None]:
    """Ends every stream with [DONE]; an error after the 200 went out is sent as an event."""
    try:
        async for e in events:
            yield e
            if e.endswith(DONE):
                return
    except APIError as e:
        yield f"data: {e.body().model_dump_json()}\n\n" + DONE
    except Exception:
        log.exception("http_stream_error")
        yield f"data: {APIError(500, 'internal error').body().model_dump_json()}\n\n" + DONE


def sse(events: AsyncIterator[str]) -> EventStream:
    return EventStream(_with_errors(events))
