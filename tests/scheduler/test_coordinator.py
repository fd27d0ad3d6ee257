"""The coordinator's decisions with fake workers behind its `WorkerClient` seam (in process, no
daemons, well under a second each): the admission queue and its priorities, back-pressure on a
full queue and on a client that stops reading, a migration that fails, a worker that dies
while a migration out of it is in flight, a finish that arrives before the tokens ahead of
it, and a request whose last worker died. The Rust core deciding admissions and migrations is
the real one."""

from __future__ import annotations

import asyncio
import json
import threading
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc
import pytest
from cascadeinfer import CostProfile
from cascadeinfer.domain import FinishReason, SamplingSpec
from cascadeinfer.goodput import GoodputSlo
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, worker_pb2
from cascadeinfer.scheduler import coordinator as coordinator_module
from cascadeinfer.scheduler import requests
from cascadeinfer.scheduler.config import SchedulerConfig, StageSpec
from cascadeinfer.scheduler.coordinator import (
    MAX_FAILED_WORKERS_KEPT,
    MAX_START_ERRORS,
    SHUTTING_DOWN,
    Coordinator,
    SchedulingError,
)
from cascadeinfer.scheduler.requests import ClientRequest
from cascadeinfer.scheduler.servicer import SchedulerServicer
from cascadeinfer.scheduler.workers import (
    WorkerIdMismatch,
    WorkerLeaving,
    WorkerPool,
    WorkerUnreachable,
)
from structlog.testing import capture_logs

from tests.scheduler.fake_workers import FakeWorker, Step, fake_cluster

LENGTH = common_pb2.FINISH_REASON_LENGTH
TWO_STAGES = (StageSpec(0, 64, 1), StageSpec(64, 4096, 1))
"""Stage 0 on worker a, stage 1 on worker b: a request reaching 64 tokens moves a -> b."""


async def settle() -> None:
    """Lets the coordinator's background tasks (placements, migrations) run."""
    for _ in range(20):
        await asyncio.sleep(0)


async def start(
    started: list[Coordinator],
    *addresses: str,
    ghosts: tuple[str, ...] = (),
    max_model_len: int = 4096,
    **config: object,
) -> tuple[Coordinator, dict[str, FakeWorker]]:
    """A coordinator over fake workers at `addresses` holding `max_model_len` tokens each; the
    first runs `ghosts` (requests no scheduler placed there, as after a scheduler crash)."""
    fakes = fake_cluster(*addresses)
    for fake in fakes.values():
        fake.max_model_len = max_model_len
    for rid in ghosts:
        fakes[addresses[0]].started[rid] = worker_pb2.GenerateRequest(request_id=rid, detach=True)
    pool = WorkerPool(lambda address: fakes[address])
    settings = {"min_workers": len(addresses), "policy": "least-load", **config}
    coordinator = Coordinator(SchedulerConfig(**settings), pool)  # type: ignore[arg-type]
    started.append(coordinator)
    for address in addresses:  # in order: instance k is the k-th address
        await coordinator.add_worker(address)
    return coordinator, fakes


async def submit(
    c: Coordinator,
    rid: str,
    prompt_len: int,
    max_tokens: int = 1000,
    priority: int = 0,
    session: str | None = None,
) -> ClientRequest:
    prompt = tuple(range(1, prompt_len + 1))
    rec = c.new_request(rid, prompt, SamplingSpec(max_tokens), priority, session)
    await c.submit(rec)
    await settle()
    return rec


def small_kv_profile(tmp_path: Path, tokens: int) -> str:
    profile = json.loads(CostProfile.builtin("gpu-h100-llama3-8b").to_json())
    profile["kv_capacity_tokens"] = tokens
    path = tmp_path / "small-kv.json"
    path.write_text(json.dumps(profile))
    return str(path)


async def test_queued_requests_start_by_priority_once_room_frees(
    started: list[Coordinator], tmp_path: Path
) -> None:
    c, fakes = await start(started, "a", profile=small_kv_profile(tmp_path, 300))
    a = fakes["a"]
    await submit(c, "first", 200)
    await submit(c, "low", 200, priority=0)
    await submit(c, "high", 200, priority=5)
    assert set(a.started) == {"first"} and c.queue_depth == 2
    a.step(Step("first", 0, (7,), 201, LENGTH))
    await settle()
    assert set(a.started) == {"first", "high"}, "the higher priority goes first"
    assert c.queue_depth == 1


async def test_a_sessions_next_turn_follows_its_kv_under_a_policy_that_follows_sessions(
    started: list[Coordinator],
) -> None:
    c, fakes = await start(started, "a", "b", policy="cache-aware")
    await submit(c, "turn-1", 500, session="conv")
    assert set(fakes["a"].started) == {"turn-1"}
    fakes["a"].step(Step("turn-1", 0, (7,), 501, LENGTH))
    await settle()
    await submit(c, "busy", 300)  # both idle: the first instance takes it
    assert set(fakes["a"].started) == {"turn-1", "busy"}
    # b is idle, but a holds the conversation's 500 tokens of KV.
    await submit(c, "turn-2", 800, session="conv")
    assert "turn-2" in fakes["a"].started
    await submit(c, "plain", 800)
    await submit(c, "other-conv", 800, session="another")
    assert {"plain", "other-conv"} <= set(fakes["b"].started)
    with pytest.raises(SchedulingError) as refused:
        await submit(c, "long-key", 10, session="k" * 257)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_full_queue_refuses_with_resource_exhausted(
    started: list[Coordinator], tmp_path: Path
) -> None:
    c, _ = await start(started, "a", profile=small_kv_profile(tmp_path, 300), max_queue=1)
    await submit(c, "running", 200)
    await submit(c, "queued", 200)
    with pytest.raises(SchedulingError) as refused:
        await submit(c, "one-too-many", 200)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "one-too-many" not in c.requests


async def test_one_clients_backlog_neither_fills_the_queue_nor_goes_before_another_client(
    started: list[Coordinator], tmp_path: Path
) -> None:
    """A client (credential) that queues many requests is held to max_queue_per_client, and
    another client's request queued after them starts as soon as room frees, not after them."""
    c, fakes = await start(
        started, "a", profile=small_kv_profile(tmp_path, 300), max_queue=10, max_queue_per_client=3
    )
    a = fakes["a"]

    async def submit_as(owner: str, rid: str) -> None:
        rec = c.new_request(rid, tuple(range(1, 201)), SamplingSpec(1000), 0, owner=owner)
        await c.submit(rec)
        await settle()

    await submit_as("flooder", "running")
    for k in range(3):
        await submit_as("flooder", f"flood-{k}")
    with pytest.raises(SchedulingError) as refused:
        await submit_as("flooder", "flood-3")
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queue_per_client" in refused.value.message
    await submit_as("polite", "polite-1")
    assert c.queue_depth == 4 and set(a.started) == {"running"}
    a.step(Step("running", 0, (7,), 201, LENGTH))
    await settle()
    assert set(a.started) == {"running", "flood-0"}
    a.step(Step("flood-0", 0, (7,), 201, LENGTH))
    await settle()
    assert "polite-1" in a.started, "the other client's turn came before the flood's rest"


