"""The routes of the OpenAI-compatible front (a Starlette app): bearer token, body limits,
parsing into the typed models, and the two answer shapes, one JSON body or Server-Sent
Events ending in `data: [DONE]`."""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from cascadeinfer.domain import MAX_REQUEST_ID_CHARS
from cascadeinfer.metrics_page import MetricsPage
from cascadeinfer.scheduler.config import HTTP_MAX_BODY_BYTES
from cascadeinfer.scheduler.coordinator import SHUTTING_DOWN, Coordinator
from cascadeinfer.scheduler.openai.errors import (
    CLIENT_CLOSED_REQUEST,
    APIError,
    from_validation,
    invalid,
)
from cascadeinfer.scheduler.openai.generation import Runner, unless_disconnected
from cascadeinfer.scheduler.openai.model_files import ModelFiles
from cascadeinfer.scheduler.openai.params import Job, build_job, chat_prompt, completion_prompt
from cascadeinfer.scheduler.openai.replies import Reply, gather, sse
from cascadeinfer.scheduler.openai.schema import (
    MAX_MODEL_LEN,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
)
from cascadeinfer.scheduler.requests import MAX_SESSION_ID_CHARS
from cascadeinfer.security import credential_owner, is_loopback

log = structlog.get_logger(__name__)

BODIES_FULL = (
    "this server holds as many request bodies as it may while they arrive "
    "(--http-max-body-bytes-in-flight); retry shortly"
)
UNROUTED = "unrouted"
"""The route label of answers to paths (or methods) the front does not serve."""
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Answering:
    """What answering a request needs of its body, taken out of it before the request runs:
    a parsed body (up to HTTP_MAX_BODY_BYTES, most of it in fields no prompt renders, such as
    a message's `name`) held by a handler that waits for a whole generation kept 4 MiB a
    request, past --http-max-body-bytes-in-flight, which counts bodies only while they arrive
    (100 such chats: 83 -> 463 MiB, docs/reliability.md, "A fourteenth probe")."""

    model: str
    is_stream: bool
    include_usage: bool
    session_id: str | None


