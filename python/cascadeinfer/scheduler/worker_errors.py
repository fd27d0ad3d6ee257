"""The one exception a call to a worker raises, whatever the transport."""

from __future__ import annotations

import grpc


class WorkerCallError(Exception):
    """A call to a worker that failed, with the gRPC status it failed with."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details or code.name
