"""`cascade status`: the cluster state a scheduler reports."""

from __future__ import annotations

import argparse
import json
from typing import Any

from google.protobuf.json_format import MessageToDict

from cascadeinfer.cli.client import add_connection_args, scheduler_stub
from cascadeinfer.proto.v1 import scheduler_pb2


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="print a scheduler's stages and workers")
    add_connection_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def shown(text: str) -> str:
    """`text` as a terminal may print it: what is not printable escaped as Python writes it
    (ids come from workers and clients; one with ANSI escapes cleared the operator's screen
    and drew a fake row of this table)."""
    return text if text.isprintable() else repr(text)[1:-1]


def format_state(state: scheduler_pb2.ClusterState) -> str:
    lines = [
        f"policy {shown(state.policy)}; {state.num_migrations} migrations; "
        f"queue {state.queue_depth}"
    ]
    lines.append(f"{'stage':>5} {'min_len':>8} {'max_len':>8}  workers")
    for k, s in enumerate(state.stages):
        workers = ", ".join(shown(w) for w in s.worker_ids)
        lines.append(f"{k:>5} {s.min_len:>8} {s.max_len:>8}  {workers}")
    lines.append(
        f"{'worker':<24} {'stage':>5} {'healthy':>7} {'running':>7} {'kv used':>8} {'engine':>6}"
    )
    for w in state.workers:
        lines.append(
            f"{shown(w.worker_id):<24} {w.stage:>5} {'yes' if w.is_healthy else 'no':>7} "
            f"{w.num_running:>7} {w.kv_blocks_used:>8} {shown(w.engine):>6}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    state = scheduler_stub(args.address, args).GetClusterState(
        scheduler_pb2.GetClusterStateRequest(), timeout=10
    )
    print(json.dumps(MessageToDict(state), indent=2) if args.json else format_state(state))
    return 0
