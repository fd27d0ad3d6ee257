"""What every cascade daemon shares: gRPC message limits, JSON logging, and the `main` wrapper
that turns a bad configuration into a clear error and exit code 2."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import structlog

GRPC_MESSAGE_LIMIT = 64 << 20
"""Explicit send/receive limit for every channel and server (KV chunks stay at 1 MiB)."""

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT),
]

C = TypeVar("C")


def configure_logging() -> None:
    """structlog JSON lines on stderr; handlers bind request_id, daemons bind their own id."""
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


def run_daemon(
    prog: str,
    parse_args: Callable[[list[str] | None], C],
    serve: Callable[[C], Coroutine[Any, Any, None]],
    argv: list[str] | None = None,
) -> None:
    configure_logging()
    try:
        config = parse_args(argv)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        asyncio.run(serve(config))
    except ValueError as e:
        # A setting that only shows as wrong once workers are known (an infeasible plan).
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
