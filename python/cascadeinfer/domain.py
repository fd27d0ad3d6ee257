"""The domain types both daemons use: why a request ended, its sampling settings, and the
errors an engine call fails with. The scheduler and the worker each convert them to and from
the wire in `cascadeinfer.wire`, so neither daemon imports the other's internals."""

from __future__ import annotations

import enum
import unicodedata
from dataclasses import dataclass


class FinishReason(enum.Enum):
    LENGTH = "length"
    """max_tokens reached."""
    STOP = "stop"
    """EOS or a stop token."""
    ABORT = "abort"
    """Aborted by a client or the scheduler."""
    MIGRATED = "migrated"
    """Moved to another engine; the request goes on there."""


class ErrorCode(enum.Enum):
    """Why an engine call failed; the servicer maps each to one gRPC status."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"


class EngineError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


MAX_REQUEST_ID_CHARS = 128
"""Longest request id either daemon takes (gRPC `request_id`, HTTP `X-Request-Id`). The id
travels in every message about the request, the worker's step feed included: a 12 MB id from
one client made that feed's messages outgrow the 64 MiB limit, and the scheduler dropped a
healthy worker."""


def check_request_id(request_id: str) -> None:
    """Raises INVALID_ARGUMENT for an empty id or one over MAX_REQUEST_ID_CHARS (the message
    names the limit, not the id)."""
    check_bounded_text("request_id", request_id, MAX_REQUEST_ID_CHARS)


def check_bounded_text(name: str, value: str, max_chars: int) -> None:
    """Raises INVALID_ARGUMENT when field `name` is empty or longer than `max_chars`; the
    message names the field and the limit, never the value (which may be megabytes)."""
    if not value:
        raise EngineError(ErrorCode.INVALID_ARGUMENT, f"{name} is empty")
    if len(value) > max_chars:
        raise EngineError(
            ErrorCode.INVALID_ARGUMENT, f"{name} is longer than {max_chars} characters"
        )


MAX_WORKER_ID_CHARS = 256
"""Longest worker id a worker may take and a registration may give (ids are logged and listed
by `cascade status`)."""

_UNPRINTABLE = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
"""Unicode categories of characters a terminal acts on or cannot show: control and format
characters, surrogates, private and unassigned code points, line and paragraph separators."""


def worker_id_problem(worker_id: str) -> str | None:
    """Why `worker_id` cannot name a worker, or None. An id with a newline and ANSI escapes was
    taken, and `cascade status` printed it raw: it cleared the operator's screen and drew a
    fake table row; a 300-character one served, then failed every registration for ever."""
    if len(worker_id) > MAX_WORKER_ID_CHARS:
        return f"worker_id is longer than {MAX_WORKER_ID_CHARS} characters"
    for k, char in enumerate(worker_id, start=1):
        if unicodedata.category(char) in _UNPRINTABLE:
            return f"worker_id: its character {k} (U+{ord(char):04X}) is not printable"
    return None


MAX_STOP_TOKEN_IDS = 1024
"""Most stop tokens one request may name: engines test each new token against the list (the
sim engine and vLLM alike scan it), so a list of millions (what a 16 MiB message holds) made
every step of the worker slow for all its requests."""


def check_num_stop_ids(count: int) -> None:
    """Raises INVALID_ARGUMENT for more than MAX_STOP_TOKEN_IDS stop tokens."""
    if count > MAX_STOP_TOKEN_IDS:
        raise EngineError(
            ErrorCode.INVALID_ARGUMENT,
            f"stop_token_ids: {count} ids; at most {MAX_STOP_TOKEN_IDS}",
        )


def check_context_fits(context_len: int, max_model_len: int) -> None:
    """Raises INVALID_ARGUMENT for a context that leaves no token of room below
    `max_model_len`."""
    if context_len >= max_model_len:
        raise EngineError(
            ErrorCode.INVALID_ARGUMENT,
            f"prompt of {context_len} tokens leaves no room below max_model_len {max_model_len}",
        )


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    """0 turns top-k off."""
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raises INVALID_ARGUMENT naming the first bad field."""
        check_num_stop_ids(len(self.stop_token_ids))
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 turns it off)"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be >= 0"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise EngineError(
                    ErrorCode.INVALID_ARGUMENT, f"{name} = {getattr(self, name)!r}: {rule}"
                )
