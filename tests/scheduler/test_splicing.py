"""Splicing one request's tokens from several workers' feeds, in whatever order they arrive."""

from __future__ import annotations

from cascadeinfer.domain import FinishReason, SamplingSpec
from cascadeinfer.scheduler.requests import ClientRequest, Delivery


def request() -> ClientRequest:
    return ClientRequest("r", 1, (1, 2, 3), SamplingSpec(max_tokens=6, ignore_eos=True))


def drain(rec: ClientRequest) -> list[Delivery]:
    out = []
    while (d := rec.take_delivery()) is not None:
        out.append(d)
    return out


def test_target_finishing_before_the_source_tail_arrives_still_finishes() -> None:
    """A fast migration target sends its tokens and the finish before the scheduler has read
    the source's last tokens: the finish must wait for them, not be dropped."""
    rec = request()
    rec.deliver(0, [10, 11], None)  # source, before the move
    rec.deliver(4, [14, 15], FinishReason.LENGTH)  # target, already done
    assert not rec.is_done
    rec.deliver(2, [12, 13], None)  # the source's tail, late
    assert rec.is_done and rec.finish == FinishReason.LENGTH
    deliveries = drain(rec)
    assert [t for d in deliveries for t in d.token_ids] == [10, 11, 12, 13, 14, 15]
    assert deliveries[-1].finish == FinishReason.LENGTH
    assert [d.finish for d in deliveries[:-1]] == [None] * (len(deliveries) - 1)


def test_duplicates_and_overlaps_are_sent_once_in_order() -> None:
    rec = request()
    rec.deliver(0, [10, 11, 12], None)
    rec.deliver(1, [11, 12, 13], None)  # overlap from a second feed
    rec.deliver(3, [13, 14, 15], FinishReason.LENGTH)
    assert rec.tokens == [10, 11, 12, 13, 14, 15]
    assert rec.is_done
    assert sum(len(d.token_ids) for d in drain(rec)) == 6


def test_nothing_after_the_finish() -> None:
    rec = request()
    rec.deliver(0, [10], FinishReason.STOP)
    rec.deliver(1, [11], None)
    assert rec.tokens == [10] and rec.finish == FinishReason.STOP


def test_a_feed_past_max_tokens_is_dropped_and_its_finish_counts_at_the_bound() -> None:
    """A lying or broken worker: more tokens than asked (5,050 for max_tokens 50 reached the
    client) and tokens past a gap that never fills (`pending` grew to 2.1 GB in 8 s)."""
    rec = request()  # max_tokens 6
    assert rec.deliver(0, [10, 11, 12, 13, 14, 15, 16, 17], None) == 2
    assert rec.tokens == [10, 11, 12, 13, 14, 15]
    flood = request()
    assert flood.deliver(2, [0] * 20_000, None) == 19_996
    assert flood.deliver(50_000, [0] * 20_000, None) == 20_000
    assert sorted(flood.pending) == [2, 3, 4, 5], "only indices a client could get are kept"
    far = request()
    far.deliver(0, [10, 11, 12, 13, 14, 15], None)
    far.deliver(1_000_000, [], FinishReason.STOP)
    assert far.is_done and far.finish == FinishReason.STOP


def test_tokens_held_on_a_gap_say_since_when_until_it_fills() -> None:
    rec = request()
    rec.deliver(0, [10], None)
    assert rec.held_since is None
    rec.deliver(3, [13], None)
    since = rec.held_since
    assert since is not None
    rec.deliver(4, [14], None)
    assert rec.held_since == since, "still held since the gap opened"
    rec.deliver(1, [11, 12], None)
    assert rec.held_since is None and rec.tokens == [10, 11, 12, 13, 14]
    rec.deliver(6, [], FinishReason.LENGTH)  # a finish ahead of token 5
    assert rec.held_since is not None and not rec.is_done
    rec.deliver(5, [15], None)
    assert rec.is_done and rec.held_since is None
