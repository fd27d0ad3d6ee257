"""What every cascade daemon shares: gRPC message limits, strict request decoding, JSON logging,
and the `main` wrapper that turns a bad configuration into a clear error and exit code 2."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc
import structlog

GRPC_MESSAGE_LIMIT = 64 << 20
"""Explicit send/receive limit for every channel and server (KV chunks stay at 1 MiB)."""

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT),
]

RECONNECT_BACKOFF_MS = 1000
"""Longest wait between a daemon's attempts to reach a peer that is down. gRPC's default grows
to 120 s, and the state is kept per address across channels (its subchannel pool is global):
a `--workers` worker back after a minute's outage rejoined 11.6 s after it served (1.5 s with
these options), though the scheduler asked every second with a new channel each time."""

RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
    ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
]
"""Channel options of the links between daemons: a peer that restarts is found within about
RECONNECT_BACKOFF_MS of serving."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals that stop a daemon gracefully (drain, end streams with an error event). SIGHUP is
one: a daemon started from a shell gets it when the terminal closes, and its default killed
the daemon mid-stream; there is no configuration to reload."""


IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)
"""Signals whose default (to end the process at once) a daemon does not take: log rotation
tools send SIGUSR1, and each of these killed a daemon mid-stream with no drain. Logged and
ignored; only the STOP_SIGNALS stop a daemon."""


def ignore_stray_signals() -> None:
    """Installs IGNORED_SIGNALS' handler (a log line each). Python handlers, not SIG_IGN: a
    child the daemon starts with exec (vLLM's engine processes) gets the defaults back."""

    def say(signum: int, _frame: object) -> None:
        structlog.get_logger(__name__).warning("signal_ignored", signal=signal.Signals(signum).name)

    for sig in IGNORED_SIGNALS:
        signal.signal(sig, say)


PARENT_PID_ENV = "CASCADE_STOP_WITH_PARENT_PID"
"""Set by a launcher (`cascade up`) to its pid: the daemon stops as on SIGTERM when that
process ends (`stop_with_parent`)."""

_PR_SET_PDEATHSIG = 1


def stop_with_parent() -> None:
    """Ties this daemon's life to the launcher's named in PARENT_PID_ENV: SIGTERM when it
    ends, so the daemon drains and exits. Without it, `cascade up` killed with SIGKILL (an
    OOM kill, `kill -9`, a supervisor's last resort) left its workers and scheduler serving,
    with nobody to stop them and its token in /tmp. The variable is taken out of the
    environment (what this daemon starts is its own). A launcher already gone when the tie is
    made means nobody started this daemon that can stop it: it exits at once."""
    parent = os.environ.pop(PARENT_PID_ENV, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes  # Linux only: prctl has no Python binding

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return
    if os.getppid() != int(parent):
        print("the launcher that started this daemon has exited: not starting", file=sys.stderr)
        sys.exit(1)


def keepalive_options(timeout_s: float) -> list[tuple[str, int]]:
    """Pings that find a silent peer within about `timeout_s`: a ping every half of it, and
    the link is broken when one goes unanswered for the other half. Without them a cut link
    (a host or switch gone, no TCP reset) leaves calls waiting for many minutes."""
    half_ms = max(int(timeout_s * 500), 100)
    return [
        ("grpc.keepalive_time_ms", half_ms),
        ("grpc.keepalive_timeout_ms", half_ms),
        ("grpc.http2.ping_timeout_ms", half_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


HANDSHAKE_TIMEOUT_MS = 10_000
"""How long a new connection to a gRPC server may take to finish its TLS handshake and send
HTTP/2's opening settings. gRPC's default, 120 s, let 20,000 connections that sent nothing hold
every descriptor of the scheduler for two minutes, its HTTP and gRPC APIs and its worker links
stalled (docs/reliability.md, "A second adversarial probe"); a client on a real network needs a
few round trips."""

IDLE_CONNECTION_MS = 30_000
"""How long a gRPC server keeps a connection that carries no call. gRPC's default is for ever:
2,000 connections that finished their handshake and sent nothing more were held as long as
their client liked, and 1,100 of them took every descriptor of a scheduler limited to 1,024
(docs/reliability.md, "A thirteenth adversarial probe"). A client whose channel idles that
long gets a GOAWAY, and its channel connects again at its next call, as gRPC channels do.
Streams (a worker's step feed, a client's Generate) are calls: they are never idle."""

STREAMS_PER_CONNECTION = 256
"""Most calls one connection carries at once (gRPC's default: no bound). A caller that opens
streams and resets them at once (HTTP/2 "rapid reset", CVE-2023-44487) had grpc-python start a
call for each, and run the token check's refusal: four such connections for 8 s took a
scheduler from 79 to 236 MB, kept, at 1.5 cores, and a client's 20-token call beside them took
up to 1.75 s (0.13 s alone). With the bound, gRPC's core refuses the streams past it before
Python sees them: 121 MB, and the call beside them at most 0.14 s (docs/reliability.md, "A
nineteenth probe"). A client that wants more calls at once on one connection waits for a slot
(gRPC's clients honour the setting) or opens another channel."""

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
    ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
    ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
]
"""Every server: gRPC binds with SO_REUSEPORT by default, so a second daemon started on a port
another one serves on would share it, the kernel spreading new connections over both (clients
and workers reaching a server other than the one they were given). Without it, that second
bind fails (`security.add_port` turns that into a configuration error). Connections that do
not start speaking within HANDSHAKE_TIMEOUT_MS are closed, and so are those that carry no call
for IDLE_CONNECTION_MS (`connection_limit_options` bounds how many there are at once); one
carries at most STREAMS_PER_CONNECTION calls at once."""

MAX_GRPC_CONNECTIONS = 10_000
"""Most connections one gRPC server holds at once, however many descriptors it may open: far
more than a fleet's workers and clients (a client should hold one channel, not one connection
per call), and about 0.5 GB of gRPC's buffers when each holds little."""


def connection_limit_options(descriptor_limit: int) -> list[tuple[str, int]]:
    """A gRPC server's bound on the connections it holds: MAX_GRPC_CONNECTIONS, and at most a
    quarter of the process's `descriptor_limit` (the HTTP front may take half, the rest is for
    the links to workers, metrics and files). Connections past it are closed as they arrive,
    so a flood of idle connections refuses new gRPC clients for a while (IDLE_CONNECTION_MS)
    instead of starving every port of the daemon, its links to the workers included."""
    allowed = MAX_GRPC_CONNECTIONS
    if descriptor_limit != resource.RLIM_INFINITY:
        allowed = max(16, min(allowed, descriptor_limit // 4))
    return [("grpc.max_allowed_incoming_connections", allowed)]


def raise_descriptor_limit() -> int:
    """Raises the soft limit on open files to the hard one (as vLLM's servers and nginx's
    `worker_rlimit_nofile` do) and returns the soft limit now in force. Every connection a
    daemon serves holds a descriptor, and systemd's default soft limit, 1,024, is a few hundred
    idle connections away from starving every port."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


PING_TOLERANCE = [
    ("grpc.http2.min_ping_interval_without_data_ms", 100),
    ("grpc.http2.max_ping_strikes", 0),
]
"""Server side: accept the peers' keepalive pings however idle the calls are (gRPC's default
answers pings more often than every 5 minutes with GOAWAY, which would break an idle step feed)."""

C = TypeVar("C")


def configure_logging() -> None:
    """structlog JSON lines on stderr; handlers bind request_id, daemons bind their own id.
    Records of the standard `logging` module (uvicorn's, grpc's, asyncio's) at WARNING and
    above come out the same way, named by their `logger`, a traceback as `exception`."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso"),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)  # what logging's last-resort handler showed before


EVENT_LOOP_ENV = "CASCADE_EVENT_LOOP"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (a dependency on Linux and macOS), else
    asyncio's; CASCADE_EVENT_LOOP=asyncio picks asyncio's. A daemon's data plane is made of
    loop callbacks (gRPC completions, stream wakeups, HTTP writes): uvloop runs them at a
    fraction of the cost (docs/benchmarks.md, "Data plane")."""
    choice = os.environ.get(EVENT_LOOP_ENV, "uvloop")
    if choice not in ("uvloop", "asyncio"):
        raise ValueError(f"{EVENT_LOOP_ENV}={choice!r}: use uvloop or asyncio")
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


MAX_SECONDS = 1e6
"""The largest duration (or rate) a configuration takes: about 11.6 days, past any real
timeout and short of where gRPC's C integers and nanosecond deadlines overflow (a link timeout
of 1e7 s ended a daemon with an OverflowError traceback, and a call timeout of 1e10 s failed
every call at once as past its deadline)."""


def check_seconds(name: str, value: float, *, may_be_zero: bool = False) -> None:
    """A duration (or a rate) of the configuration is a finite number above zero (or at least
    zero) and at most MAX_SECONDS: NaN passed every `value <= 0` check, and NaN or infinity
    then broke the daemon later (a traceback as it set up keepalive, a scheduler that died at
    its first tick) or quietly turned a bound off (orphaned requests never reaped)."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    is_above = value >= 0 if may_be_zero else value > 0
    if not (is_number and math.isfinite(value) and is_above and value <= MAX_SECONDS):
        bound = ">= 0" if may_be_zero else "> 0"
        raise ValueError(
            f"{name} = {value!r}: must be a finite number {bound} and at most {MAX_SECONDS:g}"
        )


def check_port(name: str, value: int) -> None:
    """A port to listen on is in [0, 65535] (0: any free one): a metrics port out of range
    ended the daemon with the socket module's OverflowError and a traceback."""
    if not 0 <= value < 65536:
        raise ValueError(f"{name} = {value}: must be in [0, 65535]")


def check_distinct_ports(ports: dict[str, int | None]) -> None:
    """The ports a daemon listens on, by name, are apart (0 and None, any free one or none,
    excepted): two equal ones failed at the second bind with "the port is in use, or the host
    is not an address of this machine", naming neither flag."""
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if not port:
            continue
        if port in seen:
            raise ValueError(
                f"{seen[port]} and {name} are both {port}: each needs a port of its own"
            )
        seen[port] = name


def check_address(name: str, address: str) -> None:
    """An address to dial is HOST:PORT ([IPv6]:PORT) with a port in [1, 65535]: without a
    port a daemon retried an address that can never answer, and a port past 65535 wrapped
    around in the resolver, so 127.0.0.1:70000 dialled port 4464 without a word."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{name}: {address!r} is not HOST:PORT (a port in [1, 65535])")


class FatalError(Exception):
    """The daemon cannot go on (an essential background task died): `run_daemon` exits 1 after
    the daemon has shut down, so its supervisor restarts it."""


def run_daemon(
    prog: str,
    parse_args: Callable[[list[str] | None], C],
    serve: Callable[[C], Coroutine[Any, Any, None]],
    argv: list[str] | None = None,
) -> None:
    configure_logging()
    stop_with_parent()
    ignore_stray_signals()
    try:
        config = parse_args(argv)
        loop_factory = new_event_loop
        loop_factory().close()  # a bad CASCADE_EVENT_LOOP is a configuration error
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(config))
    except ValueError as e:
        # A setting that only shows as wrong once workers are known (an infeasible plan).
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except FatalError as e:
        print(f"{prog}: fatal: {e}", file=sys.stderr)
        sys.exit(1)


class _Undecodable:
    """What a request that does not parse turns into; its handler is never called."""

    def __init__(self, error: Exception) -> None:
        self.cause = f"{type(error).__name__}: {error}"


class StrictDecoding(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT for request messages that do not parse (gRPC itself answers
    UNKNOWN, or the handler fails with INTERNAL), logging each cause once per method."""

    def __init__(self) -> None:
        self._logged: set[tuple[str, str]] = set()
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        # The same method's handler comes back call after call: wrap it once. One entry per
        # method the server has (unknown methods have no handler), so the cache is bounded.
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    async def _refuse(self, context: Any, method: str, bad: _Undecodable) -> None:
        if (method, bad.cause) not in self._logged:
            self._logged.add((method, bad.cause))
            structlog.get_logger(__name__).warning(
                "undecodable_request", method=method, error=bad.cause
            )
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request message does not parse")

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        parse = handler.request_deserializer
        assert parse is not None

        def deserialize(raw: bytes) -> Any:
            try:
                return parse(raw)
            except Exception as e:  # protobuf raises DecodeError, and others on odd input
                return _Undecodable(e)

        kwargs = {
            "request_deserializer": deserialize,
            "response_serializer": handler.response_serializer,
        }
        refuse = self._refuse

        def uu_like(behavior: Any) -> Any:
            async def uu(request: Any, context: Any) -> Any:
                if isinstance(request, _Undecodable):
                    await refuse(context, method, request)
                return await behavior(request, context)

            return uu

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(uu_like(handler.unary_unary), **kwargs)
        if handler.unary_stream:
            unary_stream: Any = handler.unary_stream
            if not inspect.isasyncgenfunction(unary_stream):  # writes with context.write
                return grpc.unary_stream_rpc_method_handler(uu_like(unary_stream), **kwargs)

            async def us(request: Any, context: Any) -> Any:
                if isinstance(request, _Undecodable):
                    await refuse(context, method, request)
                async for response in unary_stream(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(us, **kwargs)

        async def checked(requests: Any, context: Any) -> Any:
            async for request in requests:
                if isinstance(request, _Undecodable):
                    await refuse(context, method, request)
                yield request

        if handler.stream_unary:
            stream_unary = handler.stream_unary

            async def su(requests: Any, context: Any) -> Any:
                return await stream_unary(checked(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(su, **kwargs)
        stream_stream: Any = handler.stream_stream
        assert stream_stream is not None
        if not inspect.isasyncgenfunction(stream_stream):

            async def ss_co(requests: Any, context: Any) -> Any:
                return await stream_stream(checked(requests, context), context)

            return grpc.stream_stream_rpc_method_handler(ss_co, **kwargs)

        async def ss(requests: Any, context: Any) -> Any:
            async for response in stream_stream(checked(requests, context), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(ss, **kwargs)
