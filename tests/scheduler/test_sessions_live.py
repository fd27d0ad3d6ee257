"""A conversation's next turn goes where its KV is cached, with real vLLM engines on CPU
(prefix caching on, the worker's default): cascade-scheduler in front of two `cascade-worker
--engine vllm` subprocesses on loopback, each worker's own Prometheus counters saying where a
turn's prompt ran and how much of it the engine's prefix cache served.

The turn is sent while the instance holding the conversation decodes another request and the
other instance is idle, so a policy blind to sessions sends it to the idle one; the same
sequence under least-load is the control that shows the check can fail."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from tests.worker.daemons import Daemon, free_port, start_scheduler, workers
from tests.worker.metrics import prompt_counters

pytestmark = pytest.mark.timeout(900)

FIRST_PROMPT_TOKENS = 1000
NEW_TOKENS = 40
BLOCK_TOKENS = 32
"""The built-in tiny model's KV block: the prefix cache serves whole blocks only."""


@dataclass
class Worker:
    daemon: Daemon
    metrics_port: int


@pytest.fixture(scope="module")
def vllm_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Worker]]:
    pytest.importorskip("vllm")
    ports = [free_port(), free_port()]
    args = [["--engine", "vllm", "--metrics-port", str(p)] for p in ports]
    with workers(args, tmp_path_factory.mktemp("logs")) as daemons:
        yield [Worker(d, p) for d, p in zip(daemons, ports, strict=True)]


def request(
    rid: str, prompt: list[int], max_tokens: int, session: str = ""
) -> scheduler_pb2.ClientGenerateRequest:
    return scheduler_pb2.ClientGenerateRequest(
        request_id=rid,
        prompt_token_ids=scheduler_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        session_id=session,
    )


def generate(
    stub: scheduler_pb2_grpc.SchedulerServiceStub, r: scheduler_pb2.ClientGenerateRequest
) -> list[int]:
    tokens: list[int] = []
    for message in stub.Generate(r, timeout=300):
        tokens.extend(message.tokens.token_ids)
    return tokens


def running_by_address(stub: scheduler_pb2_grpc.SchedulerServiceStub) -> dict[str, int]:
    state = stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=10)
    return {w.address: w.num_running for w in state.workers}


def next_turn_placement(
    pair: list[Worker], policy: str, salt: int, log_dir: Path
) -> tuple[int, int, float]:
    """Turn 1 of a conversation, then a long request on the instance holding it, then turn 2
    (turn 1's prompt and answer and NEW_TOKENS more). Returns (index of the holder, index of
    the instance turn 2 started on, turn 2's prompt tokens its prefix cache served)."""
    addresses = ",".join(w.daemon.address for w in pair)
    scheduler = start_scheduler(
        ["--workers", addresses, "--stages", "0-2048:2", "--policy", policy], log_dir
    )
    try:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(scheduler.address))
        prompt = [(salt * 7919 + 37 * k) % 1000 + 1 for k in range(FIRST_PROMPT_TOKENS)]
        session = f"conversation-{salt}"

        before = [prompt_counters(w.metrics_port) for w in pair]
        answer = generate(stub, request(f"turn-1-{salt}", prompt, 8, session))
        after = [prompt_counters(w.metrics_port) for w in pair]
        (holder,) = [i for i in range(2) if after[i][0] > before[i][0]]

        # Both instances are idle: the long request goes to the first, which must be the
        # holder for the turn to have somewhere less loaded to go.
        busy_stream = stub.Generate(request(f"busy-{salt}", [5] * 20, 1800), timeout=300)
        drained = threading.Thread(target=lambda: [None for _ in busy_stream], daemon=True)
        drained.start()
        deadline = time.monotonic() + 60
        while running_by_address(stub).get(pair[holder].daemon.address, 0) == 0:
            assert time.monotonic() < deadline, "the long request never ran on the holder"
            time.sleep(0.05)
        assert running_by_address(stub)[pair[1 - holder].daemon.address] == 0

        before = [prompt_counters(w.metrics_port) for w in pair]
        next_prompt = prompt + answer + [(salt + 11 * k) % 1000 + 1 for k in range(NEW_TOKENS)]
        generate(stub, request(f"turn-2-{salt}", next_prompt, 4, session))
        after = [prompt_counters(w.metrics_port) for w in pair]
        (placed,) = [i for i in range(2) if after[i][0] > before[i][0]]
        assert after[placed][0] - before[placed][0] == len(next_prompt)
        cached = after[placed][1] - before[placed][1]
        assert running_by_address(stub)[pair[holder].daemon.address] == 1, (
            "the long request outlived the turn"
        )
        stub.Abort(scheduler_pb2.ClientAbortRequest(request_id=f"busy-{salt}"))
        drained.join(timeout=60)
        return holder, placed, cached
    finally:
        scheduler.stop()


def test_cascade_sends_the_next_turn_to_the_busier_instance_holding_its_kv(
    vllm_pair: list[Worker], tmp_path: Path
) -> None:
    holder, placed, cached = next_turn_placement(vllm_pair, "cascade", 1, tmp_path)
    assert placed == holder
    # Turn 1's prompt and answer less the last token (whose KV the engine never wrote), in
    # whole blocks.
    shared = FIRST_PROMPT_TOKENS + 8 - 1
    assert cached == shared // BLOCK_TOKENS * BLOCK_TOKENS


def test_least_load_sends_it_to_the_idle_instance_where_nothing_is_cached(
    vllm_pair: list[Worker], tmp_path: Path
) -> None:
    holder, placed, cached = next_turn_placement(vllm_pair, "least-load", 2, tmp_path)
    assert placed != holder
    assert cached == 0
