"""A daemon's gRPC health service on a port of its own (`--health-port`), open to callers
without a token and bounded in what they can make it hold.

On the API port a caller without the token is refused before its message is read, but an open
service's messages are read whole first, up to the port's message limit (64 MiB on a worker, a
KV block; 16 MiB on the scheduler, a text prompt). Partial messages to the open health service
therefore made daemons hold hundreds of MB for strangers (docs/reliability.md, "A seventeenth
probe", F2), and gRPC Python has no per-method limit or memory quota. So when a token guards
the API port, health there takes a token too, and probes that cannot send one (Kubernetes'
gRPC probe sends no metadata) use this port: it serves health alone, plaintext, with a message
limit a health request never reaches, a few streams per connection and a few hundred
connections, so what strangers can make it hold is a few MiB in all. A declared message over
the limit is refused before it is buffered (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from cascadeinfer.daemon import SERVER_OPTIONS
from cascadeinfer.security import TlsFiles, add_port

HEALTH_MESSAGE_LIMIT = 4096
"""Largest message the health port reads: a HealthCheckRequest is a service name."""
HEALTH_STREAMS_PER_CONNECTION = 8
"""Calls one connection may hold open at once (a probe makes one at a time; Watch holds one)."""
HEALTH_CONNECTIONS = 256
"""Connections the health port holds at once; those past it are closed as they arrive."""

HEALTH_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", HEALTH_MESSAGE_LIMIT),
    ("grpc.max_send_message_length", HEALTH_MESSAGE_LIMIT),
    ("grpc.max_concurrent_streams", HEALTH_STREAMS_PER_CONNECTION),
    ("grpc.max_allowed_incoming_connections", HEALTH_CONNECTIONS),
    *SERVER_OPTIONS,
]


def health_server(
    host: str, port: int, servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server, int]:
    """A server bound to `host`:`port`, not yet started, answering `servicer`'s statuses (the
    API port's own servicer, so both say the same), and the port it bound. Plaintext: the
    probes it is for speak no TLS, and a status is all it tells. A port that cannot be bound
    is a configuration error (ValueError)."""
    server = grpc.aio.server(options=HEALTH_SERVER_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return server, add_port(server, f"{host}:{port}", TlsFiles())
