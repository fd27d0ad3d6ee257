"""Runs the OpenAI front under uvicorn on the scheduler's own event loop, so routes call the
coordinator directly (no thread hops, no locks). The scheduler keeps its signal handlers:
uvicorn's are switched off and the scheduler stops it as part of its own shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import ssl
from collections.abc import Iterator

import structlog
import uvicorn

from cascadeinfer.scheduler.config import SchedulerConfig
from cascadeinfer.scheduler.coordinator import Coordinator
from cascadeinfer.scheduler.openai.app import OpenAIFront
from cascadeinfer.scheduler.openai.model_files import load_model_files
from cascadeinfer.scheduler.openai.protocol import EXCESS_CONNECTIONS, bounded_head_protocol
from cascadeinfer.scheduler.openai.tls_accept import TlsListener
from cascadeinfer.security import is_loopback

HANDSHAKE_TIMEOUT_S = 10.0
"""An HTTPS connection whose TLS handshake is not done this long after its accept (or within
`http_request_timeout_s`, where that is shorter) is closed. uvicorn leaves asyncio's default,
60 s: connections that never finished a handshake were held a minute each."""
STOP_GRACE_S = 3
"""How long connections still open when the scheduler stops get to finish their answers (the
scheduler ended their requests first, so they only have a last event to write), then are cut."""


log = structlog.get_logger("cascade-scheduler")


def connection_limit(configured: int, descriptor_limit: int) -> int:
    """The open HTTP connections to allow: `configured` (http_max_connections), lowered so
    that they and the EXCESS_CONNECTIONS taken in past them hold at most half of the process's
    `descriptor_limit`, the rest left to gRPC clients, worker links, metrics and files. Under a
    soft limit of 1,024 (systemd's default) 8,192 connections would starve every other port."""
    if descriptor_limit == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, descriptor_limit // 2 - EXCESS_CONNECTIONS))


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, handshake_timeout_s: float) -> None:
        super().__init__(config)
        self.handshake_timeout_s = handshake_timeout_s

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's startup for the listening sockets given (the only way this front starts).
        HTTPS goes through the front's own accept loop (`TlsListener`), with the handshake
        timeout uvicorn has no setting for, and with handshakes under way counted against the
        connection bound."""
        assert sockets is not None
        await self.lifespan.startup()  # "off": nothing to run
        config = self.config
        loop = asyncio.get_running_loop()

        def create_protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=loop,
            )

        if config.ssl is not None:
            # Our own accept loop (tls_accept.py): handshakes count against the connection
            # bound, and plain HTTP gets a 400 instead of an empty reply.
            limit = config.limit_concurrency
            bound = limit + EXCESS_CONNECTIONS if limit is not None else 1 << 30
            for sock in sockets:
                sock.listen(config.backlog)
            self.servers = [
                TlsListener(  # type: ignore[misc]
                    sock,
                    config.ssl,
                    create_protocol,
                    self.handshake_timeout_s,
                    lambda: len(self.server_state.connections),
                    bound,
                )
                for sock in sockets
            ]
        else:
            self.servers = [
                await loop.create_server(create_protocol, sock=sock, backlog=config.backlog)
                for sock in sockets
            ]
        self.started = True


class HttpFront:
    def __init__(
        self, server: _Server, task: asyncio.Task[None], url: str, front: OpenAIFront
    ) -> None:
        self._server = server
        self._task = task
        self._front = front
        self.url = url
        """The OpenAI base URL, http(s)://HOST:PORT/v1."""

    def model_names(self) -> list[str]:
        """The model names requests may ask for now (empty before any worker is known)."""
        return self._front.served_names()

    async def stop(self) -> None:
        """Stops taking connections; those still open get STOP_GRACE_S, then are cut. A
        request whose body is still arriving is answered 503 at once."""
        self._front.refuse_bodies_in_flight()
        self._server.should_exit = True
        await self._task


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket for host:port; a port in use is a configuration error (exit 2)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ValueError(f"http_port = {port}: cannot listen on {host}:{port} ({e})") from None
    sock.setblocking(False)
    return sock


async def start_http_front(config: SchedulerConfig, coordinator: Coordinator) -> HttpFront:
    """Binds --http-port (0 picks a free one) and serves until `HttpFront.stop`."""
    assert config.http_port is not None and coordinator.tokenizer is not None
    files = load_model_files(coordinator.tokenizer, config.tokenizer, config.chat_template)
    front = OpenAIFront(
        coordinator,
        files,
        tokens=config.client_api_tokens,
        model_name=config.served_model_name,
        body_timeout_s=config.http_request_timeout_s,
        max_body_bytes_in_flight=config.http_max_body_bytes_in_flight,
        serves_loopback_names_only=(
            not config.client_api_tokens
            and is_loopback(config.host)
            and not config.tls.require_client_cert
        ),
    )
    sock = _bind(config.host, config.http_port)
    # As `serve` left it (`daemon.raise_descriptor_limit`).
    descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    max_connections = connection_limit(config.http_max_connections, descriptors)
    if max_connections < config.http_max_connections:
        log.warning(
            "http_max_connections_lowered",
            configured=config.http_max_connections,
            allowed=max_connections,
            open_files_limit=descriptors,
            hint="raise the open-files limit (ulimit -n, LimitNOFILE=) to serve more",
        )
    uv_config = uvicorn.Config(
        front.app(),
        log_config=None,
        access_log=False,
        lifespan="off",
        ws="none",
        http=bounded_head_protocol(config.http_request_timeout_s),
        proxy_headers=False,  # the front reads no client address; skip the per-request rewrite
        limit_concurrency=max_connections,
        timeout_graceful_shutdown=STOP_GRACE_S,
        ssl_certfile=config.tls.cert or None,
        ssl_keyfile=config.tls.key or None,
        # mTLS holds for the HTTP API as for gRPC: without it, a scheduler that required
        # client certificates (and so needed no token to start on a public address) served
        # its OpenAI API to anyone.
        ssl_ca_certs=config.tls.ca or None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if config.tls.require_client_cert else ssl.CERT_NONE,
    )
    server = _Server(uv_config, min(HANDSHAKE_TIMEOUT_S, config.http_request_timeout_s))
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the HTTP front stopped while starting")
        await asyncio.sleep(0.01)
    host, port = sock.getsockname()[:2]
    scheme = "https" if config.tls.cert else "http"
    shown = f"[{host}]" if ":" in host else host
    return HttpFront(server, task, f"{scheme}://{shown}:{port}/v1", front)
