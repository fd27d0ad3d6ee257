"""Imported KV shards meeting the loads that wait for them, in one tensor-parallel rank.

An import reaches a rank on two roads: the daemon sends the snapshot's bytes over the side
channel (a receiver thread `put`s them here), and vLLM's scheduler allocates the request's
blocks and hands the rank a load order in the step's connector metadata (`expect`). Either may
come first. The rank's loader thread asks `next_due` for whatever can be settled now: loads
whose bytes are here (to write), and loads whose bytes did not come by their deadline (to
report as failed, so vLLM recomputes them). Loads never block the rank's forward pass: that is
the point of loading asynchronously.

Bounds: shards nobody asks for (the request was refused after its bytes were sent, or its
prefix was all cached locally, see `discard`) are dropped after `ttl_s`, and at most
`max_entries` snapshots are held, oldest dropped first.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

Order = TypeVar("Order")
Shard = bytes | memoryview
"""One block's bytes for this rank (a view of the receiving socket's buffer, or bytes)."""


@dataclass(frozen=True)
class Due(Generic[Order]):
    """What the loader settles now: orders with their bytes, and orders past their deadline."""

    ready: list[tuple[Order, list[Shard]]]
    expired: list[Order]


class ShardInbox(Generic[Order]):
    """Thread-safe meeting point of arriving shards and waiting load orders (see module)."""

    def __init__(
        self,
        *,
        wait_s: float,
        ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if wait_s <= 0 or ttl_s <= 0 or max_entries < 1:
            raise ValueError("wait_s and ttl_s must be > 0 and max_entries >= 1")
        self._wait_s = wait_s
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._changed = threading.Condition()
        self._shards: OrderedDict[str, tuple[float, list[Shard]]] = OrderedDict()
        """Migration id -> (arrival time, the rank's shard of each block), oldest first."""
        self._waiting: list[tuple[str, float, Order]] = []
        """(migration id, deadline, order) of loads whose bytes are not here yet."""

    def put(self, migration_id: str, shards: list[Shard]) -> None:
        """A snapshot's bytes arrived (receiver thread)."""
        with self._changed:
            now = self._clock()
            self._shards[migration_id] = (now, shards)
            self._shards.move_to_end(migration_id)
            self._evict(now)
            self._changed.notify_all()

    def expect(self, migration_id: str, order: Order) -> None:
        """vLLM ordered a load; its bytes are due within `wait_s`."""
        with self._changed:
            self._waiting.append((migration_id, self._clock() + self._wait_s, order))
            self._changed.notify_all()

    def discard(self, migration_id: str) -> None:
        """No load will ask for these bytes (everything they hold was cached already)."""
        with self._changed:
            self._shards.pop(migration_id, None)

    def next_due(self, timeout_s: float | None = None) -> Due[Order]:
        """Blocks until some load can be settled (or timeout_s passes), then hands it out."""
        with self._changed:
            limit = None if timeout_s is None else self._clock() + timeout_s
            while True:
                now = self._clock()
                due = self._take_due(now)
                if due.ready or due.expired:
                    return due
                wake = [deadline for _, deadline, _ in self._waiting]
                if limit is not None:
                    wake.append(limit)
                    if now >= limit:
                        return due
                self._changed.wait(None if not wake else max(min(wake) - now, 0.0))

    def num_held(self) -> int:
        with self._changed:
            return len(self._shards)

    def _take_due(self, now: float) -> Due[Order]:
        ready: list[tuple[Order, list[Shard]]] = []
        expired: list[Order] = []
        still: list[tuple[str, float, Order]] = []
        for migration_id, deadline, order in self._waiting:
            held = self._shards.pop(migration_id, None)
            if held is not None:
                ready.append((order, held[1]))
            elif deadline <= now:
                expired.append(order)
            else:
                still.append((migration_id, deadline, order))
        self._waiting = still
        self._evict(now)
        return Due(ready, expired)

    def _evict(self, now: float) -> None:
        while self._shards:
            oldest, (arrived, _) = next(iter(self._shards.items()))
            if len(self._shards) <= self._max_entries and now - arrived < self._ttl_s:
                return
            del self._shards[oldest]
