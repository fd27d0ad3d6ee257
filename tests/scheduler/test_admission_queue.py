"""AdmissionQueue: priority first, then clients in turn, FIFO within a client, within bounds."""

from __future__ import annotations

import pytest
from cascadeinfer.scheduler.admission_queue import AdmissionQueue, QueueFull


def drain(q: AdmissionQueue) -> list[str]:
    out = []
    while (rid := q.pop()) is not None:
        out.append(rid)
    return out


def test_one_client_is_served_first_come_first_served() -> None:
    q = AdmissionQueue(10)
    for rid in ("a1", "a2", "a3"):
        q.push(rid, "alice", 0)
    assert drain(q) == ["a1", "a2", "a3"] and len(q) == 0


def test_a_client_with_a_backlog_delays_anothers_request_by_one_turn() -> None:
    q = AdmissionQueue(100)
    for k in range(50):
        q.push(f"flood-{k}", "flooder", 0)
    assert q.pop() == "flood-0"
    q.push("polite", "polite-client", 0)
    order = drain(q)
    assert order.index("polite") <= 1, order[:5]
    assert [r for r in order if r != "polite"] == [f"flood-{k}" for k in range(1, 50)]


def test_clients_with_backlogs_take_turns_and_priority_comes_first() -> None:
    q = AdmissionQueue(100)
    for k in range(3):
        q.push(f"a{k}", "alice", 0)
        q.push(f"b{k}", "bob", 0)
    q.push("urgent", "bob", 5)
    assert drain(q) == ["urgent", "a0", "b0", "a1", "b1", "a2", "b2"]


def test_a_request_put_back_goes_behind_its_clients_others_and_resumes_go_first() -> None:
    q = AdmissionQueue(10)
    for rid in ("a1", "a2"):
        q.push(rid, "alice", 0)
    assert q.pop() == "a1"
    q.requeue("a1", "alice", 0)  # no room for it yet
    q.resume("lost", "bob")
    assert drain(q) == ["lost", "a2", "a1"]


def test_bounds_count_live_requests_only() -> None:
    q = AdmissionQueue(4, max_per_owner=2)
    q.push("a1", "alice", 0)
    q.push("a2", "alice", 0)
    with pytest.raises(QueueFull, match="max_queue_per_client"):
        q.push("a3", "alice", 0)
    q.push("b1", "bob", 0)
    q.push("b2", "bob", 0)
    with pytest.raises(QueueFull, match="queue is full"):
        q.push("c1", "carol", 0)
    q.discard("a1")  # aborted while queued: its place is free at once
    q.discard("a1")
    q.discard("never-queued")
    assert len(q) == 3
    q.push("a3", "alice", 0)
    assert drain(q) == ["b1", "a2", "b2", "a3"]  # b1 had the turn a1 left
    q.push("a4", "alice", 0)
    q.clear()
    assert len(q) == 0 and q.pop() is None
