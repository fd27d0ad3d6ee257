"""`cascade calibrate --worker`: add a running worker daemon's per-step overhead to a profile.

The usual flow: fit the engine with `cascade calibrate --engine vllm --out engine.json`, start
the worker as it will serve (`cascade-worker ...`), then
`cascade calibrate --worker HOST:PORT --base-profile engine.json --out serving.json`, and give
`serving.json` to the scheduler and to `cascade bench sim`. See calibrate/serving.py for what is
measured and why.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from cascadeinfer.calibrate.serving import (
    DEFAULT_DECODE_TOKENS,
    PROMPT_LEN,
    RoundResult,
    ServingOverhead,
    measure_serving_overhead,
    serving_profile,
)
from cascadeinfer.calibrate.session import load_average, machine
from cascadeinfer.planning import load_profile, profile_from_json
from cascadeinfer.proto.v1 import worker_pb2, worker_pb2_grpc
from cascadeinfer.security import TlsFiles, client_channel, read_token


def command_line(args: argparse.Namespace) -> str:
    words = ["cascade", "calibrate", "--worker", args.worker, "--base-profile", args.base_profile]
    return shlex.join(words)


def _round_line(r: RoundResult) -> str:
    return (
        f"  batch {r.batch_size:>3}: {r.num_steps:>4} steps, cadence {r.cadence_s * 1e3:8.3f} ms, "
        f"engine step {r.engine_step_s * 1e3:8.3f} ms, profile {r.predicted_s * 1e3:8.3f} ms, "
        f"overhead {r.overhead_s * 1e3:+8.3f} ms"
    )


def as_json(
    overhead: ServingOverhead, doc: dict[str, Any], notes: list[str], info: worker_pb2.WorkerInfo
) -> dict[str, Any]:
    return {
        "worker": {"id": info.worker_id, "engine": info.engine, "model": info.model},
        "per_step_s": overhead.per_step_s,
        "per_sequence_s": overhead.per_sequence_s,
        "rounds": [
            {
                "batch_size": r.batch_size,
                "num_steps": r.num_steps,
                "cadence_s": r.cadence_s,
                "engine_step_s": r.engine_step_s,
                "predicted_s": r.predicted_s,
                "overhead_s": r.overhead_s,
            }
            for r in overhead.rounds
        ],
        "notes": notes,
        "profile": doc,
    }


def run_serving(args: argparse.Namespace) -> int:
    if not args.base_profile:
        raise ValueError(
            "--worker needs --base-profile: the engine's profile (from `cascade calibrate "
            "--engine ...`) to add the daemon's overhead to"
        )
    base = load_profile(args.base_profile)
    base_doc = json.loads(base.to_json())
    tls = TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    tls.validate(is_server=False)
    stub = worker_pb2_grpc.WorkerServiceStub(
        client_channel(args.worker, tls, read_token(args.auth_token_file))
    )
    info = stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=30)
    if info.max_model_len < PROMPT_LEN + DEFAULT_DECODE_TOKENS:
        raise ValueError(
            f"the worker's max_model_len {info.max_model_len} is below the "
            f"{PROMPT_LEN + DEFAULT_DECODE_TOKENS} tokens a calibration request holds"
        )
    print(
        f"cascade calibrate: measuring worker {info.worker_id} ({info.engine}, {info.model}) "
        f"against {base_doc['name']} ...",
        file=sys.stderr,
        flush=True,
    )
    load_before = load_average()
    overhead = measure_serving_overhead(
        stub, base, on_round=lambda r: print(_round_line(r), file=sys.stderr, flush=True)
    )
    load_after = load_average()
    provenance = (
        f"measured {datetime.date.today().isoformat()} by `{command_line(args)}` on "
        f"{machine()} (load average before {load_before}, after {load_after}), step cadence on "
        f"the worker's step feed over {len(overhead.rounds)} decode batches of sizes "
        f"{sorted(overhead.by_batch_size())}"
    )
    name = args.name or f"{base_doc['name']}-serving"
    doc, notes = serving_profile(base_doc, overhead, name=name, provenance=provenance)
    text = json.dumps(doc, indent=2) + "\n"
    profile_from_json(text)  # the core must load what we write
    if args.out is not None:
        Path(args.out).write_text(text, encoding="utf-8")
    if args.json:
        print(json.dumps(as_json(overhead, doc, notes, info), indent=2))
        return 0
    lines = [
        f"worker {info.worker_id}: {info.engine}, {info.model}, {len(overhead.rounds)} rounds",
        f"overhead per step      {overhead.per_step_s * 1e3:+.4f} ms",
        f"overhead per sequence  {overhead.per_sequence_s * 1e6:+.3f} us",
        *(f"note: {n}" for n in notes),
    ]
    lines.append(f"profile written to {args.out}" if args.out else "\n" + text.rstrip())
    print("\n".join(lines))
    return 0
