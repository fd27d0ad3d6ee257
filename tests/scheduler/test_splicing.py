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
