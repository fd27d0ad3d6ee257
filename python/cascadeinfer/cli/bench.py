"""`cascade bench`: simulated runs (`sim`), all policies side by side (`compare`), and the same
measurements against a running scheduler (`live`)."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from cascadeinfer import workloads
from cascadeinfer.cli import flags
from cascadeinfer.cli.arrival import add_arrival_arguments, gamma_cv
from cascadeinfer.config import POLICY_NAMES
from cascadeinfer.evaluation import live
from cascadeinfer.evaluation.simbench import (
    SUMMARY_KEYS,
    WHOLE_TRACE,
    SimSetup,
    Slo,
    default_rate,
    find_max_rate,
    run_at_rate,
)
from cascadeinfer.goodput import GoodputSlo
from cascadeinfer.planning import load_profile
from cascadeinfer.stage_count import OBJECTIVES


def json_text(doc: Any) -> str:
    """`doc` as standard JSON, NaN and infinities as null (a TPOT where no request made a
    second token, a mean over no finished request). Python's `json` writes them as bare `NaN`
    and `Infinity`, which jq, Go, JavaScript and every other strict parser refuse."""
    return json.dumps(_finite_or_none(doc), allow_nan=False)


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_or_none(v) for v in x]
    return x


PRESET_REQUESTS = 10_000
"""Requests drawn from a preset unless --requests says otherwise."""


def _workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload", required=True, help=f"preset ({workloads.describe_names()}) or JSONL"
    )
    p.add_argument("--instances", type=flags.num_instances, default=16)
    p.add_argument(
        "--requests",
        type=flags.num_requests,
        help=f"requests to simulate (a preset: {PRESET_REQUESTS:,}; a trace: all of it, "
        "else its first REQUESTS)",
    )
    p.add_argument("--seed", type=flags.seed, default=0)
    p.add_argument("--profile", default="gpu-h100-llama3-8b", help="built-in name or JSON file")
    add_arrival_arguments(p)
    slo = GoodputSlo()
    p.add_argument(
        "--goodput-ttft-s",
        type=float,
        default=slo.ttft_base_s,
        help="goodput: TTFT target, fixed part (s)",
    )
    p.add_argument(
        "--goodput-ttft-per-token-s",
        type=float,
        default=slo.ttft_per_prompt_token_s,
        help="goodput: TTFT target, per prompt token (s)",
    )
    p.add_argument(
        "--goodput-tpot-s", type=float, default=slo.tpot_s, help="goodput: TPOT target (s)"
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="mean",
        help="cascade: what the layout chosen by simulation optimizes (mean or p99 e2e, or "
        "goodput by the --goodput-* targets)",
    )
    p.add_argument(
        "--no-capacity-guard",
        action="store_true",
        help="cascade: run without the capacity guard (stage sizes change only by refinement)",
    )


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="simulated and live benchmarks of the policies")
    benches = p.add_subparsers(dest="bench_command", required=True, metavar="KIND")

    s = benches.add_parser("sim", help="one policy in the cluster simulator")
    s.add_argument("--policy", choices=POLICY_NAMES, default="cascade")
    _workload_args(s)
    s.add_argument(
        "--rate",
        type=flags.rate,
        help="requests/s (default: a trace's own rate; for a preset, 60%% of the estimated capacity)",
    )
    s.add_argument("--find-max-rate", action="store_true", help="search the highest rate in SLO")
    s.add_argument("--slo-p99-ttft-s", type=flags.seconds, default=5.0)
    s.add_argument("--slo-p99-tpot-s", type=flags.seconds, default=0.2)
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=run_sim)

    c = benches.add_parser("compare", help="every policy on one workload, several rates")
    _workload_args(c)
    c.add_argument(
        "--rates",
        type=flags.rates,
        help="comma-separated requests/s (default: 0.25x to 1.5x of a trace's own rate, or of the rate planned for a preset)",
    )
    c.add_argument("--slo-p99-ttft-s", type=flags.seconds, default=5.0)
    c.add_argument("--slo-p99-tpot-s", type=flags.seconds, default=0.2)
    c.add_argument("--no-max-rate", action="store_true", help="skip the sustainable-rate search")
    c.add_argument("--out", default="bench-compare", help="directory for the table and plots")
    c.set_defaults(run=run_compare)

    live_parser = benches.add_parser("live", help="replay a trace against a running scheduler")
    live.add_live_arguments(live_parser)
    live_parser.set_defaults(run=run_live)


def _num_requests(args: argparse.Namespace) -> int:
    if args.requests is not None:
        if args.requests < 1:
            raise ValueError(f"--requests {args.requests}: must be >= 1")
        return int(args.requests)
    return PRESET_REQUESTS if workloads.is_workload(args.workload) else WHOLE_TRACE


def _setup(args: argparse.Namespace, policy: str) -> SimSetup:
    return SimSetup(
        policy=policy,
        profile=load_profile(args.profile),
        workload=args.workload,
        num_instances=args.instances,
        num_requests=_num_requests(args),
        arrival=args.arrival,
        cv=gamma_cv(args),
        seed=args.seed,
        objective=args.objective,
        is_capacity_guarded=not args.no_capacity_guard,
        goodput_slo=GoodputSlo(
            args.goodput_ttft_s, args.goodput_ttft_per_token_s, args.goodput_tpot_s
        ),
    )


def _print_summary(summary: dict[str, Any]) -> None:
    for key in ("rate", *SUMMARY_KEYS, "wall_s", "failed"):
        if key not in summary:
            continue
        value = summary[key]
        print(f"  {key:<21} {value:.4g}" if isinstance(value, float) else f"  {key:<21} {value}")


def run_sim(args: argparse.Namespace) -> int:
    setup = _setup(args, args.policy)
    rate = default_rate(setup) if args.rate is None else args.rate
    if not args.find_max_rate:
        summary, _ = run_at_rate(setup, rate)
        if args.json:
            print(json_text(summary))
        else:
            print(f"{args.policy} on {args.workload}, {args.instances} instances, simulated:")
            _print_summary(summary)
        return 0
    _check_rescalable(args.workload, rate)
    slo = Slo(args.slo_p99_ttft_s, args.slo_p99_tpot_s)
    best, at_best, runs = find_max_rate(lambda r: run_at_rate(setup, r)[0], slo, start=rate)
    bounded = math.isfinite(best)
    doc = {
        "max_rate": best if bounded else None,
        "is_bounded": bounded,
        "slo": vars(slo),
        "at_max_rate": at_best,
        "runs": len(runs),
    }
    if args.json:
        print(json_text(doc))
    elif not bounded:
        print(
            f"{args.policy}: the SLO {vars(slo)} held at every rate tried, up to 64x {rate:.4g} "
            "req/s: this workload's load does not grow with the rate (multi-turn sessions are "
            "paced by their think time)"
        )
    else:
        print(f"{args.policy}: highest rate within the SLO {vars(slo)}: {best:.4g} req/s")
        if at_best is not None:
            _print_summary(at_best)
    return 0


def _check_rescalable(workload: str, rate: float) -> None:
    """A rate search or sweep rescales a trace's gaps; one that arrives at once has none."""
    if math.isinf(rate):
        raise ValueError(
            f"trace {workload!r}: its requests all arrive at once, so there are no gaps to "
            "rescale to other rates; `cascade bench sim` replays it as it is"
        )


def run_compare(args: argparse.Namespace) -> int:
    from cascadeinfer.evaluation.compare import compare

    base = _setup(args, "cascade")
    if args.rates:
        rates = args.rates
    else:
        recorded = default_rate(base)
        _check_rescalable(args.workload, recorded)
        rates = [f * recorded for f in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)]
    slo = None if args.no_max_rate else Slo(args.slo_p99_ttft_s, args.slo_p99_tpot_s)
    path = compare(base, rates, slo, args.out)
    print(path.read_text())
    return 0


def run_live(args: argparse.Namespace) -> int:
    summary = live.run_live(args)
    if args.json:
        print(json_text(summary))
    else:
        print(f"replayed against {args.address}:")
        _print_summary(summary)
    return 1 if summary.get("failed") else 0
