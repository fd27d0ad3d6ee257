"""A worker serves one scheduler at a time, all real subprocesses on loopback: a second scheduler
started against the same worker is refused it, and the first one's running requests run to
their end, where before the second took them for leftovers of a crashed scheduler and aborted
them; once the first stops, the second takes the worker and serves."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cascadeinfer.launcher import SCHEDULER, spawn, wait_serving
from cascadeinfer.proto.v1 import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

from tests.worker.daemons import SIM_WORKER, free_port, start_scheduler, workers
from tests.worker.streams import generate_request

MAX_TOKENS = 1500
"""Long enough on a sim worker (a few ms a step) to run while the second scheduler starts."""


def generate(address: str, rid: str, max_tokens: int) -> list[scheduler_pb2.ClientGenerateResponse]:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(address))
    request = scheduler_pb2.ClientGenerateRequest(
        request_id=rid,
        prompt_token_ids=scheduler_pb2.TokenIds(ids=[5] * 50),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )
    return list(stub.Generate(request, timeout=120))


def wait_for_line(log_path: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log_path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not in {log_path.read_text()[-3000:]}"
        time.sleep(0.1)


def test_a_second_scheduler_is_refused_the_worker_until_the_first_lets_it_go(
    tmp_path: Path,
) -> None:
    with workers([SIM_WORKER], tmp_path) as (worker,):
        first = start_scheduler(["--workers", worker.address, "--policy", "least-load"], tmp_path)
        process = None
        try:
            results: dict[int, list[scheduler_pb2.ClientGenerateResponse]] = {}
            streams = [
                threading.Thread(
                    target=lambda k=k: results.__setitem__(
                        k, generate(first.address, f"first-{k}", MAX_TOKENS)
                    )
                )
                for k in range(4)
            ]
            for t in streams:
                t.start()
            deadline = time.monotonic() + 30
            while worker.stub().GetLoad(worker_pb2.GetLoadRequest()).num_running < 4:
                assert time.monotonic() < deadline, "the first scheduler's requests never ran"
                time.sleep(0.05)

            process, log_path = spawn(
                SCHEDULER, ["--workers", worker.address, "--policy", "least-load"], tmp_path
            )
            wait_for_line(log_path, "worker_serves_another_scheduler", 30)
            assert "ghost_aborted" not in log_path.read_text()
            for t in streams:
                t.join(timeout=120)
            for k in range(4):
                tokens = sum(len(r.tokens.token_ids) for r in results[k])
                assert results[k][-1].finish_reason == common_pb2.FINISH_REASON_LENGTH, k
                assert tokens == MAX_TOKENS, k
            assert process.poll() is None, "the refused scheduler keeps trying"

            first.stop()  # its feed closes: the worker is free for the next scheduler
            second = wait_serving(process, log_path, 60)  # all its --workers linked
            finished = generate(second.address, "second-0", 20)
            assert finished[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert sum(len(r.tokens.token_ids) for r in finished) == 20
        finally:
            first.kill()
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=60)


def test_a_feed_named_by_another_scheduler_is_refused_while_one_is_open(tmp_path: Path) -> None:
    with workers([SIM_WORKER], tmp_path) as (worker,):
        stub = worker.stub()
        held = stub.StreamSteps(worker_pb2.StreamStepsRequest(scheduler_id="a" * 32))
        next(held)  # the snapshot: the worker is held now
        again = stub.StreamSteps(worker_pb2.StreamStepsRequest(scheduler_id="a" * 32))
        next(again)  # the same scheduler linking again is let in
        anonymous = stub.StreamSteps(worker_pb2.StreamStepsRequest())
        next(anonymous)  # a reader that places nothing is let in
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.StreamSteps(worker_pb2.StreamStepsRequest(scheduler_id="b" * 32)))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "a" * 32 in (refused.value.details() or "")
        with pytest.raises(grpc.RpcError) as too_long:
            next(stub.StreamSteps(worker_pb2.StreamStepsRequest(scheduler_id="c" * 65)))
        assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        held.cancel()
        again.cancel()
        deadline = time.monotonic() + 10
        while True:  # the worker sees both cancellations, then takes the other scheduler
            try:
                next(stub.StreamSteps(worker_pb2.StreamStepsRequest(scheduler_id="b" * 32)))
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert time.monotonic() < deadline, "the hold outlived its feeds"
                time.sleep(0.1)
        anonymous.cancel()


def feed(stub: worker_pb2_grpc.WorkerServiceStub, sid: str, started: float, serving: bool) -> Any:
    return stub.StreamSteps(
        worker_pb2.StreamStepsRequest(
            scheduler_id=sid, scheduler_started_at_s=started, scheduler_is_serving=serving
        )
    )


def test_a_scheduler_that_serves_or_started_first_takes_a_worker_over(tmp_path: Path) -> None:
    with workers([SIM_WORKER], tmp_path) as (worker,):
        stub = worker.stub()
        later = feed(stub, "later", 200.0, False)
        next(later)
        # Neither serves yet: the one started first takes the worker (two schedulers started
        # together each held part of their list and waited for the rest for good).
        first = feed(stub, "first", 100.0, False)
        next(first)
        with pytest.raises(grpc.RpcError) as ended:
            list(later)
        assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'first' took this worker over" in (ended.value.details() or "")
        with pytest.raises(grpc.RpcError) as refused:
            next(feed(stub, "later", 200.0, False))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # One that serves clients takes it from one still linking its list, started first or
        # not (a standby held the worker a serving scheduler lost for a moment).
        serving = feed(stub, "serving", 300.0, True)
        next(serving)
        with pytest.raises(grpc.RpcError):
            list(first)
        # ... and keeps it against anyone, serving or not: what runs there is its own.
        for sid, started, is_serving in (("early", 1.0, False), ("other", 1.0, True)):
            with pytest.raises(grpc.RpcError) as kept:
                next(feed(stub, sid, started, is_serving))
            assert kept.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # A placement named by another scheduler is refused; the holder's is taken.
        batch = worker_pb2.StartBatch(requests=[generate_request("placed", [3] * 20, 4)])
        batch.requests[0].detach = True
        results = list(
            stub.StartDetached(iter([batch]), metadata=(("cascade-scheduler-id", "first"),))
        )
        assert results[0].results[0].code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert worker.stub().GetLoad(worker_pb2.GetLoadRequest()).num_running == 0
        results = list(
            stub.StartDetached(iter([batch]), metadata=(("cascade-scheduler-id", "serving"),))
        )
        assert results[0].results[0].code == 0
        serving.cancel()


def test_two_schedulers_started_together_on_the_same_workers_end_with_one_serving(
    tmp_path: Path,
) -> None:
    with workers([SIM_WORKER] * 2, tmp_path) as daemons:
        addresses = [d.address for d in daemons]
        started = [
            spawn(SCHEDULER, ["--workers", ",".join(order), "--policy", "least-load"], tmp_path)
            for order in (addresses, addresses[::-1])
        ]
        try:
            deadline = time.monotonic() + 60
            serving: list[int] = []
            while not serving:
                assert time.monotonic() < deadline, "neither scheduler serves"
                serving = [
                    k for k, (_, log) in enumerate(started) if "serving on" in log.read_text()
                ]
                time.sleep(0.2)
            time.sleep(3)  # the other one keeps waiting, refused
            assert [
                k for k, (_, log) in enumerate(started) if "serving on" in log.read_text()
            ] == serving
            process, log_path = started[serving[0]]
            one = wait_serving(process, log_path, 10)
            finished = generate(one.address, "after-the-race", 20)
            assert sum(len(r.tokens.token_ids) for r in finished) == 20
        finally:
            for process, _ in started:
                process.terminate()
                process.wait(timeout=60)


def test_a_worker_registering_with_a_scheduler_another_one_holds_it_for_is_refused_cleanly(
    tmp_path: Path,
) -> None:
    port = free_port()
    with workers([[*SIM_WORKER, "--scheduler", f"127.0.0.1:{port}"]], tmp_path) as (worker,):
        holder = start_scheduler(["--workers", worker.address, "--policy", "least-load"], tmp_path)
        other = None
        try:
            other = start_scheduler(["--port", str(port), "--policy", "least-load"], tmp_path)
            wait_for_line(worker.log_path, "scheduler_refused_worker", 30)
            assert "AssertionError" not in worker.log()  # FAILED_PRECONDITION, not UNKNOWN
            assert "this worker serves scheduler" in worker.log()
            wait_for_line(other.log_path, "worker_serves_another_scheduler", 30)
            assert "Traceback" not in other.log() and "AssertionError" not in other.log()
            finished = generate(holder.address, "still-the-holder's", 20)
            assert sum(len(r.tokens.token_ids) for r in finished) == 20
        finally:
            holder.stop()
            if other is not None:
                other.stop()
