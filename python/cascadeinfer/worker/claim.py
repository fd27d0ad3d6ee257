"""Which scheduler a worker serves: one at a time.

A scheduler reconciles a worker when its step feed opens: it aborts every detached request there
that it did not place, the leftovers of a predecessor that crashed. A second live scheduler
started against the same workers (two `cascade-scheduler --workers` with one list, an operator's
slip) took the first one's running requests for such leftovers and aborted them, and their
clients' streams ended after part of their tokens. So a scheduler names itself (an id new at
every start) when it opens its feed, and while the feeds of one scheduler are open a feed named by
another is refused, saying who holds the worker. The hold lasts exactly as long as the holder's
feeds: a scheduler that stops, crashes or gives the worker up closes them, and the next one (a
restart is a new id) takes the worker at its next try. Feeds opened without a name (tools and
tests that only watch the steps) neither hold the worker nor are refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

MAX_SCHEDULER_ID = 64
"""The longest scheduler id taken (a scheduler sends 32 hex digits): an id is kept while its feeds
are open and quoted in the refusals of others."""


class HeldByAnotherScheduler(Exception):
    """A feed named by a scheduler other than the one whose feeds are open."""


@dataclass
class SchedulerClaim:
    holder: str = ""
    """The id of the scheduler whose feeds are open; empty while none is."""
    holder_peer: str = ""
    """Where the holder's first open feed came from, to tell the operator."""
    held_since: float = 0.0
    """`time.monotonic()` when the holder opened its first feed."""
    open_feeds: int = 0
    """The holder's feeds open now (a scheduler that relinks may open its next before the worker
    has seen the last one close)."""

    def take(self, scheduler_id: str, peer: str) -> None:
        """Counts a feed of `scheduler_id` opened from `peer`; raises HeldByAnotherScheduler
        while another scheduler's feeds are open, ValueError for an id past MAX_SCHEDULER_ID
        characters. An empty id takes nothing."""
        if len(scheduler_id) > MAX_SCHEDULER_ID:
            raise ValueError(f"scheduler_id is longer than {MAX_SCHEDULER_ID} characters")
        if not scheduler_id:
            return
        if self.holder and self.holder != scheduler_id:
            held_s = time.monotonic() - self.held_since
            raise HeldByAnotherScheduler(
                f"this worker serves scheduler {self.holder!r} (its step feed from "
                f"{self.holder_peer or 'an unknown address'} open for {held_s:.0f} s); a worker "
                "serves one scheduler, which aborts what it did not place: stop the other "
                "scheduler, or give this one other workers"
            )
        if not self.holder:
            self.holder, self.holder_peer, self.held_since = scheduler_id, peer, time.monotonic()
        self.open_feeds += 1

    def release(self, scheduler_id: str) -> None:
        """Counts a feed `take` counted as closed; the worker is free once the holder's last
        feed is."""
        if not scheduler_id or scheduler_id != self.holder:
            return
        self.open_feeds -= 1
        if self.open_feeds <= 0:
            self.holder, self.holder_peer, self.open_feeds = "", "", 0
