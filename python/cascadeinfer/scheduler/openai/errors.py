"""Errors of the HTTP front, in one place: the exception the routes raise, OpenAI's JSON error
shape, and the HTTP status for each way the scheduler refuses a request."""

from __future__ import annotations

import grpc
from pydantic import ValidationError
from starlette.responses import JSONResponse

from cascadeinfer.scheduler.openai.schema import ErrorBody, ErrorResponse

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
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """A request the front refuses; becomes an OpenAI error body with `status`."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> ErrorResponse:
        kind = TYPE_OF_STATUS.get(self.status, "server_error")
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=kind, param=self.param, code=self.code)
        )

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status)


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def from_grpc(code: grpc.StatusCode, message: str) -> APIError:
    status = STATUS_OF_GRPC.get(code, 500)
    return APIError(status, message if status != 500 else "internal error")


def from_validation(e: ValidationError) -> APIError:
    """The first problem pydantic found, named by its field path (`messages.0.role`)."""
    first = e.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if first["type"] == "extra_forbidden":
        message = f"{param}: not supported by this server"
    return APIError(400, message, param=param)
