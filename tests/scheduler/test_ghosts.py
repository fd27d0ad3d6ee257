"""Requests the scheduler lost track of do not run on as ghosts. Real scheduler and sim worker
daemons on loopback.

A scheduler killed (SIGKILL) while requests run leaves them on the workers: their clients got
an error and nobody will read their tokens. A restarted scheduler reconciles each worker's
step feed snapshot with what it knows and aborts the rest; a scheduler that never comes back,
or hangs, is covered by the workers' own bound (--orphan-timeout-s: a detached request no step
feed has followed that long is aborted; keepalive, --link-timeout-s, drops the feed of a
scheduler that stopped answering)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2

from tests.worker.daemons import SIM_WORKER, Daemon, free_port, start_scheduler, start_worker

SLOW_SIM = [*SIM_WORKER, "--sim-time-scale", "3"]
"""Steps slow enough that 4000 tokens take minutes: a ghost would still run at the bound."""
NUM_STREAMS = 6
BOUND_S = 15.0


def num_requests(worker: Daemon) -> int:
    load = worker.stub().GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
    return int(load.num_running + load.num_waiting)


def wait_workers(address: str, count: int, timeout: float = 60) -> None:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=10)
        if state.stages and sum(w.is_healthy for w in state.workers) == count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{count} workers did not register with {address}")


def start_streams(address: str) -> tuple[list[threading.Thread], dict[int, grpc.StatusCode]]:
    """Long client streams; returns once each has a token. Their ends land in the dict."""
    stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(address))
    ends: dict[int, grpc.StatusCode] = {}
    started = [threading.Event() for _ in range(NUM_STREAMS)]

    def one(i: int) -> None:
        request = scheduler_pb2.ClientGenerateRequest(
            request_id=f"g-{i}",
            prompt_token_ids=scheduler_pb2.TokenIds(ids=[i + 1] * (40 + i)),
            sampling=common_pb2.SamplingParams(max_tokens=4000, ignore_eos=True),
        )
        try:
            for _ in stub.Generate(request, timeout=120):
                started[i].set()
            ends[i] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            ends[i] = e.code()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(NUM_STREAMS)]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(60), "a stream never started"
    return threads, ends


def wait_idle(workers: list[Daemon], bound_s: float) -> float:
    """Seconds until every worker runs nothing; fails past `bound_s`."""
    started = time.monotonic()
    while True:
        counts = [num_requests(w) for w in workers]
        if sum(counts) == 0:
            return time.monotonic() - started
        assert time.monotonic() - started < bound_s, f"ghosts still running: {counts}"
        time.sleep(0.2)


@pytest.mark.parametrize("scenario", ["restarted", "gone-for-good", "frozen"])
def test_requests_of_a_lost_scheduler_are_reaped_on_the_workers(
    tmp_path: Path, scenario: str
) -> None:
    """restarted: SIGKILL, then the same scheduler again, whose reconcile must act well before
    the workers' own bound. gone-for-good: SIGKILL only. frozen: SIGSTOP, so its connections
    stay up but it answers nothing; the workers' keepalive (2 s) drops its feeds, then the
    orphan bound applies."""
    port = free_port()
    args = ["--port", str(port), "--min-workers", "2", "--policy", "least-load"]
    scheduler = start_scheduler(args, tmp_path)
    join = ["--scheduler", scheduler.address, "--link-timeout-s", "2"]
    orphan_timeout = "60" if scenario == "restarted" else "3"
    workers: list[Daemon] = []
    try:
        for _ in range(2):
            workers.append(
                start_worker([*SLOW_SIM, *join, "--orphan-timeout-s", orphan_timeout], tmp_path)
            )
        wait_workers(scheduler.address, 2)
        threads, ends = start_streams(scheduler.address)
        assert sum(num_requests(w) for w in workers) == NUM_STREAMS
        if scenario == "frozen":
            scheduler.process.send_signal(signal.SIGSTOP)
        else:
            scheduler.kill()  # a crash: no aborts reach the workers
            if scenario == "restarted":
                scheduler = start_scheduler(args, tmp_path)
        took = wait_idle(workers, BOUND_S)
        print(f"ghosts reaped {took:.1f} s after the scheduler was lost")
        scheduler.kill()
        for t in threads:
            t.join(30)
        assert len(ends) == NUM_STREAMS, "a client hung after the scheduler died"
        assert all(code == grpc.StatusCode.UNAVAILABLE for code in ends.values()), ends
        if scenario == "restarted":
            assert "ghost_aborted" in scheduler.log()
            assert "orphan_reaped" not in "".join(w.log() for w in workers)
        else:
            assert "orphan_reaped" in "".join(w.log() for w in workers)
    finally:
        for w in workers:
            w.kill()
        scheduler.kill()
