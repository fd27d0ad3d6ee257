"""The invariant checker the fault tests rely on flags each way a stream can break: a gap, a
duplicate, a wrong token, a missing finish, a hang, and an error outside an allowed window."""

from __future__ import annotations

import grpc
import pytest
from cascadeinfer.proto.v1 import common_pb2

from tests.scheduler.load import Outcome, Window, check, reference_tokens

PROMPT = tuple(range(1, 40))


def finished(rid: str = "r") -> Outcome:
    o = Outcome(rid, PROMPT, 30, started_at=10.0, ended_at=12.0)
    reference = reference_tokens([o])[rid]
    o.tokens = dict(enumerate(reference))
    o.finish = common_pb2.FINISH_REASON_LENGTH
    return o


def test_a_complete_exact_stream_passes() -> None:
    verdict = check([finished()])
    assert (verdict.num_completed, verdict.lost) == (1, [])


def gap(o: Outcome) -> None:
    del o.tokens[7]


def wrong(o: Outcome) -> None:
    o.tokens[3] += 1


def duplicate(o: Outcome) -> None:
    o.num_duplicates = 1


def unfinished(o: Outcome) -> None:
    o.finish = common_pb2.FINISH_REASON_UNSPECIFIED


def hung(o: Outcome) -> None:
    o.error = grpc.StatusCode.DEADLINE_EXCEEDED


def failed(o: Outcome) -> None:
    o.error = grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("breakage", [gap, wrong, duplicate, unfinished, hung, failed])
def test_each_breakage_is_a_lost_request(breakage: object) -> None:
    o = finished()
    breakage(o)  # type: ignore[operator]
    verdict = check([o])
    assert len(verdict.lost) == 1 and verdict.num_completed == 0


def test_a_clear_failure_is_allowed_only_inside_its_window() -> None:
    o = finished()
    o.error = grpc.StatusCode.UNAVAILABLE
    inside = Window(11.0, 20.0, frozenset({grpc.StatusCode.UNAVAILABLE}))
    later = Window(13.0, 20.0, frozenset({grpc.StatusCode.UNAVAILABLE}))
    assert check([o], [inside]).num_failed_clearly == 1
    assert len(check([o], [later]).lost) == 1
    o.error = grpc.StatusCode.INTERNAL
    assert len(check([o], [inside]).lost) == 1
