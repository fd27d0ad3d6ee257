"""uvicorn's HTTP protocol (httptools) with the bounds it lacks on a request's head.

httptools buffers a request's headers without limit and uvicorn waits for them without a
deadline: one connection sending 20 MB of headers grew the scheduler by 17 MB, and one that
sends a byte every few seconds holds its connection (and its slot under `http_max_connections`)
forever. Here a head larger than `MAX_HEAD_BYTES` is answered 431 and one not complete within
`head_timeout_s` (the scheduler's `http_request_timeout_s`) of its first byte is answered 408;
either way the connection closes. A connection that sends nothing is closed after that time
too, and a request target (path and query) over `MAX_TARGET_BYTES` is answered 414 as it
arrives. (The body has its own bounds in the app: `HTTP_MAX_BODY_BYTES` and the same timeout.)

A request answered before its body came in whole (401, 404, 413) is another gap: uvicorn drops
the rest of the body as it arrives, but its first byte cancels the keep-alive timer and nothing
arms it again, so the connection stayed open with no deadline. Here the rest of the body must
arrive within `head_timeout_s` of the answer, and the connection is then idle under uvicorn's
keep-alive timeout as after any answer.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn._types import (
    ASGI3Application,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

MAX_HEAD_BYTES = 64 * 1024
"""Request line plus headers, at most (bearer tokens and the usual headers take a few hundred)."""
MAX_TARGET_BYTES = 8 * 1024
"""Longest request target (path and query) read; a longer one is answered 414 URI Too Long as
soon as it is over, and the connection closes. The front's paths are short (the longest names a
model, `/v1/models/NAME`) and it reads no query; nginx and Apache answer 414 past 8 KiB too.
Before, a target of up to 64 KiB was served and a longer one got the parser's plain 400
(httptools' `parse_url` keeps offsets in 16 bits)."""


LINGER_S = 2.0
"""After a refusal, input is read and dropped this long before the connection closes: closing a
socket with unread input sends a reset, which can destroy the answer before the client reads
it (a client still sending its oversized head would see a reset, not the 431)."""
MAX_LINGER_BYTES = 1 << 20
"""... or until this much was dropped."""


def error_answer(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer in the OpenAI error shape that closes the connection."""
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _too_many_connections(
    scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    """uvicorn's answer past `limit_concurrency` (plain text "Service Unavailable"), in the
    OpenAI error shape every other answer of this API has."""
    body = json.dumps(
        {
            "error": {
                "message": "too many open connections to this server (http_max_connections)",
                "type": "service_unavailable_error",
                "param": None,
                "code": None,
            }
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


EXCESS_CONNECTIONS = 256
"""Connections past `http_max_connections` that are still taken in, to answer their request
503 in JSON; the ones past these are closed at once. uvicorn counts its limit only when a
request arrives, so connections that send nothing were all taken in: 20,000 of them (no token
needed) used every descriptor of the scheduler, and its gRPC API, its metrics and its links to
workers stalled while they lasted."""


class _TargetTooLong(Exception):
    """Raised in the parser's URL callback, which stops the parser: the request goes no further,
    and uvicorn hands the failure to `send_400_response`, which answers 414 instead."""


class _CloseDelimitedCycle(RequestResponseCycle):
    """The exchange of an HTTP/1.0 request. uvicorn's httptools protocol sends a response
    without a Content-Length (a stream) in chunks whatever the request's version, and HTTP/1.0
    has no chunked coding (RFC 9112, 6.1: a server must not send it to a 1.0 client): the
    client reads the chunk sizes as data. Such a response here is delimited by closing the
    connection instead (RFC 9112, 6.3), which is how a 1.0 client reads any body without a
    length. Answers with a Content-Length are unchanged."""

    _is_close_delimited = False

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            names = {name.lower() for name, _ in message.get("headers", [])}
            if b"content-length" not in names and b"transfer-encoding" not in names:
                self._is_close_delimited = True
                self.chunked_encoding = False
                self.keep_alive = False  # the close ends the body
        elif message["type"] == "http.response.body" and self._is_close_delimited:
            # uvicorn counts a body down from its Content-Length, which this one has not: let
            # each piece through, and the last one end it.
            size = len(message.get("body", b""))
            self.expected_content_length = size + int(message.get("more_body", False))
        await super().send(message)


class BoundedHeadProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that refuses an oversized or never-ending request head, answers past
    the connection limit in JSON, and closes connections far past it as they come."""

    head_timeout_s = 30.0
    """From a request's first byte to the end of its headers, at most (set per server by
    `bounded_head_protocol`)."""
    _head_bytes = 0
    _in_head = False
    _dropped_bytes = -1
    """Bytes dropped since a refusal; -1 before any."""
    _is_target_too_long = False
    _head_deadline: asyncio.TimerHandle | None = None
    _body_deadline: asyncio.TimerHandle | None = None
    """Armed while the body of a request that was answered already is still coming."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self.limit_concurrency
        if limit is not None and len(self.connections) > limit + EXCESS_CONNECTIONS:
            transport.abort()  # connection_lost follows and forgets it
            return
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_deadline()
        self._stop_body_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._dropped_bytes >= 0:
            self._dropped_bytes += len(data)
            if self._dropped_bytes > MAX_LINGER_BYTES:
                self.transport.close()
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Still in the head after this chunk (a head that ended in it does not count).
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(
                431, "Request Header Fields Too Large", f"request head over {MAX_HEAD_BYTES} bytes"
            )

    def on_url(self, url: bytes) -> None:
        super().on_url(url)  # called once per piece of the target the parser has read
        if len(self.url) > MAX_TARGET_BYTES:
            self._is_target_too_long = True
            raise _TargetTooLong

    def send_400_response(self, msg: str) -> None:
        """A request the HTTP parser refuses (a bad Content-Length, both it and chunked, no
        request line), in the OpenAI error shape rather than uvicorn's plain text; 414 for a
        target stopped by `on_url`."""
        if self._is_target_too_long:
            # `_refuse` reads what the client still sends before it closes: it may be sending
            # the rest of its long target, and a close with unread input resets the connection.
            message = f"request target over {MAX_TARGET_BYTES} bytes"
            self._refuse(414, "URI Too Long", message)
            return
        self.transport.write(error_answer(400, "Bad Request", msg))
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # In the chunk that ended an answered request's body, the keep-alive timer armed then
        # must not cut the next request.
        self._unset_keepalive_if_required()
        if not self._in_head:
            self._start_head()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_deadline()
        super().on_headers_complete()
        # The exchange just made (started, or queued behind a pipelined one); its first send
        # comes later, from the app's task.
        cycle = self.cycle
        is_new = type(cycle) is RequestResponseCycle and not cycle.response_started
        if self.scope.get("http_version") == "1.0" and is_new:
            cycle.__class__ = _CloseDelimitedCycle

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._body_deadline is not None:  # the rest of an answered request's body is in
            self._stop_body_deadline()
            if not self.pipeline and not self.transport.is_closing():
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if cycle.response_complete and cycle.more_body and not self.transport.is_closing():
            self._stop_body_deadline()
            self._body_deadline = self.loop.call_later(self.head_timeout_s, self.transport.close)

    def _stop_body_deadline(self) -> None:
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        if app is service_unavailable:
            app = _too_many_connections
        super()._start_asgi_task(cycle, app)

    def _start_head(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._stop_head_deadline()
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _stop_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._in_head and self._head_bytes > 0:
            self._refuse(
                408,
                "Request Timeout",
                f"request head not complete within {self.head_timeout_s:g} s",
            )
        elif self._in_head:
            # Opened and silent: nothing to answer. uvicorn's keep-alive timeout covers idle
            # connections between requests, not before the first one.
            self.transport.close()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._in_head = False
        self._stop_head_deadline()
        if self.transport.is_closing():
            return
        self.transport.write(error_answer(status, reason, message))
        if not self.transport.can_write_eof():
            self.transport.close()  # TLS: no half-close
            return
        self.transport.write_eof()
        self._dropped_bytes = 0
        self.loop.call_later(LINGER_S, self.transport.close)


def bounded_head_protocol(head_timeout_s: float) -> type[BoundedHeadProtocol]:
    """The protocol class for one server, with its head timeout."""
    return type("BoundedHeadProtocol", (BoundedHeadProtocol,), {"head_timeout_s": head_timeout_s})
