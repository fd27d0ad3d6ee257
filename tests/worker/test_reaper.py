"""Which requests the worker's orphan bound aborts: detached ones that no step feed has
followed for the bound, counted from the later of the feed closing and the request starting."""

from __future__ import annotations

import asyncio

from cascadeinfer.worker.hub import TrackedRequest
from cascadeinfer.worker.reaper import orphans


def tracked(started_at: float, is_streamed: bool = False) -> TrackedRequest:
    t = TrackedRequest(context_len=10, num_output=0, started_at=started_at)
    if is_streamed:
        t.subscribers.append(asyncio.Queue())
    return t


def test_nothing_is_reaped_while_a_feed_is_open() -> None:
    assert orphans({"a": tracked(0.0)}, None, 1000.0, 30.0) == []


def test_detached_requests_go_once_unfollowed_for_the_bound() -> None:
    requests = {"old": tracked(0.0), "new": tracked(95.0), "streamed": tracked(0.0, True)}
    # The last feed closed at t=100.
    assert orphans(requests, 100.0, 129.0, 30.0) == []
    assert orphans(requests, 100.0, 130.0, 30.0) == ["old", "new"]


def test_a_request_placed_after_the_feed_closed_gets_the_whole_bound() -> None:
    requests = {"late": tracked(120.0)}
    assert orphans(requests, 100.0, 140.0, 30.0) == []
    assert orphans(requests, 100.0, 150.0, 30.0) == ["late"]
