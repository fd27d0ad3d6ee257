"""What the coordinator asks of one worker, as an interface: the gRPC client the daemon uses,
and the seam tests put fakes into (tests/scheduler/fake_workers.py), so the coordinator's
decisions (admission, back-pressure, migrations, recovery) run without daemons.

Every failed call raises `WorkerCallError` with the gRPC status the coordinator decides by
(NOT_FOUND: the worker no longer has the request; INVALID_ARGUMENT/ALREADY_EXISTS: it refuses
it; anything else: it could not be reached), never a transport's own exception type.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc

from cascadeinfer.proto.v1 import worker_pb2, worker_pb2_grpc
from cascadeinfer.scheduler.start_stream import StartStream
from cascadeinfer.scheduler.worker_errors import WorkerCallError
from cascadeinfer.security import TlsFiles, aio_channel
from cascadeinfer.wire import PLACED_BY_KEY

__all__ = ["GrpcWorkerClient", "WorkerCallError", "WorkerClient"]

if TYPE_CHECKING:
    from cascadeinfer.proto.v1.worker_pb2_grpc import WorkerServiceAsyncStub


class WorkerClient(Protocol):
    """One worker, as the scheduler uses it."""

    async def info(self, timeout_s: float) -> worker_pb2.WorkerInfo:
        """Its id, model and limits."""
        ...

    async def start_detached(self, request: worker_pb2.GenerateRequest, timeout_s: float) -> None:
        """Starts a request that runs on after the call returns (its tokens come on the step
        feed); returns once the worker accepted it. A caller cancelled meanwhile leaves no
        copy running there (the worker is told to abort it once it has accepted it)."""
        ...

    async def migrate_out(
        self, request_id: str, target_address: str, timeout_s: float, *, recompute: bool = False
    ) -> worker_pb2.MigrateOutResponse:
        """Moves a running request to the worker at `target_address`; returns once it runs
        there (a failure leaves it running here, or resumed here). `recompute`: the target
        computes the request's KV again instead of receiving it."""
        ...

    async def abort(self, request_id: str, timeout_s: float) -> None: ...

    def step_feed(self, reader: FeedReader) -> AsyncIterator[worker_pb2.StepUpdate]:
        """Every engine step's update, from a snapshot of what runs there; ends (or raises
        WorkerCallError) when the worker is gone. `reader` names the scheduler: a worker serves
        one scheduler at a time, and refuses (or ends, when taken over) another's feed with
        FAILED_PRECONDITION (`worker/claim.py`)."""
        ...

    async def load(self, timeout_s: float) -> worker_pb2.LoadReport: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class FeedReader:
    """The scheduler opening a step feed, as the worker ranks it (`worker/claim.py`)."""

    scheduler_id: str
    started_at_s: float
    """Unix time."""
    is_serving: bool
    """It serves clients: its --workers list is linked."""


class GrpcWorkerClient:
    """A worker over its gRPC API (the channel carries TLS and the cluster's token)."""

    def __init__(self, channel: grpc.aio.Channel, scheduler_id: str = "") -> None:
        self._channel = channel
        self._stub: WorkerServiceAsyncStub = worker_pb2_grpc.WorkerServiceStub(channel)
        self._placed_by = ((PLACED_BY_KEY, scheduler_id),) if scheduler_id else ()
        """Names this scheduler on its placements: a worker takes them from the scheduler that
        holds it only (`worker/claim.py`)."""
        self._starts: StartStream | None = StartStream(self._stub, self._placed_by)
        """Batched starts; None for a worker without StartDetached (an older version), which
        gets one detached Generate call per start."""

    @classmethod
    def connect(
        cls,
        address: str,
        tls: TlsFiles,
        token: str,
        options: Sequence[tuple[str, int]] = (),
        scheduler_id: str = "",
    ) -> GrpcWorkerClient:
        return cls(aio_channel(address, tls, token, options), scheduler_id)

    async def info(self, timeout_s: float) -> worker_pb2.WorkerInfo:
        try:
            return await self._stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _call_error(e) from None

    async def start_detached(self, request: worker_pb2.GenerateRequest, timeout_s: float) -> None:
        if self._starts is not None:
            try:
                return await self._starts.start(request, timeout_s)
            except WorkerCallError as e:
                if e.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
            starts, self._starts = self._starts, None
            await starts.close()
        try:
            async for _ in self._stub.Generate(
                request, timeout=timeout_s, metadata=self._placed_by
            ):
                pass
        except grpc.aio.AioRpcError as e:
            raise _call_error(e) from None

    async def migrate_out(
        self, request_id: str, target_address: str, timeout_s: float, *, recompute: bool = False
    ) -> worker_pb2.MigrateOutResponse:
        mode = worker_pb2.MIGRATION_MODE_RECOMPUTE if recompute else worker_pb2.MIGRATION_MODE_KV
        request = worker_pb2.MigrateOutRequest(
            request_id=request_id, target_address=target_address, mode=mode
        )
        try:
            return await self._stub.MigrateOut(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _call_error(e) from None

    async def abort(self, request_id: str, timeout_s: float) -> None:
        try:
            await self._stub.Abort(
                worker_pb2.AbortRequest(request_id=request_id), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as e:
            raise _call_error(e) from None

    async def step_feed(self, reader: FeedReader) -> AsyncIterator[worker_pb2.StepUpdate]:
        try:
            asked = worker_pb2.StreamStepsRequest(
                scheduler_id=reader.scheduler_id,
                scheduler_started_at_s=reader.started_at_s,
                scheduler_is_serving=reader.is_serving,
            )
            async for update in self._stub.StreamSteps(asked):
                yield update
        except grpc.aio.AioRpcError as e:
            raise _call_error(e) from None

    async def load(self, timeout_s: float) -> worker_pb2.LoadReport:
        try:
            return await self._stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _call_error(e) from None

    async def close(self) -> None:
        if self._starts is not None:
            await self._starts.close()
        await self._channel.close()


def _call_error(e: grpc.aio.AioRpcError) -> WorkerCallError:
    return WorkerCallError(e.code(), e.details() or "")
