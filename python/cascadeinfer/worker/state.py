"""What the worker's handlers share: identity, engine loop, stream hub, metrics, channels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from cascadeinfer.proto.v1 import worker_pb2_grpc
from cascadeinfer.security import TlsFiles, aio_channel
from cascadeinfer.worker.engine_loop import EngineLoop
from cascadeinfer.worker.hub import Hub
from cascadeinfer.worker.metrics import WorkerMetrics

if TYPE_CHECKING:
    from cascadeinfer.proto.v1.worker_pb2_grpc import WorkerServiceAsyncStub


@dataclass
class WorkerState:
    worker_id: str
    engine_name: str
    loop: EngineLoop
    hub: Hub
    metrics: WorkerMetrics
    tls: TlsFiles = field(default_factory=TlsFiles)
    """Credentials for links to peers (migration targets)."""
    token: str = field(default="", repr=False)
    """The cluster's bearer token, sent to peers."""
    link_options: list[tuple[str, int]] = field(default_factory=list)
    """Channel options for links to peers (keepalive)."""
    is_draining: bool = False
    _stubs: dict[str, WorkerServiceAsyncStub] = field(default_factory=dict)
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    def peer(self, address: str) -> WorkerServiceAsyncStub:
        """A cached stub for another worker (migration targets)."""
        stub = self._stubs.get(address)
        if stub is None:
            channel = aio_channel(address, self.tls, self.token, self.link_options)
            self._channels.append(channel)
            stub = self._stubs[address] = worker_pb2_grpc.WorkerServiceStub(channel)
        return stub

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
