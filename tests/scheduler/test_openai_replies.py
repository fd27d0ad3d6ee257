"""Stream events of the HTTP front as line-based SSE readers see them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from cascadeinfer.scheduler.openai.generation import Step
from cascadeinfer.scheduler.openai.replies import Reply

TEXT = "a\x85b\u2028c\u2029d\r\ne"
"""Text with every character that Python's `splitlines` ends a line at beyond CR and LF."""


async def _steps() -> AsyncIterator[Step]:
    yield Step(TEXT, 1)
    yield Step(TEXT, 2, "length")


def _events(stream: AsyncIterator[str]) -> list[str]:
    async def collect() -> list[str]:
        return [e async for e in stream]

    return asyncio.run(collect())


def test_text_with_unicode_line_breaks_stays_on_one_line_of_each_event() -> None:
    """httpx's `iter_lines` and `str.splitlines` cut an event at a raw U+0085, U+2028 or
    U+2029 in its JSON (one random-weight completion in about 300 had a U+0085)."""
    reply = Reply("cmpl-1", "sim", 3)
    for stream in (reply.completion_events(_steps(), False), reply.chat_events(_steps(), False)):
        body = "".join(_events(stream))
        lines = [line for line in body.splitlines() if line]
        assert lines[-1] == "data: [DONE]"
        texts = []
        for line in lines[:-1]:
            choice = json.loads(line.removeprefix("data: "))["choices"][0]
            texts.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
        assert "".join(texts) == TEXT * 2
