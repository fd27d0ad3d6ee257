"""A worker stopped after its scheduler is gone: the detached requests nobody follows any more
are ended at once, so the drain does not run them, unread, for its whole timeout."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.worker.daemons import start_worker
from tests.worker.streams import GenerateReader, Spliced, generate_request

SIM = ["--engine", "sim", "--sim-kv-bytes-per-token", "256", "--sim-max-model-len", "8192"]
DRAIN_TIMEOUT_S = 30


def test_a_drain_ends_at_once_the_detached_requests_no_feed_follows(tmp_path: Path) -> None:
    """As after a scheduler crash: detached requests placed, no step feed open. A client's
    direct stream is still followed, and still runs to its end during the drain."""
    d = start_worker([*SIM, "--drain-timeout-s", str(DRAIN_TIMEOUT_S)], tmp_path)
    try:
        for i in range(2):
            request = generate_request(f"ghost-{i}", list(range(1, 41)), 8000)
            request.detach = True
            list(d.stub().Generate(request, timeout=30))
        out = Spliced()
        reader = GenerateReader(d.stub(), generate_request("direct", list(range(1, 41)), 200), out)
        reader.wait_tokens(5)
        stopped_at = time.monotonic()
        d.process.send_signal(signal.SIGTERM)
        assert d.process.wait(timeout=DRAIN_TIMEOUT_S + 15) == 0
        took = time.monotonic() - stopped_at
        reader.join()
        assert len(out.tokens) == 200, "the followed request finished during the drain"
        assert took < 12, f"the drain waited {took:.1f} s for requests nobody reads"
        log = d.log()
        for i in range(2):
            assert f'"request_id": "ghost-{i}", "why": "no step feed follows it"' in log
    finally:
        if d.process.poll() is None:
            d.process.kill()
