"""Nothing is lost when a worker drains, and the scheduler's health tells the truth. Real
scheduler and sim worker daemons on loopback.

SIGTERM on a worker: it stops admitting and says so on its step feed; the scheduler moves its
running requests to the other worker. With no time to move them (--drain-timeout-s 0) the worker
aborts them and ends its feed, and the scheduler resumes them elsewhere by recompute. Either
way every client stream ends with all its tokens, equal to an unmoved run."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.worker.daemons import SIM_WORKER, start_scheduler, start_worker, workers
from tests.worker.streams import run_to_end

SLOW_SIM = [*SIM_WORKER, "--sim-time-scale", "3"]
NUM_STREAMS = 6
MAX_TOKENS = 500


def client_request(prompt: list[int], rid: str) -> scheduler_pb2.ClientGenerateRequest:
    return scheduler_pb2.ClientGenerateRequest(
        request_id=rid,
        prompt_token_ids=scheduler_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
    )


def wait_workers(stub: scheduler_pb2_grpc.SchedulerServiceStub, n: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=10)
        if sum(w.is_healthy for w in state.workers) == n and state.stages:
            return
        time.sleep(0.1)
    raise AssertionError(f"{n} workers did not register")


@pytest.mark.parametrize(
    ("drain_timeout_s", "sig"),
    [(60, signal.SIGTERM), (0, signal.SIGTERM), (60, signal.SIGHUP)],
    ids=["moved-away", "resumed-elsewhere", "moved-away-on-SIGHUP"],
)
def test_a_draining_worker_loses_no_request(
    tmp_path: Path, drain_timeout_s: int, sig: signal.Signals
) -> None:
    """The workers register themselves (so the leaving one also deregisters). SIGHUP (the
    terminal it was started from closed) drains as SIGTERM does; it used to kill the worker."""
    scheduler = start_scheduler(["--min-workers", "2", "--policy", "least-load"], tmp_path)
    join = ["--scheduler", scheduler.address]
    leaving_args = [*SLOW_SIM, *join, "--drain-timeout-s", str(drain_timeout_s)]
    fast = [*SIM_WORKER, "--sim-time-scale", "0"]  # same tokens, no step sleep
    try:
        with workers([leaving_args, [*SLOW_SIM, *join], fast], tmp_path) as (
            leaving,
            _,
            reference,
        ):
            stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(scheduler.address))
            wait_workers(stub, 2)
            prompts = [[(17 * i + k) % 200 + 1 for k in range(30 + i)] for i in range(NUM_STREAMS)]
            references = [
                run_to_end(reference.stub(), f"ref-{i}", p, MAX_TOKENS)
                for i, p in enumerate(prompts)
            ]
            results: dict[int, tuple[list[int], scheduler_pb2.ClientGenerateResponse]] = {}
            started = [threading.Event() for _ in prompts]

            def one(i: int) -> None:
                tokens: list[int] = []
                last = scheduler_pb2.ClientGenerateResponse()
                for r in stub.Generate(client_request(prompts[i], f"c-{i}"), timeout=120):
                    assert r.tokens.first_index == len(tokens), "gap or duplicate"
                    tokens.extend(r.tokens.token_ids)
                    last = r
                    started[i].set()
                results[i] = (tokens, last)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(NUM_STREAMS)]
            for t in threads:
                t.start()
            for e in started:
                assert e.wait(60)
            signalled = time.monotonic()
            leaving.process.send_signal(sig)
            assert leaving.process.wait(timeout=60) == 0
            exited_after_s = time.monotonic() - signalled
            for t in threads:
                t.join(120)
            assert sorted(results) == list(range(NUM_STREAMS)), "a client stream did not end"
            for i in range(NUM_STREAMS):
                tokens, last = results[i]
                assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
                assert tokens == references[i]
            if drain_timeout_s:
                assert any(last.timings.num_migrations for _, last in results.values())
                assert exited_after_s < 15, "requests were moved away, not waited for"
            else:
                assert "aborted_at_shutdown" in leaving.log()
    finally:
        scheduler.stop()


def health(address: str) -> int:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status)


def wait_health(address: str, status: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while health(address) != status:
        assert time.monotonic() < deadline, f"health is not {status}"
        time.sleep(0.1)


def test_health_is_serving_only_while_requests_can_be_placed(tmp_path: Path) -> None:
    scheduler = start_scheduler(["--min-workers", "2"], tmp_path)
    started = []
    try:
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert health(scheduler.address) == not_serving, "no worker yet"
        join = ["--scheduler", scheduler.address]
        started.append(start_worker([*SIM_WORKER, *join], tmp_path))
        time.sleep(1.0)  # registered by now (it registers as soon as it serves)
        assert health(scheduler.address) == not_serving, "one worker of the two it needs"
        started.append(start_worker([*SIM_WORKER, *join], tmp_path))
        wait_health(scheduler.address, health_pb2.HealthCheckResponse.SERVING)
    finally:
        for w in started:
            w.kill()
        scheduler.stop()
