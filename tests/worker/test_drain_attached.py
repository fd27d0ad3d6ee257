"""A worker that a scheduler placed requests on exits as soon as its drain is over. Real
scheduler and sim worker daemons on loopback; the workers register themselves (`--scheduler`).

The scheduler keeps a StartDetached stream open to each worker it placed on, for its next
placements; a drained worker's gRPC server used to wait its whole stop grace (5 s) for it, so
each drain took 5 s more than it needed (docs/reliability.md, "A ninth adversarial probe").
The worker now ends that stream itself once its drain is over."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from cascadeinfer.worker.servicer import until_set

from tests.worker.daemons import SIM_WORKER, Daemon, start_scheduler, start_worker

MAX_EXIT_S = 3.0
"""Generous on a loaded machine: the drain itself takes well under 1 s here; before the fix
the exit came after more than 5 s."""


def _stub(scheduler: Daemon) -> scheduler_pb2_grpc.SchedulerServiceStub:
    return scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(scheduler.address))


def _request(rid: str, max_tokens: int) -> scheduler_pb2.ClientGenerateRequest:
    return scheduler_pb2.ClientGenerateRequest(
        request_id=rid,
        prompt_token_ids=scheduler_pb2.TokenIds(ids=list(range(1, 31))),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )


def _wait_placeable(scheduler: Daemon, n: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = _stub(scheduler).GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=10)
        in_stages = {i for s in state.stages for i in s.worker_ids}
        if sum(w.is_healthy and w.worker_id in in_stages for w in state.workers) == n:
            return
        time.sleep(0.1)
    raise AssertionError(f"{n} workers are not placeable")


def _seconds_to_exit(worker: Daemon) -> float:
    signalled = time.monotonic()
    assert worker.stop() == 0
    return time.monotonic() - signalled


def test_an_idle_worker_a_scheduler_placed_on_exits_at_once(tmp_path: Path) -> None:
    scheduler = start_scheduler(["--min-workers", "1"], tmp_path)
    worker = None
    try:
        worker = start_worker([*SIM_WORKER, "--scheduler", scheduler.address], tmp_path)
        _wait_placeable(scheduler, 1)
        # A placement opens the scheduler's StartDetached stream to the worker.
        last = list(_stub(scheduler).Generate(_request("one", 20), timeout=30))[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        took = _seconds_to_exit(worker)
        assert took < MAX_EXIT_S, f"an idle worker took {took:.1f} s to drain"
        assert '"event": "stopped"' in worker.log()
    finally:
        if worker is not None:
            worker.kill()
        scheduler.stop()


def test_a_worker_whose_requests_moved_away_exits_once_they_did(tmp_path: Path) -> None:
    """The request runs on the leaving worker at SIGTERM; the scheduler moves it to the other
    worker, the client's stream goes on without a gap, and the leaving worker exits then."""
    scheduler = start_scheduler(["--min-workers", "1", "--policy", "least-load"], tmp_path)
    started: list[Daemon] = []
    try:
        join = [*SIM_WORKER, "--scheduler", scheduler.address]
        leaving = start_worker(join, tmp_path)
        started.append(leaving)
        _wait_placeable(scheduler, 1)
        tokens: list[int] = []
        finish: list[int] = []
        flowing = threading.Event()

        def read() -> None:
            for r in _stub(scheduler).Generate(_request("long", 4000), timeout=120):
                assert r.tokens.first_index == len(tokens), "gap or duplicate"
                tokens.extend(r.tokens.token_ids)
                flowing.set()
                if r.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    finish.append(r.finish_reason)

        reader = threading.Thread(target=read)
        reader.start()
        assert flowing.wait(30)
        started.append(start_worker(join, tmp_path))
        _wait_placeable(scheduler, 2)
        assert not finish, "the request ended before the drain; make it longer"
        took = _seconds_to_exit(leaving)
        reader.join(120)
        assert finish == [common_pb2.FINISH_REASON_LENGTH]
        assert len(tokens) == 4000
        assert '"event": "migrated_out"' in leaving.log()
        assert took < MAX_EXIT_S, f"the drain took {took:.1f} s"
    finally:
        for w in started:
            w.kill()
        scheduler.stop()


async def test_the_stream_stops_reading_once_the_drain_is_over() -> None:
    """What the worker's StartDetached reads through: items until the event, then the read
    under way is cancelled, also when the reader itself is cancelled."""
    sent: asyncio.Queue[int] = asyncio.Queue()
    cancelled: list[int] = []

    async def items() -> AsyncIterator[int]:
        while True:
            try:
                yield await sent.get()
            except asyncio.CancelledError:
                cancelled.append(1)
                raise

    drained = asyncio.Event()
    got: list[int] = []

    async def consume() -> None:
        async for item in until_set(items(), drained):
            got.append(item)

    reader = asyncio.create_task(consume())
    sent.put_nowait(1)
    sent.put_nowait(2)
    await asyncio.sleep(0.01)
    drained.set()
    await asyncio.wait_for(reader, 1)
    assert got == [1, 2] and cancelled == [1]
    reader = asyncio.create_task(consume())  # set already: ends at once
    await asyncio.wait_for(reader, 1)
    assert got == [1, 2]
    drained.clear()
    reader = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    reader.cancel()
    await asyncio.sleep(0.01)
    assert len(cancelled) == 2, "the read under way outlived its reader"
