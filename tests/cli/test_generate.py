"""`cascade generate`'s exit status: what a script reads to tell a finished request from one
the cluster ended."""

from __future__ import annotations

import argparse

import pytest
from cascadeinfer.cli import generate as generate_command
from cascadeinfer.cli.client import Generation
from cascadeinfer.proto.v1 import scheduler_pb2


@pytest.mark.parametrize(("finish", "status"), [("length", 0), ("stop", 0), ("abort", 1)])
def test_a_request_the_cluster_ended_exits_1(
    finish: str, status: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its only worker drained under it: `1079 tokens, finish=abort` printed, and exit 0."""
    ended = Generation("r", [1, 2], finish, scheduler_pb2.RequestTimings())
    monkeypatch.setattr(generate_command, "scheduler_stub", lambda address, args: None)
    monkeypatch.setattr(generate_command, "generate", lambda *args: ended)
    args = argparse.Namespace(
        text=None, prompt_token_ids="1,2", json=True, address="x:1", max_tokens=2, request_id=""
    )
    assert generate_command.run(args) == status
