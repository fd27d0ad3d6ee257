"""The workers the scheduler knows: their gRPC stubs, dense instance ids for the core, health,
and the latest load each reported."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from cascadeinfer.daemon import keepalive_options
from cascadeinfer.proto.v1 import worker_pb2, worker_pb2_grpc
from cascadeinfer.security import TlsFiles, aio_channel

if TYPE_CHECKING:
    from cascadeinfer.proto.v1.worker_pb2_grpc import WorkerServiceAsyncStub


class WorkerUnreachable(Exception):
    """A worker answered its info call but its step feed did not come up."""


@dataclass
class WorkerLink:
    worker_id: str
    address: str
    instance: int
    channel: grpc.aio.Channel
    stub: WorkerServiceAsyncStub
    info: worker_pb2.WorkerInfo
    is_healthy: bool = True
    is_gone: bool = False
    """Its step feed ended: nothing it ran is running there any more."""
    last_step: worker_pb2.StepUpdate | None = None
    running: set[str] = field(default_factory=set)
    """Request ids the scheduler placed (or moved) here and that have not finished."""


class WorkerPool:
    def __init__(self, tls: TlsFiles, token: str = "", link_timeout_s: float = 10.0) -> None:
        self._tls = tls
        self._token = token
        self._options = keepalive_options(link_timeout_s)
        self.by_id: dict[str, WorkerLink] = {}
        self.by_instance: dict[int, WorkerLink] = {}
        self._next_instance = 0

    async def connect(self, address: str, worker_id: str = "") -> WorkerLink:
        """Opens a channel and reads the worker's info; raises grpc.aio.AioRpcError when down."""
        channel = aio_channel(address, self._tls, self._token, self._options)
        stub: WorkerServiceAsyncStub = worker_pb2_grpc.WorkerServiceStub(channel)
        try:
            info = await stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=10)
        except grpc.aio.AioRpcError:
            await channel.close()
            raise
        link = WorkerLink(
            worker_id or info.worker_id or address,
            address,
            self._next_instance,
            channel,
            stub,
            info,
        )
        self._next_instance += 1
        self.by_id[link.worker_id] = link
        self.by_instance[link.instance] = link
        return link

    async def drop(self, link: WorkerLink) -> None:
        """Forgets a link that never joined (its feed did not come up) and closes it."""
        if self.by_id.get(link.worker_id) is link:
            del self.by_id[link.worker_id]
        self.by_instance.pop(link.instance, None)
        await link.channel.close()

    def healthy(self) -> list[WorkerLink]:
        return [w for w in self.by_id.values() if w.is_healthy]

    async def close(self) -> None:
        for link in self.by_id.values():
            await link.channel.close()
