"""Fake workers behind the coordinator's `WorkerClient` seam: each records what it was asked,
fails or stalls a call when a test says so, and emits the step updates a test writes, so the
coordinator's decisions run in-process without daemons. (The daemons' own behaviour is tested
against real workers elsewhere; these fakes stand in only for the wire.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from cascadeinfer.proto.v1 import common_pb2, worker_pb2
from cascadeinfer.scheduler.worker_client import FeedReader, WorkerCallError


@dataclass
class Step:
    """One request's part of a step update."""

    request_id: str
    first_index: int = 0
    token_ids: tuple[int, ...] = ()
    context_len: int = 0
    finish: int = common_pb2.FINISH_REASON_UNSPECIFIED


@dataclass
class FakeWorker:
    address: str
    max_model_len: int = 4096
    vocab_size: int = 0
    """What its info says of its vocabulary (0: nothing, as an engine that does not say)."""
    started: dict[str, worker_pb2.GenerateRequest] = field(default_factory=dict)
    """Requests started here, by id (moved-in ones included)."""
    aborted: list[str] = field(default_factory=list)
    refuse_start: grpc.StatusCode | None = None
    """Fail every start_detached with this status."""
    fail_migrate: grpc.StatusCode | None = None
    """Fail every migrate_out with this status."""
    hold_start: asyncio.Event | None = None
    """start_detached waits for this before it takes the request (a placement in flight)."""
    is_abort_unanswered: bool = False
    """abort gets no answer: it fails with DEADLINE_EXCEEDED once its timeout passes."""
    hold_migrate: asyncio.Event | None = None
    """migrate_out waits for this before it answers (a transfer in flight)."""
    migrated_context_len: int = 0
    """The context length migrate_out reports the request had when it moved."""
    refuses_ids_in_use: bool = False
    """start_detached refuses an id it runs already (not aborted) with ALREADY_EXISTS, as a
    real worker does."""
    peers: dict[str, FakeWorker] = field(default_factory=dict)
    is_draining: bool = False
    """Its feed opens saying it drains (SIGTERM came before the scheduler connected)."""
    is_closed: bool = False
    """The scheduler closed its client."""
    hold_load: asyncio.Event | None = None
    """load waits for this before it answers (a stalled worker)."""
    fail_load: grpc.StatusCode | None = None
    """Fail every load with this status."""
    num_calls: dict[str, int] = field(default_factory=dict)
    """Calls of info and load so far, by name."""
    requests_taken: list[tuple[str, str]] = field(default_factory=list)
    """("start" or "abort", request id) in the order the worker took them (a start once it
    holds the request)."""
    _feed: asyncio.Queue[worker_pb2.StepUpdate | WorkerCallError | None] = field(
        default_factory=asyncio.Queue
    )

    # --- what a test does ---------------------------------------------------------------
    def step(self, *steps: Step, is_draining: bool = False) -> None:
        """Emits one step update on this worker's feed."""
        update = worker_pb2.StepUpdate(worker_id=self.address, is_draining=is_draining)
        for s in steps:
            update.requests.append(
                worker_pb2.RequestStep(
                    request_id=s.request_id,
                    tokens=common_pb2.TokenChunk(first_index=s.first_index, token_ids=s.token_ids),
                    context_len=s.context_len,
                    finish_reason=s.finish,
                )
            )
        self._feed.put_nowait(update)

    def die(self) -> None:
        """Its feed breaks, as when the process is killed."""
        self._feed.put_nowait(WorkerCallError(grpc.StatusCode.UNAVAILABLE, "worker died"))

    # --- the WorkerClient interface -------------------------------------------------------
    async def info(self, timeout_s: float) -> worker_pb2.WorkerInfo:
        self.num_calls["info"] = self.num_calls.get("info", 0) + 1
        return worker_pb2.WorkerInfo(
            worker_id=self.address,
            engine="fake",
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
        )

    async def start_detached(self, request: worker_pb2.GenerateRequest, timeout_s: float) -> None:
        if self.refuse_start is not None:
            raise WorkerCallError(self.refuse_start, "refused by the fake")
        if self.hold_start is not None:
            await self.hold_start.wait()
        rid = request.request_id
        if self.refuses_ids_in_use and rid in self.started and rid not in self.aborted:
            raise WorkerCallError(grpc.StatusCode.ALREADY_EXISTS, f"request id {rid!r} is in use")
        self.started[rid] = request
        self.requests_taken.append(("start", rid))

    async def migrate_out(
        self, request_id: str, target_address: str, timeout_s: float, *, recompute: bool = False
    ) -> worker_pb2.MigrateOutResponse:
        if self.hold_migrate is not None:
            await self.hold_migrate.wait()
        if self.fail_migrate is not None:
            raise WorkerCallError(self.fail_migrate, "migration failed in the fake")
        self.peers[target_address].started[request_id] = self.started.pop(request_id)
        return worker_pb2.MigrateOutResponse(context_len=self.migrated_context_len)

    async def abort(self, request_id: str, timeout_s: float) -> None:
        if self.is_abort_unanswered:
            await asyncio.sleep(timeout_s)
            raise WorkerCallError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer from the fake")
        self.aborted.append(request_id)
        self.requests_taken.append(("abort", request_id))

    async def step_feed(self, reader: FeedReader) -> AsyncIterator[worker_pb2.StepUpdate]:
        # A client closed before this feed opened ended the feed it had, not this one: a
        # real worker opens a new stream.
        queued = [self._feed.get_nowait() for _ in range(self._feed.qsize())]
        for item in queued:
            if item is not None:
                self._feed.put_nowait(item)
        # Like a real worker, the feed opens with a snapshot of what runs here (all detached).
        snapshot = worker_pb2.StepUpdate(worker_id=self.address, is_draining=self.is_draining)
        for rid in self.started:
            snapshot.requests.append(worker_pb2.RequestStep(request_id=rid, is_detached=True))
        yield snapshot
        while True:
            item = await self._feed.get()
            if item is None:
                return
            if isinstance(item, WorkerCallError):
                raise item
            yield item

    async def load(self, timeout_s: float) -> worker_pb2.LoadReport:
        self.num_calls["load"] = self.num_calls.get("load", 0) + 1
        if self.hold_load is not None:
            try:
                async with asyncio.timeout(timeout_s):
                    await self.hold_load.wait()
            except TimeoutError:
                raise WorkerCallError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer") from None
        if self.fail_load is not None:
            raise WorkerCallError(self.fail_load, "load failed in the fake")
        return worker_pb2.LoadReport(
            worker_id=self.address, num_running=len(self.started), is_draining=self.is_draining
        )

    async def close(self) -> None:
        self.is_closed = True
        self._feed.put_nowait(None)


def fake_cluster(*addresses: str) -> dict[str, FakeWorker]:
    """Fake workers that know each other (a migration moves a request between them)."""
    fakes = {a: FakeWorker(a) for a in addresses}
    for f in fakes.values():
        f.peers = fakes
    return fakes
