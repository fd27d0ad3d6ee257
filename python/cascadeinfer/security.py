"""Transport security the daemons and the command line share: TLS and mTLS credentials for
every gRPC link, and the bearer token that guards every daemon's API (the scheduler's, the
registry, and each worker's, which the scheduler and peer workers call with it).

One `TlsFiles` describes a daemon's side of TLS. A server with `ca` set (and, for the
scheduler, `require_client_cert`) insists on client certificates signed by that CA: that is
mTLS for the worker links. A client with `ca` set verifies the server against it and presents
`cert`/`key` when given.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import os
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc

from cascadeinfer.daemon import CHANNEL_OPTIONS, RECONNECT_OPTIONS
from cascadeinfer.small_files import read_small_file, read_small_text

TOKEN_ENV = "CASCADE_AUTH_TOKEN"
"""Environment variable holding the cluster's bearer token, for daemons and the CLI alike."""
CLIENT_TOKEN_ENV = "CASCADE_CLIENT_TOKEN"
"""Environment variable holding a client token (`read_client_tokens`)."""

PROBE_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Probes and schema discovery: any token the port takes opens them (the cluster's or a
client's). They were open to callers without one, and an open method's messages are read whole
before its handler runs, so strangers' partial messages to health held hundreds of MB
(docs/reliability.md, F2 of the seventeenth probe). Probes that send no token use the health
port (`health_port.py`)."""


@dataclass(frozen=True)
class TlsFiles:
    cert: str = ""
    """PEM certificate chain of this daemon."""
    key: str = ""
    """PEM private key of `cert`."""
    ca: str = ""
    """PEM CA bundle peers are verified against."""
    require_client_cert: bool = False
    """Servers: refuse callers without a certificate signed by `ca` (mTLS)."""

    @property
    def is_enabled(self) -> bool:
        return bool(self.cert or self.ca)

    def validate(self, *, is_server: bool) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("tls: give both cert and key, or neither")
        if is_server and self.ca and not self.cert:
            raise ValueError("tls: a server with a CA needs its own cert and key")
        if self.require_client_cert and not self.ca:
            raise ValueError("tls: require_client_cert needs ca (the CA clients are checked with)")
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path:
                read_small_file(path, f"tls: {name} =")  # a regular file of a bounded size
        self._check_loads()

    def _check_loads(self) -> None:
        """The files hold what they are named for, with `ssl` (OpenSSL, as gRPC uses): gRPC
        itself takes them unread and fails later, naming neither file (a server's bind fails
        as if its port were in use, a client's handshakes fail)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        for name in ("cert", "ca"):
            path = getattr(self, name)
            try:
                if path:
                    context.load_verify_locations(cafile=path)
            except ssl.SSLError as e:
                raise ValueError(
                    f"tls: {name} = {path!r} does not load as PEM certificates ({e.reason or e})"
                ) from None
        if self.cert:
            try:
                context.load_cert_chain(self.cert, self.key, password=_no_password)
            except ssl.SSLError as e:
                raise ValueError(
                    f"tls: key = {self.key!r} does not load as the PEM private key of "
                    f"cert = {self.cert!r} ({e.reason or e})"
                ) from None

    def _read(self, name: str) -> bytes | None:
        path = getattr(self, name)
        return read_small_file(path, f"tls: {name} =") if path else None

    def server_credentials(self) -> grpc.ServerCredentials:
        key, cert = self._read("key"), self._read("cert")
        assert key is not None and cert is not None
        return grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=self._read("ca"),
            require_client_auth=self.require_client_cert,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._read("ca"),
            private_key=self._read("key"),
            certificate_chain=self._read("cert"),
        )


def _no_password() -> bytes:
    """OpenSSL's password callback for a key file: never prompt on the terminal (gRPC cannot
    use an encrypted key anyway)."""
    raise ValueError("tls: key is encrypted; give an unencrypted PEM key")


def add_tls_arguments(p: Any, *, cert_help: str, ca_help: str) -> None:
    """The daemons' --tls-* flags; `tls_from_arguments` applies them over a config's TlsFiles."""
    p.add_argument("--tls-cert", help=cert_help)
    p.add_argument("--tls-key", help="PEM key of --tls-cert")
    p.add_argument("--tls-ca", help=ca_help)
    p.add_argument(
        "--tls-require-client-cert",
        action="store_true",
        default=None,
        help="mTLS: refuse callers without a certificate signed by --tls-ca",
    )


def tls_from_arguments(base: TlsFiles, args: Any) -> TlsFiles:
    """`base` (from a config file) with every --tls-* flag that was given."""
    given = {
        "cert": args.tls_cert,
        "key": args.tls_key,
        "ca": args.tls_ca,
        "require_client_cert": args.tls_require_client_cert,
    }
    return replace(base, **{k: v for k, v in given.items() if v is not None})


def add_port(server: grpc.aio.Server, address: str, tls: TlsFiles) -> int:
    """Binds `address` with TLS when `tls` has a certificate, in the clear otherwise. An
    address that cannot be bound (a port in use: the server needs daemon.SERVER_OPTIONS for
    that to show) is a configuration error (ValueError, exit 2), not gRPC's RuntimeError."""
    try:
        if tls.cert:
            return server.add_secure_port(address, tls.server_credentials())
        return server.add_insecure_port(address)
    except RuntimeError:
        raise ValueError(
            f"cannot listen on {address}: the port is in use, or the host is not an address "
            "of this machine"
        ) from None


def aio_channel(
    address: str, tls: TlsFiles, token: str = "", options: Sequence[tuple[str, int]] = ()
) -> grpc.aio.Channel:
    """A channel between daemons: TLS when configured, the cluster's token on every call, a
    reconnect backoff of at most a second (`RECONNECT_OPTIONS`); `options` add to these
    (keepalive, for links that must notice a cut)."""
    interceptors = _aio_token_interceptors(token)
    all_options = [*CHANNEL_OPTIONS, *RECONNECT_OPTIONS, *options]
    if tls.is_enabled:
        return grpc.aio.secure_channel(
            address, tls.channel_credentials(), options=all_options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options=all_options, interceptors=interceptors)


def sync_channel(address: str, tls: TlsFiles) -> grpc.Channel:
    if tls.is_enabled:
        return grpc.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


MAX_TOKEN_CHARS = 4096
"""Longest bearer token taken: with `Bearer ` and the call's other metadata it stays well within
gRPC's 16 KiB metadata limit and any HTTP server's header limit."""


def checked_token(token: str, source: str) -> str:
    """`token` if it can travel as a bearer token: one line of printable ASCII, what a gRPC
    metadata value may hold.

    Anything else cannot be sent at all: gRPC refuses the header before the call leaves (a
    worker given a two-line token file served, never registered, and said nothing: its
    heartbeat died of grpc's `ExecuteBatchError`), and HTTP clients cannot send it either, so
    a scheduler holding it served a port nobody could open. Refused at start, naming the
    position of the first bad character, never the token. Nor can a token longer than
    MAX_TOKEN_CHARS: gRPC refuses metadata past 16 KiB, so a 20,000-character token was taken
    at start and every call with it failed (RESOURCE_EXHAUSTED).
    """
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError(
            f"{source}: a token must be at most {MAX_TOKEN_CHARS} characters, not {len(token)}"
        )
    for i, ch in enumerate(token):
        if not " " <= ch <= "~":
            what = (
                "a line break"
                if ch in "\r\n"
                else "a control character"
                if ch.isascii()
                else "not ASCII"
            )
            raise ValueError(
                f"{source}: a token must be one line of printable ASCII; "
                f"its character {i + 1} is {what}"
            )
    return token


def read_token(token_file: str) -> str:
    """The bearer token from a file (the whole file, surrounding whitespace dropped) or else from
    $CASCADE_AUTH_TOKEN; '' for none.

    Never from a flag: command lines are visible to every user of the host.
    """
    if token_file:
        # A token is one line of at most MAX_TOKEN_CHARS; a little more is read, so that a
        # longer one is refused by `checked_token` with its length.
        token = read_small_text(token_file, "auth token file", 4 * MAX_TOKEN_CHARS).strip()
        if not token:
            raise ValueError(f"auth token file {token_file!r} is empty")
        return checked_token(token, f"auth token file {token_file!r}")
    return checked_token(os.environ.get(TOKEN_ENV, "").strip(), f"${TOKEN_ENV}")


def read_caller_token(token_file: str) -> str:
    """The token a client presents to the scheduler: the file's, else $CASCADE_CLIENT_TOKEN,
    else $CASCADE_AUTH_TOKEN (the cluster's, which opens the client API too); '' for none."""
    if token_file:
        return read_token(token_file)
    token = os.environ.get(CLIENT_TOKEN_ENV, "").strip()
    return checked_token(token, f"${CLIENT_TOKEN_ENV}") if token else read_token("")


def read_client_tokens(tokens_file: str) -> tuple[str, ...]:
    """The tokens clients may call the scheduler's client API with: one per line of a file
    (blank lines and lines starting with # skipped), else $CASCADE_CLIENT_TOKEN; () for none,
    and then only the cluster's token (`read_token`) opens the client API."""
    if tokens_file:
        lines = read_small_text(tokens_file, "client tokens file").splitlines()
        tokens = tuple(
            checked_token(t, f"client tokens file {tokens_file!r}, line {n}")
            for n, t in enumerate((line.strip() for line in lines), start=1)
            if t and not t.startswith("#")
        )
        if not tokens:
            raise ValueError(f"client tokens file {tokens_file!r} holds no token")
        return tokens
    token = os.environ.get(CLIENT_TOKEN_ENV, "").strip()
    return (checked_token(token, f"${CLIENT_TOKEN_ENV}"),) if token else ()


def credential_owner(authorization: str) -> str:
    """Who a request belongs to, for Abort: a digest of the `authorization` value it came with
    ('' without one), so the token itself is never kept. Callers with the same credential are
    one owner."""
    if not authorization:
        return ""
    scheme, _, token = authorization.partition(" ")
    key = token.strip() if scheme.lower() == "bearer" else authorization  # HTTP: any case
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach ('localhost', 127.0.0.0/8, ::1, and
    127.0.0.0/8 written as IPv4-mapped IPv6, which Python 3.11 does not count as loopback)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def check_exposure(host: str, token: str, tls: TlsFiles, insecure: bool) -> None:
    """Refuses to serve other machines with no authentication unless the operator said so."""
    if is_loopback(host) or token or tls.require_client_cert or insecure:
        return
    raise ValueError(
        f"host = {host!r} is reachable from other machines, but no auth token and no mTLS "
        "(tls require_client_cert) is set: give one (--auth-token-file, $CASCADE_AUTH_TOKEN, "
        "--tls-require-client-cert), or pass --insecure to serve without authentication"
    )


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` with UNAUTHENTICATED.

    `token` (the cluster's) opens every method except those in `client_methods`, which take
    any of `client_tokens` instead (`SchedulerConfig.client_api_tokens`: the clients' and the
    cluster's). A method no token guards is open. Health and reflection (PROBE_SERVICES)
    take any of the tokens; probes without one use the health port (`health_port.py`).
    """

    def __init__(
        self,
        token: str,
        client_tokens: Sequence[str] = (),
        client_methods: Sequence[str] = (),
    ) -> None:
        self._cluster = [f"Bearer {token}".encode()] if token else []
        self._clients = [f"Bearer {t}".encode() for t in client_tokens]
        self._client_methods = frozenset(client_methods)
        self._any = [*self._cluster, *(t for t in self._clients if t not in self._cluster)]

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        method: str = details.method
        if handler is None:
            return handler
        if method.startswith(PROBE_SERVICES):
            expected = self._any
        elif method in self._client_methods:
            expected = self._clients
        else:
            expected = self._cluster
        if not expected:
            return handler
        metadata = dict(details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        # Every candidate is compared, so the time taken does not say which one matched.
        matches = [hmac.compare_digest(given, e) for e in expected]
        if any(matches):
            return handler
        return _refusing(handler, "missing bearer token" if not given else "bad bearer token")


def _refusing(
    handler: grpc.RpcMethodHandler[Any, Any], why: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that answers UNAUTHENTICATED without receiving the request, whatever
    `handler`'s shape: a streaming handler is called before any message is read, where a
    unary one gets its message whole first. A stranger's 60 MiB messages were each read before
    the refusal, so twelve at once took a worker from 53 to 955 MiB, and the memory stayed
    (docs/reliability.md, "A twelfth adversarial probe"); unread, a call costs gRPC's flow
    control window. (It was unary-shaped so as not to decode the message, which costs more.)"""
    del handler  # every shape is refused the same way, on the wire alike

    async def refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        yield  # pragma: no cover - makes this an async generator

    return grpc.stream_stream_rpc_method_handler(
        refuse, request_deserializer=None, response_serializer=None
    )


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the bearer token to every call of a synchronous channel."""

    def __init__(self, token: str) -> None:
        self._metadata = token_metadata(token)

    def _with_token(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            d.method,
            d.timeout,
            (*(d.metadata or ()), *self._metadata),
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)


class _AioToken:
    def __init__(self, token: str) -> None:
        self._metadata = token_metadata(token)

    def _with_token(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(d.metadata or ()), *self._metadata)
        return grpc.aio.ClientCallDetails(
            d.method, d.timeout, metadata, d.credentials, d.wait_for_ready
        )


# grpc.aio files an interceptor under one call type only, so one class per type.
class _UnaryUnaryToken(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _UnaryStreamToken(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _StreamUnaryToken(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


class _StreamStreamToken(_AioToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


def _aio_token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor] | None:
    """Adds the bearer token to every call of an asyncio channel (scheduler -> worker,
    worker -> worker, worker -> scheduler)."""
    if not token:
        return None
    kinds = (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)
    return [kind(token) for kind in kinds]


def client_channel(address: str, tls: TlsFiles, token: str) -> grpc.Channel:
    """A synchronous channel for the command line: TLS when given a CA, the token on every call."""
    channel = sync_channel(address, tls)
    return grpc.intercept_channel(channel, _TokenInterceptor(token)) if token else channel
