"""A scheduler stopped (SIGTERM) while clients stream ends every request it holds with a clear
error, at once, and leaves nothing running on its workers. Real scheduler and sim worker
daemons on loopback.

Before, the HTTP streams were cut after 5 s with an incomplete chunked body, a request waiting
for its whole answer got a plain-text 500, gRPC streams ended UNAVAILABLE "Cancelling all
calls" after 5 s more, uvicorn spilled "Exception in ASGI application" tracebacks, and a
request kept running on its worker, unread, until the worker's orphan bound (30 s)."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2
from cascadeinfer.worker.tiny_model import write_tiny_llama

from tests.worker.daemons import SIM_WORKER, Daemon, start_scheduler, workers

SLOW_SIM = [*SIM_WORKER, "--sim-time-scale", "3"]
MAX_TOKENS = 3000
"""Far more than a stream makes before the scheduler is stopped."""
SHUTTING_DOWN = "the scheduler is shutting down"
STOP_BOUND_S = 6.0
"""The scheduler must have exited this soon after SIGTERM (it took 10.4 s before)."""


def num_running(daemons: list[Daemon]) -> int:
    loads = [d.stub().GetLoad(worker_pb2.GetLoadRequest(), timeout=10) for d in daemons]
    return sum(load.num_running + load.num_waiting for load in loads)


def raw_stream(url: str, body: dict[str, object], started: Future[None]) -> bytes:
    """The whole body of a streamed answer (httpx raises if it is cut short)."""
    raw = b""
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for chunk in r.iter_raw():
            raw += chunk
            if not started.done():
                started.set_result(None)
    return raw


def openai_chat(base_url: str, started: Future[None]) -> openai.APIError | None:
    client = openai.OpenAI(base_url=base_url, api_key="-", max_retries=0)
    stream = client.chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=MAX_TOKENS,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    try:
        for _ in stream:
            if not started.done():
                started.set_result(None)
    except openai.APIError as e:
        return e
    return None


def whole(url: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(url, json=body, timeout=60)


def grpc_stream(address: str, started: Future[None]) -> grpc.RpcError | None:
    with grpc.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        request = scheduler_pb2.ClientGenerateRequest(
            prompt_token_ids=scheduler_pb2.TokenIds(ids=[7] * 20),
            sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
        )
        try:
            for _ in stub.Generate(request, timeout=60):
                if not started.done():
                    started.set_result(None)
        except grpc.RpcError as e:
            return e
    return None


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stopped_scheduler_ends_every_stream_clearly_and_aborts_on_its_workers(
    tmp_path: Path, sig: signal.Signals
) -> None:
    model_dir = write_tiny_llama(tmp_path / "model")
    with workers([SLOW_SIM, SLOW_SIM], tmp_path) as daemons:
        addresses = ",".join(d.address for d in daemons)
        args = ["--workers", addresses, "--policy", "least-load", "--http-port", "0"]
        scheduler = start_scheduler([*args, "--tokenizer", str(model_dir)], tmp_path)
        url = scheduler.openai_url
        body = {"model": "sim", "prompt": [5] * 10, "max_tokens": MAX_TOKENS, "ignore_eos": True}
        pool = ThreadPoolExecutor(4)
        try:
            started: list[Future[None]] = [Future() for _ in range(3)]
            sse = pool.submit(raw_stream, f"{url}/completions", body, started[0])
            chat = pool.submit(openai_chat, url, started[1])
            grpc_end = pool.submit(grpc_stream, scheduler.address, started[2])
            waiting = pool.submit(whole, f"{url}/completions", body)
            for s in started:
                s.result(timeout=60)
            wait_until(lambda: num_running(daemons) == 4, 30, "4 requests running")

            stopped_at = time.monotonic()
            scheduler.process.send_signal(sig)
            assert scheduler.process.wait(timeout=30) == 0, scheduler.log()[-3000:]
            took = time.monotonic() - stopped_at
            # Nothing the scheduler placed runs on after it, unread.
            wait_until(lambda: num_running(daemons) == 0, 2, "requests left on the workers")

            raw = sse.result(timeout=10).decode()
            events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
            assert events[-1] == "[DONE]", raw[-500:]
            error = json.loads(events[-2])["error"]
            assert error["type"] == "service_unavailable_error"
            assert SHUTTING_DOWN in error["message"]
            assert len(events) > 2, "some text came before the error"

            chat_error = chat.result(timeout=10)
            assert chat_error is not None and SHUTTING_DOWN in chat_error.message

            answer = waiting.result(timeout=10)
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["type"] == "service_unavailable_error"
            assert SHUTTING_DOWN in answer.json()["error"]["message"]

            rpc_error = grpc_end.result(timeout=10)
            assert rpc_error is not None
            assert rpc_error.code() == grpc.StatusCode.UNAVAILABLE
            assert SHUTTING_DOWN in (rpc_error.details() or "")
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            scheduler.kill()
        log = scheduler.log()
        assert took < STOP_BOUND_S, f"stopped in {took:.1f} s"
        assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]
        assert '"event": "stopped"' in log
        # The daemon's log is JSON lines, but for its two announcement lines on stdout.
        for line in log.splitlines():
            if not line.startswith("cascade-scheduler "):
                json.loads(line)


def test_a_request_whose_body_is_still_arriving_at_the_stop_is_503_at_once(
    tmp_path: Path,
) -> None:
    """A client still sending its body when the scheduler stops gets the 503 a new request
    gets. uvicorn waited for such handlers through its 3 s stop grace and then cancelled them:
    each client got a plain-text 500, the log one "Exception in ASGI application" traceback
    per connection, and the stop took the grace longer."""
    model_dir = write_tiny_llama(tmp_path / "model")
    with workers([SIM_WORKER], tmp_path) as daemons:
        args = ["--workers", daemons[0].address, "--http-port", "0"]
        scheduler = start_scheduler([*args, "--tokenizer", str(model_dir)], tmp_path)
        host, port = scheduler.openai_url.removeprefix("http://").split("/")[0].split(":")
        body = json.dumps({"model": "sim", "prompt": "hi", "max_tokens": 2}).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        connections = [socket.create_connection((host, int(port)), timeout=20) for _ in range(4)]
        try:
            for c in connections:
                c.sendall(head + body[:5])  # the rest never comes
            time.sleep(0.5)  # each handler is reading its body
            stopped_at = time.monotonic()
            scheduler.process.send_signal(signal.SIGTERM)
            answers = []
            for c in connections:
                answer = b""
                while chunk := c.recv(65536):
                    answer += chunk
                answers.append(answer.decode())
            assert scheduler.process.wait(timeout=30) == 0, scheduler.log()[-3000:]
            took = time.monotonic() - stopped_at
        finally:
            for c in connections:
                c.close()
            scheduler.kill()
        for answer in answers:
            assert answer.startswith("HTTP/1.1 503 "), answer
            error = json.loads(answer.partition("\r\n\r\n")[2])["error"]
            assert SHUTTING_DOWN in error["message"], answer
        assert took < 2.0, f"stopped in {took:.1f} s"
        log = scheduler.log()
        assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]
