"""The worker's bound on ghosts: detached requests are leased to the step feeds.

A detached Generate (or an import) is followed only on a StreamSteps feed: the scheduler that
placed it reads its tokens there and alone can end it. When no feed has been open for
`orphan_timeout_s` (the scheduler crashed and never came back, or lost this worker for good),
nobody will ever read those tokens, so the worker aborts them instead of running them to their
length. A scheduler that does come back reconciles sooner (it aborts what it does not know when
its feed opens); this is the bound when none does. Requests a client streams directly end with
their stream and are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Mapping

import structlog

from cascadeinfer.worker.engine import Engine, EngineError, FinishReason
from cascadeinfer.worker.hub import TrackedRequest
from cascadeinfer.worker.state import WorkerState

log = structlog.get_logger(__name__)


def orphans(
    requests: Mapping[str, TrackedRequest],
    unfollowed_since: float | None,
    now: float,
    timeout_s: float,
) -> list[str]:
    """Detached requests that no feed has followed for `timeout_s` (counted from the later of
    the last feed closing and the request's start)."""
    if unfollowed_since is None:
        return []
    return [
        rid
        for rid, t in requests.items()
        if t.is_detached and now - max(unfollowed_since, t.started_at) >= timeout_s
    ]


def _abort(engine: Engine, request_id: str) -> None:
    engine.abort(request_id)


async def reap_forever(state: WorkerState, timeout_s: float) -> None:
    """Checks a few times per bound; runs until cancelled."""
    interval = min(1.0, timeout_s / 4)
    while True:
        await asyncio.sleep(interval)
        hub = state.hub
        for rid in orphans(hub.requests, hub.unfollowed_since, time.monotonic(), timeout_s):
            with contextlib.suppress(EngineError):  # finished or moved meanwhile
                await state.loop.call(functools.partial(_abort, request_id=rid))
            hub.end(rid, FinishReason.ABORT)
            state.metrics.orphans_reaped.inc()
            log.warning("orphan_reaped", request_id=rid, unfollowed_for_s=timeout_s)