async def test_a_worker_that_refuses_a_request_fails_it_with_the_workers_status(
    started: list[Coordinator],
) -> None:
    c, fakes = await start(started, "a")
    fakes["a"].refuse_start = grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(SchedulingError) as refused:
        await submit(c, "r", 10)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not c.requests


async def test_the_first_plan_is_made_for_the_configured_burstiness_and_service_level(
    started: list[Coordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    planned: list[dict[str, object]] = []
    real_build = coordinator_module.build_policy

    def build(*args: object, **kwargs: object) -> object:
        planned.append(kwargs)
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(coordinator_module, "build_policy", build)
    await start(
        started,
        "a",
        "b",
        policy="cascade",
        workload="bimodal",
        arrival_cv=3.0,
        ttft_slo_s=0.5,
        ttft_slo_per_token_s=1e-4,
    )
    assert planned and planned[-1]["arrival_cv"] == 3.0
    # The layout selection's goodput guard counts the first-token level the scheduler serves.
    assert planned[-1]["goodput_slo"] == GoodputSlo(0.5, 1e-4)


async def test_a_request_a_worker_fails_to_start_every_time_ends_instead_of_waiting(
    started: list[Coordinator],
) -> None:
    # vLLM 0.32's own validation errors (stop_token_ids past the vocabulary) reached the
    # worker as INTERNAL, and the request was queued and tried again every half second for as
    # long as its client waited.
    c, fakes = await start(started, "a")
    fakes["a"].refuse_start = grpc.StatusCode.INTERNAL
    rec = await submit(c, "r", 10)
    assert not rec.is_done  # one INTERNAL may be a start stream that broke: tried again
    for _ in range(MAX_START_ERRORS):
        fakes["a"].step()
        await settle()
    assert rec.finish == FinishReason.ABORT
    assert rec.num_start_errors == MAX_START_ERRORS
    assert "r" not in c.requests
    fakes["a"].refuse_start = None
    await submit(c, "next", 10)
    assert "next" in fakes["a"].started


async def test_a_client_that_stops_reading_has_its_request_ended_and_aborted(
    started: list[Coordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its front has been held up by one write for longer than the grace (here: no grace).
    monkeypatch.setattr(requests, "STALLED_WRITE_S", 0.0)
    c, fakes = await start(started, "a", max_stream_lag_tokens=8)
    rec = await submit(c, "slow", 10)
    fakes["a"].step(Step("slow", 0, tuple(range(5)), 15))
    await settle()
    assert not rec.is_done  # 5 unread tokens: within the bound
    fakes["a"].step(Step("slow", 5, tuple(range(5)), 20))
    await settle()
    assert rec.is_overflowed and rec.finish == FinishReason.ABORT
    assert fakes["a"].aborted == ["slow"]
    assert "slow" not in c.requests


class _Aborted(Exception):
    pass


class StalledClientContext:
    """A gRPC servicer context whose client stopped reading: every write after the first
    `writable` waits for ever (HTTP/2 flow control), as a socket with a zero window does."""

    def __init__(self, writable: int) -> None:
        self.writable = writable
        self.status: tuple[grpc.StatusCode, str] | None = None
        self.blocked: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def write(self, _message: object) -> None:
        if self.writable <= 0:
            await self.blocked  # for ever, unless the test makes the client leave
        self.writable -= 1

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        self.status = (code, details)
        raise _Aborted

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return self.status is not None


async def test_a_stream_blocked_on_a_client_that_stopped_reading_ends_with_its_request(
    started: list[Coordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler was blocked in its write, so it never sent the RESOURCE_EXHAUSTED of a
    request ended for lag: the stream stayed open until the client left."""
    monkeypatch.setattr(requests, "STALLED_WRITE_S", 0.0)
    c, fakes = await start(started, "a", max_stream_lag_tokens=8)
    context = StalledClientContext(writable=1)
    request = scheduler_pb2.ClientGenerateRequest(
        request_id="slow", sampling=common_pb2.SamplingParams(max_tokens=1000)
    )
    request.prompt_token_ids.ids.extend(range(1, 11))
    stream = asyncio.ensure_future(SchedulerServicer(c).Generate(request, context))  # type: ignore[arg-type]
    await settle()
    fakes["a"].step(Step("slow", 0, (1,), 11))  # written
    await settle()
    fakes["a"].step(Step("slow", 1, (2,), 12))  # its write blocks
    await settle()
    fakes["a"].step(Step("slow", 2, tuple(range(10)), 22))  # past the bound
    with pytest.raises(_Aborted):
        await asyncio.wait_for(stream, 2)
    assert context.status is not None
    assert context.status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_stream_lag_tokens" in context.status[1]
    assert fakes["a"].aborted == ["slow"]


async def test_a_prompt_of_ids_past_the_model_length_is_refused_before_python_holds_its_ids(
    started: list[Coordinator],
) -> None:
    """A 15 MB message of 3 million ids became a tuple of Python ints (~150 MiB with the
    message) before the length refused it; ten such calls at once held the scheduler's event
    loop for seconds and 1.5 GB, kept after (docs/reliability.md, "A fourteenth probe")."""
    c, _ = await start(started, "a")  # 4,096 tokens
    context = StalledClientContext(writable=0)
    request = scheduler_pb2.ClientGenerateRequest(
        request_id="huge", sampling=common_pb2.SamplingParams(max_tokens=4)
    )
    request.prompt_token_ids.ids.extend(range(1000, 2_001_000))  # past the small-int cache
    tracemalloc.start()
    try:
        with pytest.raises(_Aborted):
            await SchedulerServicer(c).Generate(request, context)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert context.status is not None
    assert context.status[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "prompt of 2000000 tokens plus max_tokens 4 exceeds the model's length 4096"
        in (context.status[1])
    )
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB allocated (a tuple of the ids: ~70 MiB)"


async def test_a_client_that_leaves_during_a_blocked_write_is_a_disconnect_not_a_failure(
    started: list[Coordinator],
) -> None:
    """gRPC fails the blocked write (ExecuteBatchError) without cancelling the handler; raised
    on, it was logged at error level with a traceback, as a failure of the handler. The
    abort on the worker is the coordinator's task: gRPC cancels what the handler awaits."""
    c, fakes = await start(started, "a")
    context = StalledClientContext(writable=0)
    request = scheduler_pb2.ClientGenerateRequest(
        request_id="gone", sampling=common_pb2.SamplingParams(max_tokens=1000)
    )
    request.prompt_token_ids.ids.extend(range(1, 11))
    with capture_logs() as logs:
        stream = asyncio.ensure_future(SchedulerServicer(c).Generate(request, context))  # type: ignore[arg-type]
        await settle()
        fakes["a"].step(Step("gone", 0, (1,), 11))  # its write blocks
        await settle()
        context.blocked.set_exception(RuntimeError("Failed execute_batch"))  # the client left
        with pytest.raises(asyncio.CancelledError):  # what gRPC ends quietly
            await asyncio.wait_for(stream, 2)
        await settle()
    assert [e["event"] for e in logs if e["log_level"] in ("info", "warning", "error")] == [
        "client_disconnected"
    ]
    assert fakes["a"].aborted == ["gone"]


async def test_a_stopping_scheduler_ends_every_request_and_aborts_it_on_its_worker(
    started: list[Coordinator], tmp_path: Path
) -> None:
    profile = small_kv_profile(tmp_path, 300)
    c, fakes = await start(started, "a", "b", profile=profile, worker_call_timeout_s=0.2)
    a, b = fakes["a"], fakes["b"]
    running = await submit(c, "running", 200)
    b.hold_start = asyncio.Event()
    placing_task = asyncio.create_task(submit(c, "placing", 200))
    await settle()
    queued = await submit(c, "queued", 200)
    assert c.queue_depth == 1 and "running" in a.started and not b.started

    placed = c.cut_off()
    assert not c.requests, "every accepted request is ended at once"
    for rec in (running, queued):
        assert rec.is_cut_off and rec.finish == FinishReason.ABORT
    assert sorted((link.worker_id, rid) for link, rid in placed) == [
        ("a", "running"),
        ("b", "placing"),
    ]
    with pytest.raises(SchedulingError) as refused:
        await submit(c, "late", 10)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused.value.message == SHUTTING_DOWN

    b.is_abort_unanswered = True  # b is stuck: its abort is bounded, and a's still goes out
    await asyncio.wait_for(c.abort_all(placed), 2)
    assert a.aborted == ["running"]
    # The placement that was in flight lands after the abort: it is aborted once it does.
    b.is_abort_unanswered = False
    b.hold_start.set()
    await asyncio.wait_for(placing_task, 2)
    assert "placing" in b.started and b.aborted == ["placing"]


async def test_a_request_aborted_while_its_worker_takes_it_is_aborted_there_once_it_has_it(
    started: list[Coordinator],
) -> None:
    """The client's Abort came while the start was in flight: the abort sent then reached the
    worker before the request did, which then ran on, unread, to its max_tokens (two or three
    requests a run in the seventeenth probe's start-then-Abort loop)."""
    c, fakes = await start(started, "a")
    a = fakes["a"]
    a.hold_start = asyncio.Event()
    rec = c.new_request("r", tuple(range(1, 11)), SamplingSpec(1000), 0, None)
    placing = asyncio.create_task(c.submit(rec))
    await settle()
    await c.abort("r")
    assert rec.finish == FinishReason.ABORT
    a.hold_start.set()
    await asyncio.wait_for(placing, 2)
    await settle()
    assert a.requests_taken[-2:] == [("start", "r"), ("abort", "r")]


async def test_a_request_aborted_during_its_move_is_aborted_on_the_target_it_moved_to(
    started: list[Coordinator],
) -> None:
    """The Abort went to the move's source, which had stopped the request for the move; the
    move then landed, and the target's copy ran on, unread (the seventeenth probe, F4)."""
    c, fakes = await start(started, "a", "b", policy="cascade", stages=TWO_STAGES)
    a, b = fakes["a"], fakes["b"]
    a.hold_migrate = held = asyncio.Event()
    rec = await submit(c, "r", 60)
    a.step(Step("r", 0, (1, 2, 3, 4), 64))  # at the stage bound: the core moves it to b
    await settle()
    assert rec.is_moving
    await c.abort("r")
    held.set()
    await settle()
    assert "r" in b.started and b.requests_taken[-1] == ("abort", "r")
    assert not c.requests


async def test_bursts_larger_than_the_lag_bound_reach_a_client_that_reads(
    started: list[Coordinator],
) -> None:
    """A worker's feed merges the steps the scheduler had no time to read, so one message can
    carry more tokens than the lag bound; a client that reads is not behind, whether it waits
    for them or is in the middle of a write."""
    c, fakes = await start(started, "a", max_stream_lag_tokens=8)
    rec = await submit(c, "burst", 10)
    reader = asyncio.ensure_future(rec.next_delivery())
    await settle()
    assert rec.front_busy_since is None  # waiting for news
    fakes["a"].step(Step("burst", 0, tuple(range(20)), 30))
    await settle()
    assert (await reader).token_ids == list(range(20))
    # Its front is writing those 20 now; 20 more arrive at once: a moment, not a stall.
    fakes["a"].step(Step("burst", 20, tuple(range(20)), 50))
    await settle()
    assert not rec.is_done and rec.num_unsent == 20


async def test_a_move_the_request_ended_before_is_overtaken_not_failed(
    started: list[Coordinator],
) -> None:
    """The source no longer has the request (it finished, or its client left mid-move): not a
    fault, and not counted as one (an alert on failed moves fired on clients leaving)."""
    c, fakes = await start(started, "a", "b", policy="cascade", stages=TWO_STAGES)
    a = fakes["a"]
    a.fail_migrate = grpc.StatusCode.NOT_FOUND
    rec = await submit(c, "r", 60)
    a.step(Step("r", 0, (1, 2, 3, 4), 64))  # at the stage bound: the core moves it to b
    await settle()
    moves = c.metrics.migrations
    assert moves.labels("stage_bound", "overtaken")._value.get() >= 1
    assert moves.labels("stage_bound", "failed")._value.get() == 0
    assert c.counters.num_failed_migrations == 0
    a.step(Step("r", 4, (5,), 65, LENGTH))
    await settle()
    assert rec.tokens == [1, 2, 3, 4, 5] and rec.finish == FinishReason.LENGTH


async def test_a_failed_migration_leaves_the_request_streaming_from_its_source(
    started: list[Coordinator],
) -> None:
    c, fakes = await start(started, "a", "b", policy="cascade", stages=TWO_STAGES)
    a, b = fakes["a"], fakes["b"]
    a.fail_migrate = grpc.StatusCode.UNAVAILABLE
    rec = await submit(c, "r", 60)
    assert set(a.started) == {"r"}
    a.step(Step("r", 0, (1, 2, 3, 4), 64))  # at the stage bound: the core moves it to b
    await settle()
    assert c.counters.num_failed_migrations >= 1 and not b.started
    assert rec.worker_id == "a" and rec.holders == {"a"}
    a.step(Step("r", 4, (5,), 65, LENGTH))
    await settle()
    assert rec.tokens == [1, 2, 3, 4, 5] and rec.finish == FinishReason.LENGTH


async def test_fixed_stages_short_of_the_workers_length_bound_what_is_admitted(
    started: list[Coordinator],
) -> None:
    """`--stages` ending at 4096 over workers that hold 8192: a request that would grow past
    the last stage has no stage to go to. It used to be admitted, and at 4096 tokens the core
    refused its step, which ended the scheduler's reader of that worker's feed: every request
    there hung, health still SERVING."""
    c, fakes = await start(
        started, "a", "b", policy="cascade", stages=TWO_STAGES, max_model_len=8192
    )
    assert c.max_model_len == 4096
    with pytest.raises(SchedulingError) as refused:
        await submit(c, "too-long", 60, max_tokens=4037)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "4096" in str(refused.value)
    rec = await submit(c, "fits", 60, max_tokens=4036)
    assert set(fakes["a"].started) == {"fits"} and not rec.is_done


async def test_a_step_the_policy_refuses_does_not_stop_the_feed(
    started: list[Coordinator],
) -> None:
    """A length the core refuses (a worker that reports past the stages' bound): the tokens
    reach the client, no migration is decided for that step, and the next steps of the same
    feed are still read."""
    c, fakes = await start(started, "a", "b", policy="cascade", stages=TWO_STAGES)
    a = fakes["a"]
    rec = await submit(c, "r", 30, max_tokens=10)
    with capture_logs() as logs:
        a.step(Step("r", 0, (1, 2), 5000))  # past the last stage's bound
        await settle()
        a.step(Step("r", 2, (3,), 5001))  # and again: counted, not logged again
        await settle()
    assert c.metrics.policy_step_errors._value.get() == 2
    assert [e["event"] for e in logs].count("policy_step_refused") == 1
    a.step(Step("r", 3, (4,), 33, LENGTH))
    await settle()
    assert rec.tokens == [1, 2, 3, 4] and rec.finish == FinishReason.LENGTH


async def test_a_fault_of_the_scheduler_on_a_feed_gives_the_worker_up_rather_than_hang(
    started: list[Coordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any other error while a feed message is handled (a bug of ours): the worker is given
    up on as if its feed had broken, so its requests resume elsewhere, instead of staying
    placed there with nobody reading their tokens."""
    c, fakes = await start(started, "a", "b")
    rec = await submit(c, "r", 30, max_tokens=10)
    assert set(fakes["a"].started) == {"r"}

    def broken(link: object, update: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(c, "_on_step", broken)
    fakes["a"].step(Step("r", 0, (1,), 31))
    await settle()
    assert "r" in fakes["b"].started and rec.worker_id == "b" and not rec.is_done


async def test_a_worker_that_joins_after_one_died_restores_the_stage_it_left(
    started: list[Coordinator],
) -> None:
    """Two stages of one worker each: the death of one merges its stage into the other (no
    neighbour could spare one). The worker that then joins (the same one restarted under a
    new address, or any other) splits it again at the planned bound; before, the layout
    stayed one stage for good."""
    c, fakes = await start(started, "a", "b", "c", policy="cascade", stages=(*TWO_STAGES,))
    assert c.policy is not None
    fakes["b"].die()
    await settle()
    fakes["c"].die()
    await settle()
    assert c.policy.stages() == [(0, 4096, [0])]
    fakes["d"] = FakeWorker("d", peers=fakes)
    await c.add_worker("d")
    assert [(lo, hi) for lo, hi, _ in c.policy.stages()] == [(0, 64), (64, 4096)]


async def test_a_registration_under_an_id_the_worker_does_not_answer_to_is_refused(
    started: list[Coordinator],
) -> None:
    """Another spelling of a connected worker's address under a made-up id (a buggy or
    hostile registrant): refused. It used to give the worker a second link, whose feed
    reconciliation aborted every request the first had placed there."""
    c, fakes = await start(started, "a", "b")
    rec = await submit(c, "r", 30, max_tokens=10)
    holder = rec.worker_id
    assert holder is not None
    # The same worker under another address string: it answers with its own id.
    fakes["alias-of-" + holder] = FakeWorker(holder, peers=fakes)
    with pytest.raises(WorkerIdMismatch, match="answers as worker"):
        await c.add_worker("alias-of-" + holder, "alias")
    assert not fakes[holder].aborted and len(c.pool.by_id) == 2
    fakes[holder].step(Step("r", 0, (1,), 31, LENGTH))
    await settle()
    assert rec.tokens == [1] and rec.finish == FinishReason.LENGTH


async def a_move_that_will_fail_in_flight(
    started: list[Coordinator],
) -> tuple[FakeWorker, FakeWorker, asyncio.Event, ClientRequest]:
    """Request "r" with tokens 1-4 moving from worker a to b, held until the returned event
    is set, then failing (UNAVAILABLE)."""
    c, fakes = await start(started, "a", "b", policy="cascade", stages=TWO_STAGES)
    a, b = fakes["a"], fakes["b"]
    a.hold_migrate = held = asyncio.Event()
    a.fail_migrate = grpc.StatusCode.UNAVAILABLE
    rec = await submit(c, "r", 60)
    a.step(Step("r", 0, (1, 2, 3, 4), 64))  # at the stage bound: the core moves it to b
    await settle()
    assert rec.is_moving
    return a, b, held, rec


async def test_a_source_dying_mid_migration_resumes_the_request_where_it_fits(
    started: list[Coordinator],
) -> None:
    a, b, held, rec = await a_move_that_will_fail_in_flight(started)
    a.die()  # its feed breaks while the move is in flight
    await settle()
    assert not b.started, "the move decides, not the broken feed"
    held.set()  # the move fails: a is gone, so nothing runs the request
    await settle()
    resumed = b.started["r"]
    assert list(resumed.output_token_ids) == [1, 2, 3, 4], "resumed from what the client has"
    assert rec.worker_id == "b" and not rec.is_done


async def test_a_source_dying_before_its_last_tokens_arrive_resumes_from_what_the_client_has(
    started: list[Coordinator],
) -> None:
    """The source made tokens 4 and 5 before the move, and died before its feed carried them;
    the target went on from 6. The client waited for the gap for good while the request ran to
    its end unread (a vLLM worker stopped, then killed 0.15 s later: two runs of two)."""
    c, fakes = await start(started, "a", "b", policy="cascade", stages=TWO_STAGES)
    a, b = fakes["a"], fakes["b"]
    a.migrated_context_len = 66
    rec = await submit(c, "r", 60)
    a.step(Step("r", 0, (1, 2, 3, 4), 64))  # at the stage bound: the core moves it to b
    await settle()
    assert rec.worker_id == "b"
    b.step(Step("r", 6, (7, 8), 68))
    a.die()
    await settle()
    assert b.aborted == ["r"], "the copy that went on past the gap"
    assert list(b.started["r"].output_token_ids) == [1, 2, 3, 4], "resumed from the client's"
    assert rec.worker_id == "b" and not rec.is_done and not rec.pending
    b.step(Step("r", 4, (5, 6, 7), 67))
    await settle()
    assert rec.tokens == [1, 2, 3, 4, 5, 6, 7]


async def test_a_resume_where_a_stale_copy_runs_aborts_the_copy_rather_than_the_request(
    started: list[Coordinator],
) -> None:
    """The target took the request, then the source died before answering the move: the
    resume found the id in use there and ended the request (ABORT) with that worker healthy."""
    a, b, held, rec = await a_move_that_will_fail_in_flight(started)
    b.refuses_ids_in_use = True
    b.started["r"] = worker_pb2.GenerateRequest(request_id="r", detach=True)  # it landed
    a.die()
    await settle()
    held.set()  # the answer never comes: the move fails, and the request resumes
    for _ in range(5):
        await settle()
        b.step()  # a step drains the queue
    await settle()
    assert not rec.is_done, rec.finish
    assert b.aborted == ["r"]
    assert list(b.started["r"].output_token_ids) == [1, 2, 3, 4]


async def test_a_request_moved_by_a_call_the_scheduler_did_not_make_resumes_where_it_follows(
    started: list[Coordinator],
) -> None:
    """An operator's MigrateOut or ExportKV took the request off its worker: the feed there
    said nothing, the copy elsewhere was not followed, and the client waited for good."""
    c, fakes = await start(started, "a", "b")
    a, b = fakes["a"], fakes["b"]
    rec = await submit(c, "r", 10)
    here, there = (a, b) if "r" in a.started else (b, a)
    here.step(Step("r", 0, (1, 2, 3), 13))
    here.step(Step("r", 3, (), 13, common_pb2.FINISH_REASON_MIGRATED))
    await settle()
    assert not rec.is_done
    resumed = there.started.get("r") or here.started["r"]
    assert list(resumed.output_token_ids) == [1, 2, 3], "resumed from what the client has"


async def test_a_finish_that_arrives_before_the_tokens_ahead_of_it_waits_for_them(
    started: list[Coordinator],
) -> None:
    c, fakes = await start(started, "a", "b", policy="cascade", stages=TWO_STAGES)
    a, b = fakes["a"], fakes["b"]
    rec = await submit(c, "r", 60, max_tokens=8)
    a.step(Step("r", 0, (1, 2, 3, 4), 64))
    await settle()
    assert set(b.started) == {"r"} and rec.worker_id == "b"
    # The target's feed runs ahead of the source's last tokens (indices 4-5).
    b.step(Step("r", 6, (7, 8), 68, LENGTH))
    await settle()
    assert not rec.is_done and rec.tokens == [1, 2, 3, 4]
    a.step(Step("r", 4, (5, 6), 66))  # within the source's grace after the move
    await settle()
    assert rec.tokens == [1, 2, 3, 4, 5, 6, 7, 8] and rec.finish == FinishReason.LENGTH
    deliveries = []
    while (d := rec.take_delivery()) is not None:
        deliveries.append(d)
    assert [t for d in deliveries for t in d.token_ids] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert deliveries[-1].finish == FinishReason.LENGTH


async def test_a_move_sources_tokens_that_arrive_long_after_the_move_still_reach_the_client(
    started: list[Coordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy scheduler reads its feeds seconds behind. The source's last tokens, arriving
    after the grace that followed the move, were dropped as a stranger's: the client's stream
    waited on the gap for good (17 of 200 streams of a `bench_scheduler.py` relay run)."""
    monkeypatch.setattr(coordinator_module, "FEED_LAG_GRACE_S", 0.01)
    c, fakes = await start(started, "a", "b", policy="cascade", stages=TWO_STAGES)
    a, b = fakes["a"], fakes["b"]
    a.migrated_context_len = 66  # the source made 6 tokens; its feed has brought 4
    rec = await submit(c, "r", 60, max_tokens=8)
    a.step(Step("r", 0, (1, 2, 3, 4), 64))
    await settle()
    assert rec.worker_id == "b" and rec.owed_by == ("a", 6)
    b.step(Step("r", 6, (7, 8), 68, LENGTH))
    await asyncio.sleep(0.1)  # ten graces: the source's feed is that far behind
    a.step(Step("r", 4, (5, 6), 66))
    await settle()
    assert rec.tokens == [1, 2, 3, 4, 5, 6, 7, 8] and rec.finish == FinishReason.LENGTH
    assert c.metrics.foreign_steps._value.get() == 0


async def test_a_move_source_is_no_longer_followed_once_the_client_has_its_tokens(
    started: list[Coordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coordinator_module, "FEED_LAG_GRACE_S", 0.01)
    c, fakes = await start(started, "a", "b", policy="cascade", stages=TWO_STAGES)
    a = fakes["a"]
    a.migrated_context_len = 64
    rec = await submit(c, "r", 60, max_tokens=100)
    a.step(Step("r", 0, (1, 2, 3, 4), 64))
    await settle()
    assert rec.worker_id == "b"
    await asyncio.sleep(0.05)
    assert rec.holders == {"b"}
    a.step(Step("r", 4, (99,), 65))  # a stray copy's token: not the client's
    await settle()
    assert rec.tokens == [1, 2, 3, 4]
    assert c.metrics.foreign_steps._value.get() == 1


async def test_a_worker_joins_once_the_ghosts_it_runs_are_aborted(
    started: list[Coordinator],
) -> None:
    c, fakes = await start(started, "a", ghosts=("left-by-a-crash",))
    assert fakes["a"].aborted == ["left-by-a-crash"]
    assert c.can_place


@dataclass
class HeldPlanner:
    """The first plan's build, held on a gate the test opens, on fake workers a, b and c
    (`min_workers` 2): what the build was asked for, and whether it fails."""

    coordinator: Coordinator
    fakes: dict[str, FakeWorker]
    gate: threading.Event = field(default_factory=threading.Event)
    planned_for: list[list[int]] = field(default_factory=list)
    fails: bool = False


def held_planner(started: list[Coordinator], monkeypatch: pytest.MonkeyPatch) -> HeldPlanner:
    real_build = coordinator_module.build_policy
    fakes = fake_cluster("a", "b", "c")
    c = Coordinator(
        SchedulerConfig(min_workers=2, policy="least-load"),
        WorkerPool(lambda address: fakes[address]),  # type: ignore[arg-type]
    )
    started.append(c)
    held = HeldPlanner(c, fakes)

    def build(*args: object, **kwargs: object) -> object:
        held.planned_for.append(list(args[2]))  # type: ignore[call-overload]
        assert held.gate.wait(10), "the test never let the plan finish"
        if held.fails:
            raise RuntimeError("no plan this time")
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(coordinator_module, "build_policy", build)
    return held


async def test_the_first_plan_is_made_off_the_event_loop(
    started: list[Coordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On 64 workers the first plan takes seconds (19 s seen under load); made on the event
    loop, every RPC, feed and health check waited for it. Now the loop goes on while it is
    made; a worker registering meanwhile joins the plan once it exists, and one that left
    meanwhile is out of it before anything is placed."""
    held = held_planner(started, monkeypatch)
    c, fakes, gate, planned_for = held.coordinator, held.fakes, held.gate, held.planned_for
    await c.add_worker("a")
    second = asyncio.create_task(c.add_worker("b"))  # brings the count to 2: the plan starts
    for _ in range(100):
        if planned_for:
            break
        await asyncio.sleep(0.01)
    assert planned_for == [[0, 1]], "planning for a and b, off the loop (this loop runs)"
    assert not c.can_place, "nothing is placed before the plan exists"
    third = asyncio.create_task(c.add_worker("c"))
    fakes["a"].die()
    await asyncio.sleep(0.05)
    assert not second.done() and not third.done()
    gate.set()
    b, third_link = await asyncio.wait_for(asyncio.gather(second, third), 10)
    assert c.policy is not None and c.can_place
    placed_on = sorted(i for _, _, instances in c.policy.stages() for i in instances)
    assert placed_on == [b.instance, third_link.instance], "a left, c joined after the plan"
    assert sorted(w.address for w in c.pool.healthy()) == ["b", "c"]


async def test_the_first_plan_outlives_the_registrations_that_wait_for_it(
    started: list[Coordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registration has a 5 s deadline, and a plan for 64 workers took longer under load
    (the thirteenth probe): the registration that started the plan was cancelled, the plan
    with it, and nothing made it again, so every request was refused for good; a worker whose
    registration ended while it waited for the plan was refused as "leaving" at every
    heartbeat after. Now the plan is made and installed whoever waits for it, the worker that
    started it is in it, and one that gave up waiting joins at its next registration."""
    held = held_planner(started, monkeypatch)
    c, gate = held.coordinator, held.gate
    await c.add_worker("a")
    # b and c register at once: the first to join starts the plan, the other waits for it
    # with its feed up.
    registrations = [asyncio.create_task(c.add_worker(address)) for address in ("b", "c")]
    while c._first_plan is None:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    joined = [w.address for w in c.pool.healthy()]
    waiting = [w.address for w in c.pool.by_id.values() if not w.is_healthy]
    assert len(joined) == 2 and len(waiting) == 1, "one started the plan, one waits for it"
    for registration in registrations:  # both past their deadline
        registration.cancel()
    await asyncio.gather(*registrations, return_exceptions=True)
    gate.set()
    for _ in range(200):
        if c.policy is not None:
            break
        await asyncio.sleep(0.01)
    assert c.policy is not None and c.can_place, "the plan was made though nobody waited"
    assert sorted(w.address for w in c.pool.healthy()) == joined
    assert waiting[0] not in c.pool.by_id, "forgotten, not held as leaving"
    await asyncio.wait_for(c.add_worker(waiting[0]), 5)  # its next registration joins
    assert sorted(w.address for w in c.pool.healthy()) == ["a", "b", "c"]
    placed_on = sorted(i for _, _, instances in c.policy.stages() for i in instances)
    assert placed_on == sorted(w.instance for w in c.pool.healthy())


async def test_workers_of_a_first_plan_that_failed_join_afresh(
    started: list[Coordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan that fails after the registration that started it gave up: its workers are
    forgotten, not left listed as healthy with no plan (every request refused while they
    looked joined), and their next registrations try the plan again."""
    held = held_planner(started, monkeypatch)
    held.fails = True
    c, gate = held.coordinator, held.gate
    await c.add_worker("a")
    starter = asyncio.create_task(c.add_worker("b"))
    while c._first_plan is None:
        await asyncio.sleep(0.01)
    starter.cancel()
    await asyncio.gather(starter, return_exceptions=True)
    with capture_logs() as logs:
        gate.set()
        while c._first_plan is not None:
            await asyncio.sleep(0.01)
    assert any(e["event"] == "first_plan_failed" for e in logs)
    assert c.policy is None and not c.pool.healthy() and not c.can_place
    held.fails = False
    await c.add_worker("a")
    await asyncio.wait_for(c.add_worker("b"), 5)
    assert c.policy is not None and sorted(w.address for w in c.pool.healthy()) == ["a", "b"]


async def test_a_worker_that_is_draining_is_not_taken_into_the_plan(
    started: list[Coordinator],
) -> None:
    """A static worker reconnected, or any worker connected, while it drains would get
    requests it refuses; it is refused until it is back, not draining."""
    c, fakes = await start(started, "a", "b")
    fakes["b"].die()
    await settle()
    assert [w.address for w in c.pool.healthy()] == ["a"]
    fakes["b"].is_draining = True
    with pytest.raises(WorkerUnreachable, match="draining"):
        await c.add_worker("b")
    assert [w.address for w in c.pool.healthy()] == ["a"]
    fakes["b"].is_draining = False
    await c.add_worker("b")
    assert sorted(w.address for w in c.pool.healthy()) == ["a", "b"]


@pytest.mark.parametrize("is_moving", [False, True], ids=["idle", "requests-moving"])
async def test_a_registration_at_a_draining_workers_address_is_refused_without_a_call(
    started: list[Coordinator], is_moving: bool
) -> None:
    """A worker whose feed said it drains is refused as leaving at once, however slowly it
    answers: each registration at its address used to ask it for its load (idle: up to 3 s
    when it was stalled) or for its info (requests still moving off it), for the same
    refusal."""
    c, fakes = await start(started, "a", "b")
    if is_moving:
        for k in range(2):  # one on each worker
            await submit(c, f"r{k}", 10)
    b = c.pool.by_id["b"]
    assert bool(b.running) == is_moving
    fakes["b"].hold_migrate = asyncio.Event()  # its moves take a while
    fakes["b"].hold_load = asyncio.Event()  # and it answers nothing meanwhile
    fakes["b"].is_draining = True
    fakes["b"].step(is_draining=True)
    await settle()
    assert b.has_left and bool(b.running) == is_moving, "taken out"
    calls = dict(fakes["b"].num_calls)
    with pytest.raises(WorkerLeaving):
        await asyncio.wait_for(c.add_worker("b", "b"), 0.5)
    assert fakes["b"].num_calls == calls, "the worker was asked"
    assert [w.address for w in c.pool.healthy()] == ["a"]


async def test_a_worker_taken_out_by_a_goodbye_it_did_not_confirm_is_asked_and_comes_back(
    started: list[Coordinator],
) -> None:
    """Its feed never said it drains: only its answer tells, so a registration asks it."""
    c, fakes = await start(started, "a", "b")
    fakes["b"].fail_load = grpc.StatusCode.UNAVAILABLE  # it cannot be asked: the goodbye holds
    await c.deregister(c.pool.by_id["b"])
    assert [w.address for w in c.pool.healthy()] == ["a"]
    with pytest.raises(WorkerLeaving):
        await c.add_worker("b", "b")
    fakes["b"].fail_load = None
    await c.add_worker("b", "b")
    assert sorted(w.address for w in c.pool.healthy()) == ["a", "b"]
    assert fakes["b"].num_calls["load"] == 3


async def test_workers_gone_with_nothing_on_them_are_forgotten_but_the_latest_failures(
    started: list[Coordinator],
) -> None:
    """Every worker that ever joined stayed listed, and counted unhealthy, for the life of the
    scheduler, its client open: with each restart of a pod (a new address, a new id) one more.
    Now one that left (drained) is forgotten once its feed ends, and of those that failed only
    the latest MAX_FAILED_WORKERS_KEPT stay listed, for an operator to see."""
    failing = [f"f{k}" for k in range(MAX_FAILED_WORKERS_KEPT + 3)]
    c, fakes = await start(started, "a", "leaver", *failing, migration_timeout_s=0.01)
    fakes["leaver"].step(is_draining=True)
    await settle()
    assert "leaver" in c.pool.by_id, "listed while it drains"
    for name in ["leaver", *failing]:
        fakes[name].die()
    await settle()
    listed = [w.worker_id for w in c.pool.by_id.values()]
    assert listed == ["a", *failing[3:]]
    unhealthy = c.metrics.registry.get_sample_value(
        "cascade_scheduler_workers", {"state": "unhealthy"}
    )
    assert unhealthy == MAX_FAILED_WORKERS_KEPT
    await asyncio.sleep(0.05)
    assert [n for n, f in fakes.items() if f.is_closed] == ["leaver", *failing[:3]]
    fakes["leaver"].is_draining = False
    await c.add_worker("leaver")  # back, as a new instance
    assert sorted(w.worker_id for w in c.pool.healthy()) == ["a", "leaver"]


async def test_a_worker_back_under_its_id_retires_its_old_link(
    started: list[Coordinator],
) -> None:
    """A worker restarted under the same id: the old link's client is closed and its instance
    dropped. Before, both stayed behind for good, one more of each at every restart."""
    c, fakes = await start(started, "a", "b", migration_timeout_s=0.01)
    for _ in range(3):
        before = fakes["b"]
        before.die()
        await settle()
        fakes["b"] = FakeWorker("b", peers=fakes)  # restarted: a new process
        await c.add_worker("b")
        await asyncio.sleep(0.05)
        assert before.is_closed and not fakes["b"].is_closed
    assert sorted(w.worker_id for w in c.pool.healthy()) == ["a", "b"]
    assert sorted(c.pool.by_instance) == [0, 4], "one instance per worker"
    # The only worker dies and comes back: the core kept its instance until then.
    fakes["a"].die()
    fakes["b"].die()
    await settle()
    fakes["b"] = FakeWorker("b", peers=fakes)
    await c.add_worker("b")
    assert [w.worker_id for w in c.pool.healthy()] == ["b"]
    assert [link.worker_id for link in c.pool.by_instance.values()] == ["a", "b"]


class _ChangingPolicy:
    """The real core, except that its next tick reports a layout change of `kind`."""

    def __init__(self, inner: object, kind: str) -> None:
        self._inner = inner
        self._kind: str | None = kind

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def tick(self, now: float) -> tuple[list[object], str | None]:
        migrations, _ = self._inner.tick(now)  # type: ignore[attr-defined]
        kind, self._kind = self._kind, None
        return migrations, kind


async def test_a_layout_change_is_counted_by_its_kind(started: list[Coordinator]) -> None:
    c, _ = await start(started, "a", "b", policy="cascade", stages=TWO_STAGES, tick_interval_s=0.01)
    c.policy = _ChangingPolicy(c.policy, "capacity")  # type: ignore[assignment]
    ticking = asyncio.create_task(c.tick_forever())
    try:
        await asyncio.sleep(0.1)
    finally:
        ticking.cancel()

    def counted(kind: str) -> float | None:
        name = "cascade_scheduler_plan_changes_total"
        return c.metrics.registry.get_sample_value(name, {"kind": kind})

    assert counted("capacity") == 1 and counted("refinement") is None
    assert c.counters.num_plan_changes == 1


async def test_a_request_left_without_any_worker_ends_once_the_link_timeout_passes(
    started: list[Coordinator],
) -> None:
    """The only worker dies with a request on it. The core keeps its last instance, but nothing
    is placed on that dead link (a worker restarted on its address would run the copy nobody
    follows); the request waits for a worker, and once none has been healthy for
    `worker_link_timeout_s` it ends with ABORT instead of waiting with no end."""
    c, fakes = await start(started, "a", tick_interval_s=0.01, worker_link_timeout_s=0.3)
    a = fakes["a"]
    rec = await submit(c, "r", 10)
    assert set(a.started) == {"r"}
    a.die()
    await settle()
    a.started.clear()
    ticking = asyncio.create_task(c.tick_forever())
    try:
        await asyncio.sleep(0.1)
        assert not rec.is_done, "within the link timeout it waits for a worker"
        assert not a.started, "placed on the dead link"
        await asyncio.sleep(0.5)
        assert rec.is_done and rec.finish == FinishReason.ABORT
        assert not a.started
    finally:
        ticking.cancel()


async def test_a_request_left_without_any_worker_goes_on_when_one_joins(
    started: list[Coordinator],
) -> None:
    c, fakes = await start(started, "a", tick_interval_s=0.01, worker_link_timeout_s=5)
    fakes["b"] = FakeWorker("b")
    rec = await submit(c, "r", 10)
    fakes["a"].die()
    await settle()
    ticking = asyncio.create_task(c.tick_forever())
    try:
        await asyncio.sleep(0.05)
        await c.add_worker("b")
        await asyncio.sleep(0.1)
        assert set(fakes["b"].started) == {"r"} and rec.worker_id == "b" and not rec.is_done
        assert [w.address for w in c.pool.healthy()] == ["b"]
    finally:
        ticking.cancel()


async def test_the_cluster_state_shows_nothing_running_on_a_worker_that_is_gone(
    started: list[Coordinator],
) -> None:
    c, fakes = await start(started, "a", "b")
    for address in ("a", "b"):
        fakes[address]._feed.put_nowait(
            worker_pb2.StepUpdate(worker_id=address, num_running=18, kv_blocks_used=564)
        )
    await settle()
    fakes["a"].die()
    await settle()

    class Context:
        pass

    state = await SchedulerServicer(c).GetClusterState(
        scheduler_pb2.GetClusterStateRequest(),
        Context(),  # type: ignore[arg-type]
    )
    shown = {w.address: w for w in state.workers}
    assert not shown["a"].is_healthy
    assert (shown["a"].num_running, shown["a"].kv_blocks_used) == (0, 0)
    # A live worker's own report, asked for at the call, is what shows for it.
    assert shown["b"].is_healthy
    assert (shown["b"].num_running, shown["b"].kv_blocks_used) == (
        (await fakes["b"].load(1.0)).num_running,
        (await fakes["b"].load(1.0)).kv_blocks_used,
    )


async def test_tokens_a_feed_never_sends_end_the_request_held_on_them(
    started: list[Coordinator],
) -> None:
    """A worker (broken or lying) finishes a request at an index past a gap it never fills, and
    floods tokens past its max_tokens. The client gets what it asked for at most, and the
    request ends ABORT after three link timeouts instead of hanging until the client gives up
    (for ever without a timeout)."""
    c, fakes = await start(started, "a", tick_interval_s=0.01, worker_link_timeout_s=0.1)
    a = fakes["a"]
    rec = await submit(c, "r", 10, max_tokens=50)
    a.step(Step("r", 0, (1, 2, 3), 13), Step("r", 10, tuple(range(5000)), 5013, LENGTH))
    await settle()
    assert rec.tokens == [1, 2, 3] and not rec.is_done
    assert len(rec.pending) == 40, "only the indices up to max_tokens are kept"
    assert c.metrics.tokens_past_max._value.get() == 1
    ticking = asyncio.create_task(c.tick_forever())
    try:
        await asyncio.sleep(0.15)
        assert not rec.is_done, "a gap may fill within the bound (a migration's source)"
        await asyncio.sleep(0.4)
        assert rec.is_done and rec.finish == FinishReason.ABORT
        await settle()
        assert a.aborted == ["r"]
    finally:
        ticking.cancel()


async def test_a_worker_that_says_it_holds_no_token_is_kept_out(
    started: list[Coordinator],
) -> None:
    """The first worker sets the length requests are admitted by: one that said 0 was taken
    in, and every request was then refused as "over 0 bytes"."""
    with pytest.raises(WorkerUnreachable, match="no request fits"):
        await start(started, "a", max_model_len=0)


async def test_requests_before_min_workers_joined_are_told_what_the_scheduler_waits_for(
    started: list[Coordinator],
) -> None:
    """One worker of min_workers 2 joined: requests were refused as "none joined yet", and
    nothing said the scheduler waited for more."""
    fakes = fake_cluster("a", "b")
    pool = WorkerPool(lambda address: fakes[address])
    c = Coordinator(SchedulerConfig(min_workers=2, policy="least-load"), pool)
    started.append(c)
    with capture_logs() as logs:
        await c.add_worker("a")
    waiting = [e for e in logs if e["event"] == "waiting_for_min_workers"]
    assert [(e["joined"], e["min_workers"]) for e in waiting] == [(1, 2)]
    with pytest.raises(SchedulingError, match=r"waiting for min_workers = 2 .*\(1 joined\)"):
        await submit(c, "r", 10)
    await c.add_worker("b")
    rec = await submit(c, "r", 10)
    assert rec.worker_id in ("a", "b")


async def test_a_tokenizer_of_another_size_than_the_workers_vocabulary_is_logged(
    started: list[Coordinator],
) -> None:
    """A 1,024-token tokenizer over workers of 32,000: every completion came back 200 with
    empty text (ids the tokenizer does not know decode to nothing), and nothing was logged."""
    from tokenizers import Tokenizer, models

    for vocab_size, event, level in [
        (32_000, "vocabulary_larger_than_tokenizer", "warning"),
        (2, "tokenizer_larger_than_vocabulary", "error"),
    ]:
        fakes = fake_cluster("a")
        fakes["a"].vocab_size = vocab_size
        c = Coordinator(SchedulerConfig(policy="least-load"), WorkerPool(fakes.get))
        started.append(c)
        c.tokenizer = Tokenizer(models.WordLevel({"x": 0, "y": 1, "z": 2}, unk_token="x"))
        with capture_logs() as logs:
            await c.add_worker("a")
            await c.add_worker("a")  # said once per worker
        said = [e for e in logs if "tokenizer" in e["event"]]
        assert [(e["event"], e["log_level"]) for e in said] == [(event, level)]
        assert (said[0]["tokenizer_tokens"], said[0]["worker_vocabulary"]) == (3, vocab_size)
        assert (await submit(c, "r", 10)).worker_id == "a", "the worker serves all the same"
