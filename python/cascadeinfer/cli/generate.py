"""`cascade generate`: stream one request through a scheduler."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc

from cascadeinfer.cli import flags
from cascadeinfer.cli.client import (
    add_connection_args,
    describe_rpc_error,
    generate,
    scheduler_stub,
)
from cascadeinfer.proto.v1 import scheduler_pb2

FINISHED = ("length", "stop")
"""Finish reasons of a request that ran to its end; any other (abort) exits 1."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="stream one request through a cascade-scheduler",
        description="Exits 0 for a request that finished (length or stop), 1 for one that "
        "failed or that the cluster ended (abort).",
    )
    add_connection_args(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-token-ids", help="comma-separated token ids")
    prompt.add_argument("--text", help="a text prompt (needs a tokenizer on the scheduler)")
    p.add_argument("--max-tokens", type=flags.max_tokens, required=True)
    p.add_argument("--request-id", default="")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.set_defaults(run=run)


def parse_token_ids(text: str) -> list[int]:
    """Comma-separated token ids, each in [0, 2**32) as the protocol carries them: `-1` was
    refused by protobuf as "Value out of range: -1", not naming the flag, and `1,,2` taken for
    `1,2`."""
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--prompt-token-ids {text!r}: expected comma-separated integers"
        ) from None
    if not ids or not all(0 <= i < 1 << 32 for i in ids):
        raise ValueError(f"--prompt-token-ids {text!r}: token ids are in [0, 4294967295]")
    return ids


def run(args: argparse.Namespace) -> int:
    prompt = args.text if args.text is not None else parse_token_ids(args.prompt_token_ids)

    def stream(chunk: scheduler_pb2.ClientGenerateResponse) -> None:
        if args.json:
            return
        if args.text is not None:
            print(chunk.text, end="", flush=True)
        elif chunk.tokens.token_ids:
            print(" ".join(map(str, chunk.tokens.token_ids)), end=" ", flush=True)

    try:
        stub = scheduler_stub(args.address, args)
        g = generate(stub, prompt, args.max_tokens, args.request_id, stream)
    except grpc.RpcError as e:
        print(f"cascade generate: {describe_rpc_error(e, args.address)}", file=sys.stderr)
        return 1
    t = g.timings
    if args.json:
        doc = {
            "request_id": g.request_id,
            "token_ids": g.token_ids,
            **({"text": g.text} if args.text is not None else {}),
            "finish_reason": g.finish_reason,
            "ttft_s": t.ttft_s,
            "tpot_s": t.tpot_s,
            "total_s": t.total_s,
            "migrations": t.num_migrations,
        }
        print(json.dumps(doc))
    else:
        print(
            f"\n[{g.request_id}] {len(g.token_ids)} tokens, finish={g.finish_reason}, ttft={t.ttft_s * 1e3:.1f} ms, "
            f"tpot={t.tpot_s * 1e3:.2f} ms, total={t.total_s:.2f} s, migrations={t.num_migrations}"
        )
    # A request the cluster ended (its worker drained or died with nobody to take it over)
    # is a failure to a script, though its stream ended cleanly.
    return 0 if g.finish_reason in FINISHED else 1
