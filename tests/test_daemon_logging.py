"""Every line a daemon logs is one JSON object, its libraries' log records included: uvicorn
(the scheduler's HTTP front) logs through the standard `logging` module, which no handler
caught, so its errors came out as plain text through logging's last-resort handler, tracebacks
spread over many lines ("Exception in ASGI application" when the scheduler stopped under load)."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import logging
import structlog
from cascadeinfer.daemon import configure_logging

configure_logging()
structlog.contextvars.bind_contextvars(scheduler="127.0.0.1:1")
structlog.get_logger("cascade-scheduler").info("serving")
logging.getLogger("uvicorn.error").error("Cancel %s running task(s)", 2)
try:
    raise RuntimeError("boom")
except RuntimeError:
    logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
logging.getLogger("some.library").info("chatter below warning is not shown")
"""


def test_standard_library_log_records_are_json_lines_like_the_daemons_own() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [line["event"] for line in lines] == [
        "serving",
        "Cancel 2 running task(s)",
        "Exception in ASGI application",
    ]
    cancel, failure = lines[1], lines[2]
    assert cancel["level"] == "error" and cancel["logger"] == "uvicorn.error"
    assert cancel["scheduler"] == "127.0.0.1:1" and "timestamp" in cancel
    assert "RuntimeError: boom" in failure["exception"]
