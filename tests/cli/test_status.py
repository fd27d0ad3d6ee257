"""`cascade status`'s table: what workers and the scheduler report is shown, never acted on by
the operator's terminal."""

from __future__ import annotations

from cascadeinfer.cli.status import format_state
from cascadeinfer.proto.v1 import scheduler_pb2


def test_ids_a_terminal_would_act_on_are_shown_escaped() -> None:
    """A worker id with a newline and ANSI escapes cleared the screen and drew a fake row."""
    hostile = "ok\n\x1b[2J\x1b[1;31mFAKE-ROW  0 yes\x1b[0m"
    state = scheduler_pb2.ClusterState(policy="cascade")
    state.stages.add(min_len=0, max_len=4096, worker_ids=[hostile, "w-1"])
    state.workers.add(worker_id=hostile, stage=0, is_healthy=True, engine="sim")
    state.workers.add(worker_id="w-1", stage=0, is_healthy=True, engine="sim")
    text = format_state(state)
    assert "\x1b" not in text and text.count("\n") == 5, text
    assert "ok\\n\\x1b[2J" in text
    assert "\n    0        0     4096  ok\\n" in text and ", w-1" in text
    assert "\nw-1 " in text, "a printable id is shown as it is"
