"""gRPC health for the daemons: statuses set without waiting on any caller, and a port of its own
(`--health-port`) for probes that send no token, bounded in what strangers can make it hold.

On the API port a caller without the token is refused before its message is read, but an open
service's messages are read whole first, up to the port's message limit (64 MiB on a worker, a
KV block; 16 MiB on the scheduler, a text prompt). Partial messages to the open health service
therefore made daemons hold hundreds of MB for strangers (docs/reliability.md, "A seventeenth
probe", F2), and gRPC Python has no per-method limit or memory quota. So when a token guards
the API port, health there takes a token too, and probes that cannot send one (Kubernetes'
gRPC probe sends no metadata) use the health port: it answers `Check` alone, plaintext, with
a message limit a health request never reaches, one call a connection, a bounded number of
connections, and short idle and age bounds on each.
"""

from __future__ import annotations

import asyncio
from typing import TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cascadeinfer.daemon import SERVER_OPTIONS
from cascadeinfer.security import TlsFiles, add_port

Status: TypeAlias = int
"""A `HealthCheckResponse.ServingStatus` value."""
Context: TypeAlias = grpc.aio.ServicerContext[
    health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
]


class HealthService(health_pb2_grpc.HealthServicer):
    """`grpc.health.v1.Health` whose statuses change without waiting on any watcher.

    grpc_health's asyncio servicer writes to each Watch stream while holding the lock its `set`
    takes, so one Watch whose caller granted no flow-control window (a stranger's, on an open
    port) froze every status change behind it: a worker told to stop never got past marking
    itself NOT_SERVING and ignored SIGTERM, one starting never finished, and both went on
    answering SERVING (docs/reliability.md, "An eighteenth probe", F1). Here `set` only records
    and wakes; each Watch writes from its own handler, so a stuck one holds itself alone."""

    def __init__(self, service: str) -> None:
        """The daemon's `service` and the whole server ("") share one status, NOT_SERVING
        until `set`."""
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        self._statuses: dict[str, Status] = {"": not_serving, service: not_serving}
        self._changed = asyncio.Event()
        self._is_closed = False

    def set(self, status: Status) -> None:
        """Records the daemon's status; every Watch sends the new one."""
        for service in self._statuses:
            self._statuses[service] = status
        self._wake()

    def close(self) -> None:
        """Ends every Watch (OK), so a stopping server's grace is not spent waiting on them."""
        self._is_closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: Context,
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: Context,
    ) -> None:
        sent = None
        while True:
            changed = self._changed  # before reading: a change from here on wakes us
            status = self._statuses.get(
                request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            )
            if status != sent:
                try:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    # The caller left while the write waited on it: gRPC fails the write
                    # (ExecuteBatchError) without cancelling the handler, and logged it at
                    # error level with a traceback, a line strangers could write at will.
                    raise asyncio.CancelledError from e
                sent = status
            if self._is_closed:
                return  # after the last status: a stopping daemon's NOT_SERVING
            await changed.wait()


HEALTH_MESSAGE_LIMIT = 4096
"""Largest message the health port reads: a HealthCheckRequest is a service name."""
HEALTH_STREAMS_PER_CONNECTION = 1
"""Calls one connection may hold open at once (a probe makes one at a time). Each call open
costs gRPC tens of kB whatever its message: partial 4 KiB messages on 250 connections took a
scheduler from 72 to 125 MiB with 8 a connection, to 112 with 2 (docs/reliability.md, "An
eighteenth probe", F3)."""
HEALTH_CONNECTIONS = 512
"""Connections the health port holds at once; those past it are closed as they arrive. Any
bound can be filled: a caller holding them all refuses every probe until the idle and age
bounds below close his connections, for as long as he keeps opening new ones. What bounds that
is where the port listens (an address only the probes reach), not a count."""
IDLE_MS = 5_000
"""A health port connection with no call open is closed after this long (the API ports wait
30 s, `daemon.IDLE_CONNECTION_MS`): a probe calls once and leaves, so idle connections held
there are mostly a flood's."""
CONNECTION_AGE_MS = 30_000
"""A health port connection is closed after this long (and CONNECTION_AGE_GRACE_MS for a call
in progress): a call whose message never completes holds its stream, and the idle bound spares
a connection with a call open, so without it strangers could hold every slot for as long as
they liked."""
CONNECTION_AGE_GRACE_MS = 5_000

_HEALTH_OWN = {"grpc.max_connection_idle_ms", "grpc.max_concurrent_streams"}
"""Options of every server (`daemon.SERVER_OPTIONS`) the health port sets its own way."""

HEALTH_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", HEALTH_MESSAGE_LIMIT),
    ("grpc.max_send_message_length", HEALTH_MESSAGE_LIMIT),
    ("grpc.max_concurrent_streams", HEALTH_STREAMS_PER_CONNECTION),
    ("grpc.max_allowed_incoming_connections", HEALTH_CONNECTIONS),
    ("grpc.max_connection_idle_ms", IDLE_MS),
    ("grpc.max_connection_age_ms", CONNECTION_AGE_MS),
    ("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_MS),
    *((name, value) for name, value in SERVER_OPTIONS if name not in _HEALTH_OWN),
]


class _CheckOnly(health_pb2_grpc.HealthServicer):
    """`service`'s Check; Watch is UNIMPLEMENTED here. Probes check, and a Watch is a stream
    that lasts as long as its caller likes: 256 of them locked every probe out of the port."""

    def __init__(self, service: HealthService) -> None:
        self._service = service

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: Context,
    ) -> health_pb2.HealthCheckResponse:
        return await self._service.Check(request, context)


def health_server(host: str, port: int, service: HealthService) -> grpc.aio.Server:
    """A server bound to `host`:`port`, not yet started, answering `service`'s Check (the API
    port's own service, so both say the same). Plaintext: the probes it is for speak no TLS,
    and a status is all it tells. A port that cannot be bound is a configuration error
    (ValueError)."""
    server = grpc.aio.server(options=HEALTH_SERVER_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(_CheckOnly(service), server)
    add_port(server, f"{host}:{port}", TlsFiles())
    return server
