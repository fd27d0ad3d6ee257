"""The Prometheus scrape endpoint of both daemons (`--metrics-port`), with bounds.

prometheus_client's own `start_http_server` gives every connection a thread and never times
one out: a few hundred idle connections held as many threads and descriptors for good (an
adversarial probe ran a scheduler out of descriptors with them). Here a connection that sends
nothing for `read_timeout_s` is closed, at most MAX_CONNECTIONS are served at
once (others are closed at once: a scrape retries), and a port that cannot be bound is a
configuration error (ValueError: exit status 2), not a traceback.

The read timeout is per read: a client sending a byte a second never hit it, and 32 of them held
every slot, so no scrape was served. The whole request head therefore has a deadline too,
`head_timeout_s` from the connection's accept; a connection past it is closed.

The page itself is rendered at a bounded rate (`metrics_page`): each render runs under the GIL,
beside the daemon's event loop, so 32 connections scraping without pause slowed the loop as a
flood of the API port's `/metrics` did.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS

from cascadeinfer.metrics_page import MetricsPage

READ_TIMEOUT_S = 10.0
"""A connection's socket reads and writes time out after this long."""
HEAD_TIMEOUT_S = 10.0
"""A connection's request head (request line and headers) must be in within this long of its
accept, however steadily its bytes come."""
MAX_CONNECTIONS = 32
"""Connections served at once; a Prometheus server scrapes with one."""


class _HeadDeadlineReader(io.RawIOBase):
    """The socket's input, each read bounded by the time left to `deadline` (monotonic) as well
    as by the per-read `timeout`: past the deadline, reads raise TimeoutError."""

    def __init__(self, sock: socket.socket, timeout: float, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._timeout = timeout
        self.deadline: float | None = deadline
        """None once the head is in (the answer's writes keep the plain per-call timeout)."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request head not complete in time")
            self._sock.settimeout(min(self._timeout, left))
        return self._sock.recv_into(buffer)


class _Handler(WSGIRequestHandler):
    timeout = READ_TIMEOUT_S  # StreamRequestHandler puts it on the socket
    head_timeout_s = HEAD_TIMEOUT_S
    _reader: _HeadDeadlineReader

    def setup(self) -> None:
        super().setup()
        # The handler is made as its thread starts, right after the accept.
        deadline = time.monotonic() + self.head_timeout_s
        self.rfile.close()  # the plain buffered socket file, replaced (the socket stays open)
        self._reader = _HeadDeadlineReader(self.connection, self.timeout, deadline)
        self.rfile = io.BufferedReader(self._reader)

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the headers
        self._reader.deadline = None
        self.connection.settimeout(self.timeout)
        return parsed

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes are not worth a log line each


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 128
    """The listen backlog. socketserver's 5 dropped the SYNs of a burst of connections (32 took
    5 s to connect, in 1 s retries), connections past MAX_CONNECTIONS are closed at once anyway."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out or went away: nothing to report


class _Server6(_Server):
    address_family = socket.AF_INET6


def _scrape_app(page: MetricsPage) -> Callable[..., Iterable[bytes]]:
    """prometheus_client's WSGI app as Prometheus uses it (GET on any path, OpenMetrics or
    the text format as the Accept header asks, gzip where accepted), serving `page`. Its
    `name[]` filter is left out: each filter would be a page of its own to render."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] != "GET":
            start_response("405 Method Not Allowed", [("Allow", "GET")])
            return [b""]
        _, asked = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        is_openmetrics = asked.startswith("application/openmetrics-text")
        is_gzipped = gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", ""))
        headers = [("Content-Type", OPENMETRICS if is_openmetrics else CONTENT_TYPE_PLAIN_0_0_4)]
        if is_gzipped:
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [page.get(is_openmetrics=is_openmetrics, is_gzipped=is_gzipped)]

    return app


def serve_metrics(
    host: str,
    port: int,
    registry: CollectorRegistry,
    read_timeout_s: float = READ_TIMEOUT_S,
    head_timeout_s: float = HEAD_TIMEOUT_S,
) -> WSGIServer:
    """Serves `registry` at http://host:port/ (any path) from a daemon thread; the server is
    returned so a caller can `shutdown()` it."""
    handler = type(
        "_TimedHandler", (_Handler,), {"timeout": read_timeout_s, "head_timeout_s": head_timeout_s}
    )
    server_class = _Server6 if ":" in host else _Server
    try:
        server = make_server(
            host,
            port,
            _scrape_app(MetricsPage(registry)),
            server_class=server_class,
            handler_class=handler,
        )
    except OSError as e:
        raise ValueError(
            f"cannot serve metrics on {host}:{port}: {e.strerror or e} (the port is in use, or "
            "the host is not an address of this machine)"
        ) from None
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
