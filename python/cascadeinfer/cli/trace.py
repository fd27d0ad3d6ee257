"""`cascade trace gen`: writes a JSONL request trace from a workload preset and an arrival
process, for `cascade bench sim|live` and `cascade plan` (or to edit by hand)."""

from __future__ import annotations

import argparse
from typing import Any

from cascadeinfer import _core
from cascadeinfer.traces import TraceRequest, write_trace


def add_parser(sub: Any) -> None:
    p = sub.add_parser("trace", help="request traces (JSONL: arrival_s, prompt_len, output_len)")
    traces = p.add_subparsers(dest="trace_command", required=True, metavar="ACTION")
    g = traces.add_parser("gen", help="write a trace sampled from a workload preset")
    g.add_argument("--workload", required=True, help=f"preset: {', '.join(_core.preset_names())}")
    g.add_argument("--requests", type=int, required=True, help="number of requests")
    g.add_argument("--rate", type=float, required=True, help="mean arrival rate, requests/s")
    g.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    g.add_argument("--cv", type=float, default=1.0, help="gamma: inter-arrival CV (burstiness)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-len", type=int, help="clamp prompt+output to this many tokens")
    g.add_argument("--out", required=True, help="JSONL file to write")
    g.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    trace = _core.generate_trace(
        args.workload, args.requests, args.rate, args.arrival, args.cv, args.seed
    )
    if args.max_len:
        from cascadeinfer.evaluation.simbench import clamp

        trace = clamp(trace, args.max_len)
    write_trace(args.out, [TraceRequest(a, p, o) for a, p, o in trace])
    span = trace[-1][0] if trace else 0.0
    print(f"wrote {len(trace)} requests over {span:.1f} s to {args.out}")
    return 0
