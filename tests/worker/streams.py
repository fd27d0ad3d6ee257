"""Test helpers that read worker streams in background threads and splice tokens by index."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
from cascadeinfer.proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc


def generate_request(
    request_id: str, prompt: list[int], max_tokens: int
) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )


def run_to_end(
    stub: worker_pb2_grpc.WorkerServiceStub, request_id: str, prompt: list[int], max_tokens: int
) -> list[int]:
    """Tokens of a request served on one worker, never moved."""
    tokens: dict[int, int] = {}
    for r in stub.Generate(generate_request(request_id, prompt, max_tokens), timeout=120):
        for k, t in enumerate(r.tokens.token_ids):
            assert r.tokens.first_index + k not in tokens, "a token index was sent twice"
            tokens[r.tokens.first_index + k] = t
    assert sorted(tokens) == list(range(len(tokens)))
    return [tokens[i] for i in range(len(tokens))]


@dataclass
class Spliced:
    """Tokens of one request gathered from several streams, keyed by output index."""

    tokens: dict[int, int] = field(default_factory=dict)
    finish: int = common_pb2.FINISH_REASON_UNSPECIFIED
    duplicates: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, chunk: common_pb2.TokenChunk, finish: int) -> None:
        with self.lock:
            for k, t in enumerate(chunk.token_ids):
                i = chunk.first_index + k
                if i in self.tokens:
                    self.duplicates += 1
                self.tokens[i] = t
            if finish not in (
                common_pb2.FINISH_REASON_UNSPECIFIED,
                common_pb2.FINISH_REASON_MIGRATED,
            ):
                self.finish = finish

    def ordered(self) -> list[int]:
        assert sorted(self.tokens) == list(range(len(self.tokens))), "gap in the token indices"
        return [self.tokens[i] for i in range(len(self.tokens))]

    def wait_finished(self, num_tokens: int, stall_s: float = 60, timeout: float = 900) -> None:
        """Waits until the finish and `num_tokens` tokens arrived, however long the generation
        takes while tokens keep coming (a loaded machine decodes slowly): fails only after
        `stall_s` seconds without a new token, or `timeout` in all."""
        started = last_change = time.monotonic()
        seen = -1
        while not (self.finish and len(self.tokens) >= num_tokens):
            now = time.monotonic()
            if len(self.tokens) != seen:
                seen, last_change = len(self.tokens), now
            assert now - last_change < stall_s, (
                f"no token for {stall_s} s: {seen} of {num_tokens} arrived, finish = {self.finish}"
            )
            assert now - started < timeout, f"{seen} of {num_tokens} tokens after {timeout} s"
            time.sleep(0.05)


class FeedReader:
    """Consumes a worker's StreamSteps feed into per-request spliced outputs."""

    def __init__(self, stub: worker_pb2_grpc.WorkerServiceStub, sink: dict[str, Spliced]) -> None:
        self.call = stub.StreamSteps(worker_pb2.StreamStepsRequest())
        self.sink = sink
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.first.wait(30), "no feed snapshot"

    def _run(self) -> None:
        try:
            for update in self.call:
                self.first.set()
                for r in update.requests:
                    if r.request_id in self.sink and r.tokens.token_ids:
                        self.sink[r.request_id].add(r.tokens, r.finish_reason)
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(5)


class GenerateReader:
    """Consumes one Generate stream in a thread; `deadline_s` is the whole stream's (a long
    prompt's CPU prefill alone can outlast the default)."""

    def __init__(
        self,
        stub: worker_pb2_grpc.WorkerServiceStub,
        request: worker_pb2.GenerateRequest,
        out: Spliced,
        deadline_s: float = 120,
    ) -> None:
        self.responses: list[worker_pb2.GenerateResponse] = []
        self.error: grpc.RpcError | None = None
        self.call = stub.Generate(request, timeout=deadline_s)
        self.out = out
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for r in self.call:
                self.responses.append(r)
                self.out.add(r.tokens, r.finish_reason)
        except grpc.RpcError as e:
            self.error = e

    def wait_tokens(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.out.tokens) < n:
            if self.error is not None:
                raise AssertionError(f"stream failed: {self.error.code()} {self.error.details()}")
            assert time.monotonic() < deadline, f"only {len(self.out.tokens)} tokens arrived"
            time.sleep(0.002)

    def join(self, timeout: float = 120) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive()


def wait_idle(stub: worker_pb2_grpc.WorkerServiceStub, timeout: float = 60) -> int:
    """Waits until the worker serves no request; returns how many it still serves."""
    deadline = time.monotonic() + timeout
    while True:
        load = stub.GetLoad(worker_pb2.GetLoadRequest())
        present = int(load.num_running + load.num_waiting)
        if present == 0 or time.monotonic() > deadline:
            return present
        time.sleep(0.05)


def abort_if_present(stub: worker_pb2_grpc.WorkerServiceStub, request_id: str) -> None:
    """Aborts a request a failed test may have left running (nothing if it is gone)."""
    try:
        stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=30)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise


def wait_free_blocks(
    stub: worker_pb2_grpc.WorkerServiceStub, expected: int, timeout: float = 30
) -> int:
    deadline = time.monotonic() + timeout
    free = -1
    while time.monotonic() < deadline:
        free = stub.GetLoad(worker_pb2.GetLoadRequest()).kv_blocks_free
        if free == expected:
            return free
        time.sleep(0.05)
    return free
