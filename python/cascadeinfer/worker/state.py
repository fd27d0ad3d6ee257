"""What the worker's handlers share: identity, engine loop, stream hub, metrics, channels."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from cascadeinfer.proto.v1 import worker_pb2_grpc
from cascadeinfer.security import TlsFiles, aio_channel
from cascadeinfer.worker.claim import SchedulerClaim
from cascadeinfer.worker.engine_loop import EngineLoop
from cascadeinfer.worker.hub import Hub
from cascadeinfer.worker.kv_stream import ImportBudget
from cascadeinfer.worker.metrics import WorkerMetrics

MAX_PEERS = 64
"""Peer channels kept open (more workers than a cluster migrates between at once)."""
MIGRATION_DEADLINE_S = 60
"""How long a migration's transfer may take (MigrateOut's ImportKV deadline)."""
RANK_TO_RANK_RETRY_S = 300.0
"""After the rank-to-rank road to a target failed, its moves take the ImportKV stream for this
long: a road that is cut (a firewall between the ranks' ports) costs each move a rank's whole
wait for an answer before it falls back."""

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
    claim: SchedulerClaim = field(default_factory=SchedulerClaim)
    """The scheduler this worker serves, held while its step feeds are open."""
    import_budget: ImportBudget = field(default_factory=ImportBudget)
    """KV blocks the imports in flight hold in memory, bounded together by the free KV."""
    _peers: OrderedDict[str, tuple[grpc.aio.Channel, WorkerServiceAsyncStub]] = field(
        default_factory=OrderedDict
    )
    _closing: set[asyncio.Task[None]] = field(default_factory=set)
    _rank_to_rank_down: OrderedDict[str, float] = field(default_factory=OrderedDict)
    """Targets whose rank-to-rank road failed, until when it is not tried."""

    def may_go_rank_to_rank(self, target: str, now: float) -> bool:
        until = self._rank_to_rank_down.get(target)
        if until is not None and now >= until:
            del self._rank_to_rank_down[target]
        return until is None or now >= until

    def rank_to_rank_failed(self, target: str, now: float) -> None:
        self._rank_to_rank_down[target] = now + RANK_TO_RANK_RETRY_S
        self._rank_to_rank_down.move_to_end(target)
        while len(self._rank_to_rank_down) > MAX_PEERS:
            self._rank_to_rank_down.popitem(last=False)

    def peer(self, address: str) -> WorkerServiceAsyncStub:
        """A cached stub for another worker (migration targets). The cache keeps the
        MAX_PEERS most recently used: a caller naming ever new targets must not grow it."""
        entry = self._peers.get(address)
        if entry is not None:
            self._peers.move_to_end(address)
            return entry[1]
        channel = aio_channel(address, self.tls, self.token, self.link_options)
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        self._peers[address] = (channel, stub)
        if len(self._peers) > MAX_PEERS:
            _, (oldest, _) = self._peers.popitem(last=False)
            # A migration may still use it: its calls get their deadline's time to end.
            task = asyncio.create_task(oldest.close(grace=MIGRATION_DEADLINE_S))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return stub

    async def close(self) -> None:
        for channel, _ in self._peers.values():
            await channel.close()
        for task in list(self._closing):
            task.cancel()
