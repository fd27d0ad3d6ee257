"""Imported KV shards meeting the loads that wait for them, in one tensor-parallel rank.

An import reaches a rank on two roads: the snapshot's bytes come over a side channel (a
receiver thread `put`s them here: from the daemon in one piece, or from the peer's rank of the
same number in parts, the pre-copied blocks first and the rest after the stop), and vLLM's
scheduler allocates the request's blocks and hands the rank a load order in the step's
connector metadata (`expect`). Either may come first; a load is settled once its blocks are all
here or the snapshot's last part came. The rank's loader thread asks `next_due` for whatever can be settled now: loads
whose bytes are here (to write), and loads whose bytes did not come by their deadline (to
report as failed, so vLLM recomputes them). Loads never block the rank's forward pass: that is
the point of loading asynchronously.

Bounds: shards nobody asks for (the request was refused after its bytes were sent, or its
prefix was all cached locally, see `discard`) are dropped after `ttl_s`, and at most
`max_entries` snapshots and `max_bytes` bytes are held, oldest snapshots dropped first (no
import can land more than the rank's whole cache, so that is the natural byte bound).
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
        max_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if wait_s <= 0 or ttl_s <= 0 or max_entries < 1:
            raise ValueError("wait_s and ttl_s must be > 0 and max_entries >= 1")
        self._wait_s = wait_s
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._num_bytes = 0
        self._clock = clock
        self._changed = threading.Condition()
        self._shards: OrderedDict[str, _Parts] = OrderedDict()
        """Migration id -> the parts of its snapshot that arrived, oldest snapshot first."""
        self._waiting: list[tuple[str, int, float, Order]] = []
        """(migration id, blocks needed, deadline, order) of loads whose bytes are not here."""

    def put(
        self, migration_id: str, shards: list[Shard], first_block: int = 0, is_last: bool = True
    ) -> None:
        """Blocks `first_block..` of a snapshot arrived (receiver thread); `is_last`: no more
        will come for it."""
        with self._changed:
            now = self._clock()
            parts = self._shards.get(migration_id)
            if parts is None:
                parts = self._shards[migration_id] = _Parts(now)
            else:
                # Age counts from a snapshot's last part: a pre-copy of 4 GB can take longer
                # than the TTL, and its first part must not expire meanwhile. (The order stays
                # by first arrival: the byte and count bounds drop the oldest snapshot first.)
                parts.arrived = now
            self._num_bytes += parts.add(first_block, shards, is_last)
            self._evict(now)
            self._changed.notify_all()

    def expect(self, migration_id: str, order: Order, num_blocks: int) -> None:
        """vLLM ordered a load that needs the snapshot's first `num_blocks` blocks; they are
        due within `wait_s`."""
        with self._changed:
            deadline = self._clock() + self._wait_s
            self._waiting.append((migration_id, num_blocks, deadline, order))
            self._changed.notify_all()

    def discard(self, migration_id: str) -> None:
        """No load will ask for these bytes (everything they hold was cached already)."""
        with self._changed:
            self._drop(migration_id)

    def next_due(self, timeout_s: float | None = None) -> Due[Order]:
        """Blocks until some load can be settled (or timeout_s passes), then hands it out."""
        with self._changed:
            limit = None if timeout_s is None else self._clock() + timeout_s
            while True:
                now = self._clock()
                due = self._take_due(now)
                if due.ready or due.expired:
                    return due
                wake = [deadline for _, _, deadline, _ in self._waiting]
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
        still: list[tuple[str, int, float, Order]] = []
        for migration_id, num_blocks, deadline, order in self._waiting:
            parts = self._shards.get(migration_id)
            leading = parts.leading() if parts is not None else []
            if parts is not None and (parts.is_complete or len(leading) >= num_blocks):
                self._drop(migration_id)
                ready.append((order, leading))
            elif deadline <= now:
                expired.append(order)
            else:
                still.append((migration_id, num_blocks, deadline, order))
        self._waiting = still
        self._evict(now)
        return Due(ready, expired)

    def _evict(self, now: float) -> None:
        while self._shards:
            oldest, parts = next(iter(self._shards.items()))
            is_over_bytes = self._max_bytes is not None and self._num_bytes > self._max_bytes
            if (
                len(self._shards) <= self._max_entries
                and now - parts.arrived < self._ttl_s
                and not is_over_bytes
            ):
                return
            self._drop(oldest)

    def _drop(self, migration_id: str) -> None:
        parts = self._shards.pop(migration_id, None)
        if parts is not None:
            self._num_bytes -= parts.num_bytes


def _size(shard: Shard) -> int:
    return shard.nbytes if isinstance(shard, memoryview) else len(shard)


class _Parts:
    """The parts of one snapshot that arrived, by first block."""

    def __init__(self, arrived: float) -> None:
        self.arrived = arrived
        self.is_complete = False
        self.num_bytes = 0
        self._by_first: dict[int, list[Shard]] = {}

    def add(self, first_block: int, shards: list[Shard], is_last: bool) -> int:
        """Files a part; returns the bytes it added (a part sent twice replaces itself)."""
        replaced = self._by_first.get(first_block, [])
        self._by_first[first_block] = shards
        self.is_complete = self.is_complete or is_last
        added = sum(map(_size, shards)) - sum(map(_size, replaced))
        self.num_bytes += added
        return added

    def leading(self) -> list[Shard]:
        """The blocks from 0 on, as far as they run without a gap."""
        out: list[Shard] = []
        while (part := self._by_first.get(len(out))) is not None and part:
            out.extend(part)
        return out
