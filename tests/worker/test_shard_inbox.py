"""ShardInbox: imported bytes meet the loads waiting for them, in either order, within bounds."""

from __future__ import annotations

import threading

import pytest
from cascadeinfer.worker.engines.shard_inbox import Due, ShardInbox


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def inbox(clock: Clock, max_entries: int = 4) -> ShardInbox[str]:
    return ShardInbox(wait_s=10.0, ttl_s=60.0, max_entries=max_entries, clock=clock)


def test_bytes_first_or_order_first_both_settle_the_load() -> None:
    clock = Clock()
    box = inbox(clock)
    box.put("m1", [b"a", b"b"])
    box.expect("m1", "load-1", 2)
    box.expect("m2", "load-2", 1)
    due = box.next_due(timeout_s=0)
    assert due.ready == [("load-1", [b"a", b"b"])] and due.expired == []
    box.put("m2", [b"c"])
    assert box.next_due(timeout_s=0).ready == [("load-2", [b"c"])]
    assert box.num_held() == 0


def test_a_load_whose_bytes_do_not_come_expires_at_its_deadline() -> None:
    clock = Clock()
    box = inbox(clock)
    box.expect("m1", "load-1", 1)
    clock.now = 9.9
    assert box.next_due(timeout_s=0).expired == []
    clock.now = 10.0
    assert box.next_due(timeout_s=0).expired == ["load-1"]
    box.put("m1", [b"late"])  # too late: held until its TTL, read by nobody
    assert box.next_due(timeout_s=0).ready == []


def test_unread_bytes_are_bounded_by_age_and_count() -> None:
    clock = Clock()
    box = inbox(clock, max_entries=2)
    box.put("m1", [b"1"])
    box.put("m2", [b"2"])
    box.put("m3", [b"3"])  # over the count: the oldest goes
    assert box.num_held() == 2
    box.expect("m1", "load-1", 1)
    assert box.next_due(timeout_s=0).ready == []
    clock.now = 61.0
    box.next_due(timeout_s=0)
    assert box.num_held() == 0
    box.put("m4", [b"4"])
    box.discard("m4")
    assert box.num_held() == 0


def test_the_loader_wakes_when_the_bytes_arrive() -> None:
    box: ShardInbox[str] = ShardInbox(wait_s=30.0, ttl_s=60.0, max_entries=4)
    box.expect("m1", "load-1", 1)
    got = []
    loader = threading.Thread(target=lambda: got.append(box.next_due(timeout_s=20.0)))
    loader.start()
    box.put("m1", [b"x"])
    loader.join(timeout=10.0)
    assert not loader.is_alive() and got[0].ready == [("load-1", [b"x"])]


def test_a_snapshot_sent_in_parts_settles_once_its_blocks_are_all_here() -> None:
    """A peer's rank sends the pre-copied blocks, then the rest after the stop: the load waits
    for the blocks it needs, in whatever order the parts come; the last part settles it even
    when short (the loader then finds too few and recomputes)."""
    clock = Clock()
    box = inbox(clock)
    box.expect("m1", "load-1", 4)
    box.put("m1", [b"c", b"d"], first_block=2, is_last=False)
    assert box.next_due(timeout_s=0).ready == []  # blocks 0-1 missing
    box.put("m1", [b"e"], first_block=4, is_last=True)
    assert box.next_due(timeout_s=0) == Due([("load-1", [])], [])  # last, with a gap: short
    box.put("m2", [b"a", b"b"], first_block=0, is_last=False)
    box.expect("m2", "load-2", 3)
    assert box.next_due(timeout_s=0).ready == []
    box.put("m2", [b"c"], first_block=2, is_last=True)
    assert box.next_due(timeout_s=0).ready == [("load-2", [b"a", b"b", b"c"])]


def test_held_bytes_are_bounded_oldest_snapshot_first() -> None:
    clock = Clock()
    box: ShardInbox[str] = ShardInbox(
        wait_s=10.0, ttl_s=60.0, max_entries=8, max_bytes=10, clock=clock
    )
    box.put("m1", [b"aaaa"], is_last=False)
    box.put("m2", [memoryview(b"bbbb")])
    box.put("m1", [b"cccc"], first_block=1)  # 12 bytes held: m1, the oldest, goes whole
    assert box.num_held() == 1
    box.expect("m2", "load-2", 1)
    assert box.next_due(timeout_s=0).ready == [("load-2", [memoryview(b"bbbb")])]
    box.put("m3", [b"x" * 10])  # at the bound, kept
    assert box.num_held() == 1


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        ShardInbox(wait_s=0.0, ttl_s=1.0, max_entries=1)


def test_a_snapshot_still_arriving_does_not_age_out() -> None:
    # A pre-copy of a 32K-token request (4.3 GB) can take longer than the TTL: its first part
    # must still be there when the last comes.
    clock = Clock()
    box = inbox(clock)
    box.put("m1", [b"a"], is_last=False)
    clock.now = 50.0
    box.put("m1", [b"b"], first_block=1, is_last=False)
    clock.now = 100.0
    box.put("m1", [b"c"], first_block=2)
    box.expect("m1", "load-1", 3)
    assert box.next_due(timeout_s=0).ready == [("load-1", [b"a", b"b", b"c"])]
