"""`cascade trace gen`: writes a JSONL request trace from a workload preset and an arrival
process, for `cascade bench sim|live` and `cascade plan` (or to edit by hand). `cascade trace
stats`: the length statistics of a preset or a trace, as docs/design/workloads.md reports them."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cascadeinfer import workloads
from cascadeinfer.cli import flags
from cascadeinfer.cli.arrival import add_arrival_arguments, gamma_cv
from cascadeinfer.traces import from_entries, read_trace, write_trace


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "trace",
        help="request traces (JSONL: arrival_s, prompt_len, output_len[, session_id, turn, prefix_len])",
    )
    traces = p.add_subparsers(dest="trace_command", required=True, metavar="ACTION")
    g = traces.add_parser("gen", help="write a trace sampled from a workload preset")
    g.add_argument("--workload", required=True, help=f"preset: {workloads.describe_names()}")
    g.add_argument("--requests", type=flags.num_requests, required=True, help="number of requests")
    g.add_argument(
        "--rate",
        type=flags.rate,
        required=True,
        help="mean arrival rate, requests/s (presets with sessions: the steady-state rate, "
        "reached once sessions overlap; docs/design/workloads.md)",
    )
    add_arrival_arguments(g)
    g.add_argument("--seed", type=flags.seed, default=0)
    g.add_argument("--max-len", type=int, help="clamp prompt+output to this many tokens")
    g.add_argument("--out", required=True, help="JSONL file to write")
    g.set_defaults(run=run)
    s = traces.add_parser("stats", help="prompt and output length statistics of a workload")
    s.add_argument("workload", help=f"JSONL trace, or preset: {workloads.describe_names()}")
    s.add_argument(
        "--requests", type=flags.num_requests, default=20_000, help="requests drawn from a preset"
    )
    s.add_argument("--seed", type=flags.seed, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=run_stats)


def run(args: argparse.Namespace) -> int:
    trace = workloads.get(args.workload).trace(
        args.requests, args.rate, args.arrival, gamma_cv(args), args.seed
    )
    if args.max_len:
        from cascadeinfer.evaluation.simbench import clamp

        trace = clamp(trace, args.max_len)
    write_trace(args.out, from_entries(trace))
    span = trace[-1][0] if trace else 0.0
    print(f"wrote {len(trace)} requests over {span:.1f} s to {args.out}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    if workloads.is_workload(args.workload) or not Path(args.workload).is_file():
        prompts, outputs = workloads.get(args.workload).sample(args.requests, args.seed)
    else:
        trace = read_trace(args.workload)
        prompts = [r.prompt_len for r in trace]
        outputs = [r.output_len for r in trace]
    stats = {"prompt": workloads.length_stats(prompts), "output": workloads.length_stats(outputs)}
    if args.json:
        print(json.dumps({"requests": len(prompts), **{k: asdict(v) for k, v in stats.items()}}))
        return 0
    print(f"{args.workload}: {len(prompts)} requests")
    print(f"{'tokens':<8} {'mean':>8} {'median':>8} {'p99':>8} {'max':>8}")
    for key, st in stats.items():
        print(f"{key:<8} {st.mean:>8.0f} {st.median:>8.0f} {st.p99:>8} {st.max:>8}")
    return 0