class OpenAIFront:
    def __init__(
        self,
        coordinator: Coordinator,
        files: ModelFiles,
        *,
        tokens: Sequence[str],
        model_name: str,
        body_timeout_s: float = 30.0,
        max_body_bytes_in_flight: int = 64 * HTTP_MAX_BODY_BYTES,
        serves_loopback_names_only: bool = False,
    ) -> None:
        self.c = coordinator
        self.serves_loopback_names_only = serves_loopback_names_only
        """Refuse (403) a request whose `Host` is not a loopback name. Set for a front with no
        token on a loopback address: a web page the user opens can rename its own origin to
        127.0.0.1 (DNS rebinding), and the browser then lets it call the API and read the
        answers; the browser sends the page's name as `Host`, which this refuses."""
        self.body_timeout_s = body_timeout_s
        """A body not received whole within this is refused with 408: a client that declares a
        length and never sends it would otherwise hold its connection and handler forever."""
        self.files = files
        self.runner = Runner(coordinator)
        self._tokens = [t.encode() for t in tokens]
        """Any of these opens the API (the scheduler's client tokens); none: it is open."""
        self._model_name = model_name
        self._metrics_page = MetricsPage(coordinator.metrics.registry)
        """/metrics needs no token: its renders are bounded so scrapes cannot load the loop."""
        self.started = int(time.time())
        self._reading_bodies: set[asyncio.Task[object]] = set()
        """Handlers waiting for the rest of a request body (`refuse_bodies_in_flight`)."""
        self.max_body_bytes_in_flight = max_body_bytes_in_flight
        """Bytes of bodies still arriving that the handlers may hold together: each body is
        bounded (HTTP_MAX_BODY_BYTES) and timed (`body_timeout_s`), but not how many arrive at
        once (SchedulerConfig.http_max_body_bytes_in_flight says why)."""
        self._body_bytes_in_flight = 0
        self._is_refusing_bodies = False

    def app(self) -> ASGIApp:
        """The Starlette app, behind a direct path for the two generation routes: they take
        every request of a serving fleet, and their guard answers every error itself, so
        Starlette's middleware and routing would only add their cost (a sixth of the front's
        time at thousands of short streams a second, docs/benchmarks.md, "Data plane")."""
        completions = self._guard(self.completions, "/v1/completions")
        chat = self._guard(self.chat, "/v1/chat/completions")
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self._guard(self.models, "/v1/models"), methods=["GET"]),
            Route(
                "/v1/models/{name:path}",
                self._guard(self.model, "/v1/models/{name}"),
                methods=["GET"],
            ),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
        rest = Starlette(
            routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed}
        )
        # Starlette answers a path with a slash too many by a 307 to the Host header's origin,
        # before any token check: an open redirect to wherever a client's Host says.
        rest.router.redirect_slashes = False
        direct = {"/v1/completions": completions, "/v1/chat/completions": chat}

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if (
                scope["type"] == "http"
                and self.serves_loopback_names_only
                and not _names_loopback(scope)
            ):
                self.c.metrics.http_responses.labels(UNROUTED, 403).inc()
                error = APIError(
                    403,
                    "this scheduler has no client token and answers only requests to a "
                    "loopback name (localhost, 127.0.0.1, [::1]); give it a token "
                    "(--auth-token-file) to serve other host names",
                    code="host_not_allowed",
                )
                await error.response()(scope, receive, send)
                return
            if scope["type"] == "http" and _has_unknown_coding(scope):
                self.c.metrics.http_responses.labels(UNROUTED, 501).inc()
                error = APIError(501, "transfer codings other than chunked are not supported")
                refusal = error.response()
                refusal.headers["connection"] = "close"  # its body is not read
                await refusal(scope, receive, send)
                return
            handler = direct.get(scope["path"]) if scope["type"] == "http" else None
            if handler is None or scope["method"] != "POST":
                await rest(scope, receive, send)
                return
            response = await handler(Request(scope, receive))
            await response(scope, receive, send)

        return app

    # --- guards ----------------------------------------------------------------------------
    def _guard(self, handler: Handler, route: str) -> Handler:
        """`handler` behind the token check, errors in OpenAI's shape and the response counter,
        labelled by `route` (the template, never the path a client sent: one series per
        distinct path would let anyone grow /metrics without bound)."""

        async def guarded(request: Request) -> Response:
            try:
                self._check_token(request)
                if self.c.is_stopping:
                    raise APIError(503, SHUTTING_DOWN)
                response = await handler(request)
            except APIError as e:
                response = e.response()
            except ClientDisconnect:
                # Gone before its body was in: nothing to answer and nothing wrong here (an
                # error with a traceback each time let any client fill the log and the 500s).
                log.info("client_left_before_body", path=request.scope["path"])
                response = Response(status_code=CLIENT_CLOSED_REQUEST)
            except Exception:
                log.exception("http_internal_error", path=request.scope["path"])
                response = APIError(500, "internal error").response()
            self.c.metrics.http_responses.labels(route, response.status_code).inc()
            return response

        return guarded

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        self.c.metrics.http_responses.labels(UNROUTED, 404).inc()
        return APIError(404, f"no route {request.url.path}").response()

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        self.c.metrics.http_responses.labels(UNROUTED, 405).inc()
        return APIError(405, f"{request.method} is not allowed on {request.url.path}").response()

    def _check_token(self, request: Request) -> None:
        if not self._tokens:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        key = given.strip().encode()
        # Every token is compared, so the time taken does not say which one matched.
        matches = [hmac.compare_digest(key, t) for t in self._tokens]
        if scheme.lower() != "bearer" or not any(matches):
            raise APIError(401, "missing or wrong bearer token", code="invalid_api_key")

    async def _parse(self, request: Request, model: type[M]) -> M:
        if not _is_json_or_unnamed(request.headers.get("content-type")):
            raise APIError(415, "the body must be JSON: send Content-Type: application/json")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > HTTP_MAX_BODY_BYTES:
            raise APIError(413, f"request body over {HTTP_MAX_BODY_BYTES} bytes")
        body = bytearray()
        reader = asyncio.current_task()
        assert reader is not None
        self._reading_bodies.add(reader)
        try:
            async with asyncio.timeout(self.body_timeout_s):
                async for chunk in request.stream():
                    if len(body) + len(chunk) > HTTP_MAX_BODY_BYTES:
                        raise APIError(413, f"request body over {HTTP_MAX_BODY_BYTES} bytes")
                    if self._body_bytes_in_flight + len(chunk) > self.max_body_bytes_in_flight:
                        # The rest of its body is not read: the connection cannot carry on.
                        raise APIError(
                            503,
                            BODIES_FULL,
                            code="server_busy",
                            headers={"retry-after": "1", "connection": "close"},
                        )
                    body += chunk
                    self._body_bytes_in_flight += len(chunk)
        except TimeoutError:
            raise APIError(
                408, f"request body not received within {self.body_timeout_s:g} s"
            ) from None
        except asyncio.CancelledError:
            if not self._is_refusing_bodies:
                raise
            reader.uncancel()  # our own cancel (refuse_bodies_in_flight): answer it
            raise APIError(503, SHUTTING_DOWN) from None
        finally:
            self._reading_bodies.discard(reader)
            self._body_bytes_in_flight -= len(body)
        try:
            raw = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise invalid(f"body is not JSON: {e}") from None
        except RecursionError:
            # Nesting deeper than the parser's stack (a few KiB of brackets does it).
            raise invalid("body is not JSON this server reads: nested too deeply") from None
        except ValueError:
            # Python's bound on integer conversion, which its JSON parser applies (a 500 before).
            raise invalid(
                f"body is not JSON this server reads: a number of over {sys.get_int_max_str_digits()}"
                " digits"
            ) from None
        try:
            return model.model_validate(raw, context={MAX_MODEL_LEN: self.c.max_model_len})
        except ValidationError as e:
            raise from_validation(e) from None

    def refuse_bodies_in_flight(self) -> None:
        """Answers 503 (the scheduler stops) to every request whose body is still arriving,
        as to one that arrives now. uvicorn waits for such handlers through its whole stop
        grace, then cancels them: each client got a plain-text 500 and the log an
        "Exception in ASGI application" traceback, and the stop took the grace longer."""
        self._is_refusing_bodies = True
        for reader in self._reading_bodies:
            reader.cancel()

    def served_names(self) -> list[str]:
        if self._model_name:
            return [self._model_name]
        return sorted({w.info.model for w in self.c.pool.healthy()})

    def _check_model(self, name: str) -> None:
        if self.c.policy is None or not self.c.pool.healthy():
            raise APIError(
                503, "no worker is serving (none joined yet, or all are gone or draining)"
            )
        if name not in self.served_names():
            raise APIError(
                404,
                f"model {name!r} does not exist; see /v1/models",
                param="model",
                code="model_not_found",
            )

    def _request_id(self, request: Request, prefix: str) -> str:
        given = _header_text(request, "x-request-id", MAX_REQUEST_ID_CHARS)
        return given or f"{prefix}-{uuid.uuid4().hex}"

    @staticmethod
    def _session_id(request: Request, body: SamplingFields) -> str | None:
        """The conversation a request continues: the `X-Session-Id` header, else the body's
        `user` (OpenAI's end-user id, which names one conversation for clients that keep one
        per user, as agents do). None without either."""
        given = _header_text(request, "x-session-id", MAX_SESSION_ID_CHARS)
        return given or body.user or None

    # --- routes ----------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        """200 while some worker serves (the load balancer's probe; no token needed)."""
        if self.c.is_stopping:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if self.c.policy is None or not self.c.pool.healthy():
            return JSONResponse({"status": "no healthy worker"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        """The scheduler's Prometheus metrics on the API port too (open, as /health is), at
        most a fraction of a second old under a flood of scrapes (`metrics_page`)."""
        return Response(self._metrics_page.get(), media_type=CONTENT_TYPE_LATEST)

    def _card(self, name: str) -> ModelCard:
        return ModelCard(id=name, created=self.started, max_model_len=self.c.max_model_len)

    async def models(self, request: Request) -> Response:
        cards = [self._card(name) for name in self.served_names()]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        self._check_model(name)
        return JSONResponse(self._card(name).model_dump())

    async def completions(self, request: Request) -> Response:
        body = await self._parse(request, CompletionRequest)
        self._check_model(body.model)
        prompt = await completion_prompt(body, self.files, self.c.max_prompt_bytes)
        job = build_job(body, prompt, self.files, self.c.max_model_len, body.max_tokens)
        answering = self._answering(request, body)
        del body  # not held while the request runs (`Answering`)
        return await self._answer(request, job, answering, is_chat=False)

    async def chat(self, request: Request) -> Response:
        body = await self._parse(request, ChatCompletionRequest)
        self._check_model(body.model)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise invalid("give max_tokens or max_completion_tokens, not both", "max_tokens")
        prompt = await chat_prompt(body, self.files, self.c.max_prompt_bytes)
        max_tokens = body.max_completion_tokens or body.max_tokens
        job = build_job(body, prompt, self.files, self.c.max_model_len, max_tokens)
        answering = self._answering(request, body)
        del body  # not held while the request runs (`Answering`)
        return await self._answer(request, job, answering, is_chat=True)

    def _answering(self, request: Request, body: SamplingFields) -> Answering:
        return Answering(
            model=body.model,
            is_stream=body.stream,
            include_usage=body.stream_options is not None and body.stream_options.include_usage,
            session_id=self._session_id(request, body),
        )

    async def _answer(
        self, request: Request, job: Job, answering: Answering, *, is_chat: bool
    ) -> Response:
        """Submits the job and answers as a stream or, once it is done, as one object."""
        rid = self._request_id(request, "chatcmpl" if is_chat else "cmpl")
        job = replace(job, session_id=answering.session_id)
        owner = credential_owner(request.headers.get("authorization", ""))
        rec = await self.runner.submit(rid, job, owner)
        reply = Reply(rid, answering.model, len(job.prompt))
        steps = self.runner.steps(rec, job)
        if answering.is_stream:
            events = reply.chat_events if is_chat else reply.completion_events
            return sse(events(steps, answering.include_usage))
        result = await unless_disconnected(gather(steps), request.receive)
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)  # the client left; nobody reads this
        whole = reply.chat(*result) if is_chat else reply.completion(*result)
        return JSONResponse(whole.model_dump())


def _names_loopback(scope: Scope) -> bool:
    """Whether the request's `Host` names this machine's loopback: `localhost` (or a name under
    `.localhost`, which browsers resolve to loopback themselves), or a loopback address, with
    or without a port. A request without `Host` passes (browsers always send one); one with
    two does not (RFC 9112 has a server refuse it, and which one a proxy went by is unknown)."""
    hosts = [value for name, value in scope["headers"] if name == b"host"]
    if not hosts:
        return True
    if len(hosts) > 1:
        return False
    text = hosts[0].decode("latin-1").strip().lower()
    if text.startswith("["):  # an IPv6 literal: [::1], [::1]:8000
        name, bracket, rest = text[1:].partition("]")
        if not bracket or not _is_port_suffix(rest):
            return False
    else:
        name, colon, port = text.rpartition(":")
        if not colon:
            name = text
        elif not _is_port_suffix(colon + port) or ":" in name:
            return False
    name = name.rstrip(".")
    return is_loopback(name) or name.endswith(".localhost")


def _is_port_suffix(text: str) -> bool:
    """'' or ':' followed by digits (an empty port is valid, RFC 3986)."""
    return text == "" or (text.startswith(":") and (text[1:].isdigit() or text == ":"))


def _has_unknown_coding(scope: Scope) -> bool:
    """Whether the request names a transfer coding other than plain `chunked`. The parser
    reads any such body as chunked and drops the rest (`gzip, chunked` was read as identity),
    which a proxy in front that applies the coding would read otherwise: RFC 9112 has a server
    refuse a coding it does not apply (501)."""
    return any(
        name == b"transfer-encoding" and value.strip().lower() != b"chunked"
        for name, value in scope["headers"]
    )


def _is_json_or_unnamed(content_type: str | None) -> bool:
    """Whether a body of this media type is read as JSON: `application/json`, any
    `application/*+json`, or none named (FastAPI's rule, as vLLM's front applies it). A body
    sent as `text/plain` (or a form type) was parsed as JSON too: those are the types a web
    page may POST to another origin without asking it first (no CORS preflight), so any page
    a user of a scheduler without a token (the loopback default) opened could start requests
    on it (FastAPI's CVE-2021-32677)."""
    if content_type is None:
        return True
    media = content_type.partition(";")[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def _header_text(request: Request, name: str, max_chars: int) -> str:
    """Header `name` as UTF-8 text of at most `max_chars` characters ("" when absent), the
    bound and the form its gRPC field has. Starlette reads header values as Latin-1, one
    character a byte: a UTF-8 id was bounded in bytes and kept as mojibake, so the same id sent
    over gRPC or in the body named something else."""
    given = request.headers.get(name, "")
    try:
        given = given.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(f"{name}: not valid UTF-8", name) from None
    if len(given) > max_chars:
        raise invalid(f"{name}: longer than {max_chars} characters", name)
    return given
