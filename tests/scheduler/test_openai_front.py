"""The OpenAI front in process, over a coordinator of fake workers: what a request holds while
it runs."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import httpx
from cascadeinfer.proto.v1 import common_pb2
from cascadeinfer.scheduler.coordinator import Coordinator
from cascadeinfer.scheduler.openai.app import OpenAIFront
from cascadeinfer.scheduler.openai.model_files import load_model_files
from cascadeinfer.scheduler.openai.schema import ChatCompletionRequest
from cascadeinfer.worker.tiny_model import write_tiny_llama

from tests.scheduler.fake_workers import Step
from tests.scheduler.test_coordinator import settle, start


async def test_a_request_that_waits_for_its_whole_answer_holds_no_parsed_body(
    started: list[Coordinator], tmp_path: Path
) -> None:
    """The handler held the parsed body (up to 4 MiB, in fields no template renders) for the
    whole generation, past the bound on bodies in flight: 100 such chats on a slow worker took
    the scheduler from 83 to 463 MiB (docs/reliability.md, "A fourteenth probe")."""
    model_dir = write_tiny_llama(tmp_path / "model")
    c, fakes = await start(started, "a", tokenizer=str(model_dir))
    assert c.tokenizer is not None
    front = OpenAIFront(c, load_model_files(c.tokenizer, str(model_dir)), tokens=(), model_name="m")
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi", "name": "n" * 100_000}],
        "max_tokens": 4,
    }
    transport = httpx.ASGITransport(app=front.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        answer = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
        while not fakes["a"].started:
            assert not answer.done(), answer.result().text
            await asyncio.sleep(0.01)
        await settle()
        gc.collect()
        held = [o for o in gc.get_objects() if isinstance(o, ChatCompletionRequest)]
        assert held == [], "the parsed body is still referenced while the request runs"
        (rid,) = fakes["a"].started
        fakes["a"].step(Step(rid, 0, (5, 6, 7, 8), 20, common_pb2.FINISH_REASON_LENGTH))
        response = await asyncio.wait_for(answer, 10)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4
