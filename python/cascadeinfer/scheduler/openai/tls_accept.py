"""The HTTPS front's own accept loop: each connection's first bytes are looked at (without
reading them) before the loop's TLS layer takes it, and connections in their handshake are
counted.

With `loop.create_server(ssl=...)` the TLS layer ran every handshake before the HTTP protocol
heard of the connection and told it nothing of one that failed, so:

- handshakes under way counted against no limit (`http_max_connections` counts connections the
  HTTP protocol knows): a flood was bounded only by what it opened within the handshake timeout;
- plain HTTP sent to the HTTPS port got an empty reply (the TLS layer closed the socket on the
  first bytes), where nginx answers 400 "The plain HTTP request was sent to HTTPS port".

Here a connection is accepted, its first byte is peeked (MSG_PEEK leaves it in the socket), and
a TLS record (0x16, a handshake) is handed to the loop's TLS layer untouched with
`loop.connect_accepted_socket`. (Starting TLS on a transport already made, `loop.start_tls`,
lost ClientHellos under uvloop: it reads a connection as soon as `connection_made` returns.)
Anything that starts like an HTTP method gets a 400 in the OpenAI error shape; other bytes are
closed on. Handshakes and connections together past the hard bound are closed as accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable

import structlog

from cascadeinfer.scheduler.openai.protocol import LINGER_S, MAX_LINGER_BYTES, error_answer

log = structlog.get_logger("cascade-scheduler")

TLS_HANDSHAKE_RECORD = 0x16
PLAIN_HTTP_MESSAGE = "plain HTTP was sent to this HTTPS port: use https://"


class TlsListener:
    """Accepts HTTPS connections on `sock` until `close`; has the `close` and `wait_closed`
    uvicorn's shutdown calls on the servers it started."""

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        protocol_factory: Callable[[], asyncio.Protocol],
        handshake_timeout_s: float,
        num_connections: Callable[[], int],
        max_connections: int,
    ) -> None:
        """`num_connections`: connections the HTTP protocol holds (past their handshake);
        with the handshakes under way they may be `max_connections` at most, the rest are
        closed as they are accepted."""
        self._sock = sock
        self._context = context
        self._protocol_factory = protocol_factory
        self._timeout_s = handshake_timeout_s
        self._num_connections = num_connections
        self._max_connections = max_connections
        self._handshakes: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._accept_forever(), name="https_accept")

    @property
    def num_handshakes(self) -> int:
        """Connections accepted whose TLS handshake is not over yet."""
        return len(self._handshakes)

    def close(self) -> None:
        """Stops accepting and drops the handshakes under way (the socket is the caller's)."""
        self._task.cancel()
        for task in list(self._handshakes):
            task.cancel()

    async def wait_closed(self) -> None:
        """Once `close` has taken effect: the accept loop and the handshakes are over."""
        await asyncio.gather(self._task, *self._handshakes, return_exceptions=True)

    async def _accept_forever(self) -> None:
        while True:
            try:
                conn, _ = await self._loop.sock_accept(self._sock)
            except OSError as e:  # out of descriptors, say: the next accept may work
                log.warning("https_accept_failed", error=repr(e))
                await asyncio.sleep(0.1)
                continue
            if self.num_handshakes + self._num_connections() >= self._max_connections:
                conn.close()
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._take(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _take(self, conn: socket.socket) -> None:
        """Hands `conn` to the TLS layer, answers plain HTTP, or closes it; never raises."""
        deadline = self._loop.time() + self._timeout_s
        try:
            first = await asyncio.wait_for(_peek(conn, self._loop), self._timeout_s)
            if first and first[0] == TLS_HANDSHAKE_RECORD:
                left = max(0.1, deadline - self._loop.time())
                await self._loop.connect_accepted_socket(
                    self._protocol_factory, conn, ssl=self._context, ssl_handshake_timeout=left
                )
                return  # the transport owns the socket now
            if first[:1].isalpha() and first[:1].isupper():  # a method: GET, POST, ...
                await _answer_plain_http(conn, self._loop)
        except (OSError, ssl.SSLError, TimeoutError):
            pass  # a failed handshake is the client's: nothing to log per connection
        except asyncio.CancelledError:
            conn.close()
            raise
        conn.close()


async def _peek(conn: socket.socket, loop: asyncio.AbstractEventLoop) -> bytes:
    """The first bytes the client sent, left unread in the socket; b"" once it closed."""
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(conn.fileno(), wake)
    try:
        await readable
    finally:
        loop.remove_reader(conn.fileno())
    return conn.recv(8, socket.MSG_PEEK)


async def _answer_plain_http(conn: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
    """400 in the OpenAI error shape, then what the client still sends is read and dropped for
    up to LINGER_S (a close with unread input resets the connection, which can destroy the
    answer before the client reads it)."""
    await loop.sock_sendall(conn, error_answer(400, "Bad Request", PLAIN_HTTP_MESSAGE))
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
    dropped = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER_S):
            while dropped <= MAX_LINGER_BYTES:
                data = await loop.sock_recv(conn, 65536)
                if not data:
                    return
                dropped += len(data)
