"""Which scheduler a worker serves: one at a time.

A scheduler reconciles a worker when its step feed opens: it aborts every detached request there
that it did not place, the leftovers of a predecessor that crashed. A second live scheduler
started against the same workers (two `cascade-scheduler --workers` with one list, an operator's
slip) took the first one's running requests for such leftovers and aborted them, and their
clients' streams ended after part of their tokens. So a scheduler names itself when it opens its
feed (an id new at every start, when it started, and whether it serves clients yet), the worker
is held by one scheduler while that scheduler's feeds are open, and it takes placements
(`StartDetached`, a detached `Generate`) named by that scheduler only.

Who holds a worker another scheduler asks for:

- the holder, where both serve clients: what runs there is the holder's, and taking the worker
  would cut it off (an old scheduler that comes back after a stall finds its workers with its
  successor, which keeps them);
- the one that serves, where only one does: a scheduler still linking its `--workers` list
  serves nobody yet, and held a worker that the serving one lost for a moment (a restart)
  for as long as it waited for the rest of its list;
- the one started first, where neither serves yet: two started together each held some of the
  list and waited for the rest for good.

A holder outranked so loses its feeds (they end with FAILED_PRECONDITION) and its hold. The hold
lasts as long as the holder's feeds: a scheduler that stops, crashes or gives the worker up
closes them, and the next one (a restart is a new id) takes the worker at its next try. Feeds
opened without an id (tools and tests that only watch the steps) neither hold the worker nor are
refused, and do not keep its detached requests from the orphan bound (`reaper.py`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

MAX_SCHEDULER_ID = 64
"""The longest scheduler id taken (a scheduler sends 32 hex digits): an id is kept while its feeds
are open and quoted in the refusals of others."""


class HeldByAnotherScheduler(Exception):
    """A scheduler asked for a worker another scheduler holds and outranks it for."""


@dataclass(frozen=True)
class SchedulerRank:
    """What a scheduler says of itself when it opens a feed."""

    scheduler_id: str
    started_at_s: float
    """Its start, Unix time: the earlier start outranks where neither serves."""
    is_serving: bool
    """It serves clients (its --workers list is linked): outranks one that does not."""

    def outranks(self, holder: SchedulerRank) -> bool:
        if self.is_serving != holder.is_serving:
            return self.is_serving
        if self.is_serving:
            return False  # both serve: the holder keeps what runs there
        return (self.started_at_s, self.scheduler_id) < (holder.started_at_s, holder.scheduler_id)


@dataclass
class SchedulerClaim:
    holder: SchedulerRank | None = None
    """The scheduler whose feeds are open; None while none is."""
    holder_peer: str = ""
    """Where the holder's first open feed came from, to tell the operator."""
    held_since: float = 0.0
    """`time.monotonic()` when the holder opened its first feed."""
    _feeds: list[asyncio.Event] = field(default_factory=list)
    """One per open feed of the holder, set when it is taken over."""

    def take(self, rank: SchedulerRank, peer: str) -> asyncio.Event | None:
        """Counts a feed of `rank`'s scheduler opened from `peer`. Returns the event that is set
        when another scheduler takes the worker over (the feed must end then), or None for an
        anonymous feed. Raises HeldByAnotherScheduler where another scheduler holds the worker
        and is not outranked, ValueError for an id past MAX_SCHEDULER_ID characters."""
        if len(rank.scheduler_id) > MAX_SCHEDULER_ID:
            raise ValueError(f"scheduler_id is longer than {MAX_SCHEDULER_ID} characters")
        if not rank.scheduler_id:
            return None
        holder = self.holder
        if holder is not None and holder.scheduler_id != rank.scheduler_id:
            if not rank.outranks(holder):
                held_s = time.monotonic() - self.held_since
                raise HeldByAnotherScheduler(
                    f"this worker serves scheduler {holder.scheduler_id!r} (its step feed from "
                    f"{self.holder_peer or 'an unknown address'} open for {held_s:.0f} s"
                    f"{'' if holder.is_serving else ', not serving yet'}); a worker serves one "
                    "scheduler, which aborts what it did not place: stop the other scheduler, "
                    "or give this one other workers"
                )
            for taken in self._feeds:
                taken.set()
            self._feeds.clear()
            holder = None
        if holder is None:
            self.holder_peer, self.held_since = peer, time.monotonic()
        # The latest word of the holder on whether it serves (it serves once its list is in).
        self.holder = rank
        ended = asyncio.Event()
        self._feeds.append(ended)
        return ended

    def release(self, ended: asyncio.Event | None) -> None:
        """Counts the feed `take` returned `ended` for as closed; the worker is free once the
        holder's last feed is."""
        if ended is None or ended not in self._feeds:
            return  # anonymous, or taken over already
        self._feeds.remove(ended)
        if not self._feeds:
            self.holder, self.holder_peer = None, ""

    def accepts_placement(self, scheduler_id: str) -> bool:
        """Whether a placement named by `scheduler_id` may run here: only the holder's. Taking
        one also records that the holder serves clients (its feeds may have opened while it
        still linked its list, and said otherwise). One without an id (a client streaming its
        own request, a tool) is not the claim's to judge."""
        if not scheduler_id:
            return True
        holder = self.holder
        if holder is None or holder.scheduler_id != scheduler_id:
            return False
        if not holder.is_serving:
            self.holder = SchedulerRank(holder.scheduler_id, holder.started_at_s, True)
        return True
