"""Errors of the HTTP front, in one place: the exception the routes raise, OpenAI's JSON error
shape, and the HTTP status for each way the scheduler refuses a request."""

from __future__ import annotations

import grpc
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from starlette.responses import JSONResponse

from cascadeinfer.scheduler.openai.schema import ErrorBody, ErrorResponse, json_type

STATUS_OF_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
    500: "server_error",
    501: "invalid_request_error",
    503: "service_unavailable_error",
}


CLIENT_CLOSED_REQUEST = 499
"""A request its client ended: its own Abort call (gRPC's CANCELLED, as Google's APIs map it to
HTTP), or a client that left before its body arrived (nginx's code; no response is sent)."""

MAX_MESSAGE_CHARS = 1024
"""Longest error message sent; longer ones (which quote a client's value) are cut."""
MAX_PARAM_CHARS = 256
"""Longest `param` (a field path, which may hold a client's key) sent."""


def clip(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class APIError(Exception):
    """A request the front refuses; becomes an OpenAI error body with `status`.

    Message and param are cut (`clip`): they quote what the client sent (an unknown key, a
    model name, a path), and a 3 MB key came back twice in one body, which a client that
    never reads its answer kept in the scheduler's memory (30 such connections: +280 MB)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = None if param is None else clip(param, MAX_PARAM_CHARS)
        self.code = code
        self.headers = headers

    def body(self) -> ErrorResponse:
        kind = TYPE_OF_STATUS.get(self.status, "server_error")
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=kind, param=self.param, code=self.code)
        )

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def from_grpc(code: grpc.StatusCode, message: str) -> APIError:
    status = STATUS_OF_GRPC.get(code, 500)
    return APIError(status, message if status != 500 else "internal error")


_UNION_BRANCHES = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_union_branch(part: str | int) -> bool:
    """Whether a location part names a union's branch (`list[constrained-int]`), not a field."""
    return isinstance(part, str) and ("[" in part or "-" in part or part in _UNION_BRANCHES)


def _most_telling(errors: list[ErrorDetails]) -> ErrorDetails:
    """Of a union's errors, one per branch, the branch the input matched in shape: a value that
    broke a constraint (`greater_than_equal`, `too_long`) rather than a type mismatch, else the
    one that got deepest. A list of token ids with a negative one then reads "prompt.1: ...
    greater than or equal to 0", not "prompt: should be a valid string"."""
    constraint = [x for x in errors if not x["type"].endswith("_type")]
    if constraint:
        return constraint[0]
    return max(errors, key=lambda x: len(x["loc"]))


def from_validation(e: ValidationError) -> APIError:
    """The most telling problem pydantic found, named by its field path (`messages.0.role`).
    A value of the wrong JSON type says which type it was ("max_tokens: Input should be a
    valid integer, got a string"), as OpenAI's own errors do."""
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["loc"]:
        same_field = [x for x in errors if x["loc"][:1] == first["loc"][:1]]
        first = _most_telling(same_field)
    param = ".".join(str(p) for p in first["loc"] if not _is_union_branch(p)) or None
    if not first["loc"] and "field" in first.get("ctx", {}):
        return APIError(400, first["msg"], param=str(first["ctx"]["field"]))  # ours, worded
    if not first["loc"] and first["type"] == "model_type":
        return APIError(400, f"the body should be a JSON object, got {json_type(first['input'])}")
    why = first["msg"]
    if first["type"].endswith("_type"):
        why = f"{why}, got {json_type(first['input'])}"
    message = f"{param}: {why}" if param else why
    if first["type"] == "extra_forbidden":
        message = f"{param}: not supported by this server"
    return APIError(400, message, param=param)
