"""The admission queue: requests accepted while no instance has room for them, in the order
they are to be placed.

By priority first. Within a priority, fair between clients: each client (the credential a
request came with, `ClientRequest.owner`) is served in turn, first come first served among its
own requests (start-time fair queuing with one unit per request). So a client that queues a
thousand requests delays another client's next request by about one placement, not a
thousand; with one credential for everyone the order is plain FIFO. Bounds: `max_size`
requests in all, and `max_per_owner` for one client, so one client cannot fill the queue and
have everyone else refused.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter

RESUME_PRIORITY = 10**9
"""Requests already placed once (a worker lost them) go before any new one."""


class QueueFull(Exception):
    """The queue, or the client's share of it, is full; the message says which."""


class AdmissionQueue:
    def __init__(self, max_size: int, max_per_owner: int = 0) -> None:
        """`max_per_owner` 0: as many as `max_size`."""
        self._max_size = max_size
        self._max_per_owner = max_per_owner or max_size
        self._heap: list[tuple[int, int, int, str, str]] = []
        """(-priority, the owner's turn, arrival number, request id, owner)."""
        self._seq = itertools.count()
        self._now = 0
        """The turn of the request placed last: a client with nothing queued starts here."""
        self._next_turn: dict[str, int] = {}
        """Owners with requests queued: the turn their next request gets."""
        self._num_by_owner: Counter[str] = Counter()
        self._owner_of: dict[str, str] = {}
        """Every request queued and not gone, with its owner."""
        self._gone: set[str] = set()
        """Queued requests ended meanwhile (aborted, client gone): skipped when reached."""

    def __len__(self) -> int:
        return len(self._owner_of)

    def push(self, request_id: str, owner: str, priority: int) -> None:
        """Queues a new request at the back of its client's line; raises QueueFull."""
        if len(self) >= self._max_size:
            raise QueueFull(f"admission queue is full ({self._max_size})")
        if self._num_by_owner[owner] >= self._max_per_owner:
            raise QueueFull(
                f"this client already has {self._max_per_owner} requests queued "
                "(max_queue_per_client)"
            )
        self._add(request_id, owner, priority)

    def requeue(self, request_id: str, owner: str, priority: int) -> None:
        """Puts back an accepted request that could not be placed (never refused)."""
        self._add(request_id, owner, priority)

    def resume(self, request_id: str, owner: str) -> None:
        """Queues an accepted request whose worker was lost, ahead of every new one."""
        self._add(request_id, owner, RESUME_PRIORITY)

    def pop(self) -> str | None:
        """The next request to place, None when none is queued."""
        while self._heap:
            _, turn, _, request_id, owner = heapq.heappop(self._heap)
            if request_id in self._gone:
                self._gone.discard(request_id)
                continue
            del self._owner_of[request_id]
            self._uncount(owner)
            self._now = max(self._now, turn)
            return request_id
        return None

    def discard(self, request_id: str) -> None:
        """The request ended while queued (or was never queued: then nothing happens); it no
        longer counts against the bounds."""
        owner = self._owner_of.pop(request_id, None)
        if owner is not None:
            self._gone.add(request_id)
            self._uncount(owner)

    def _uncount(self, owner: str) -> None:
        self._num_by_owner[owner] -= 1
        if self._num_by_owner[owner] <= 0:
            del self._num_by_owner[owner]
            self._next_turn.pop(owner, None)

    def clear(self) -> None:
        self._heap.clear()
        self._next_turn.clear()
        self._num_by_owner.clear()
        self._owner_of.clear()
        self._gone.clear()

    def _add(self, request_id: str, owner: str, priority: int) -> None:
        turn = max(self._next_turn.get(owner, 0), self._now)
        self._next_turn[owner] = turn + 1
        self._num_by_owner[owner] += 1
        self._owner_of[request_id] = owner
        heapq.heappush(self._heap, (-priority, turn, next(self._seq), request_id, owner))
