"""`cascade plan`: the optimal stage partition for a workload on N instances."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from cascadeinfer import _core
from cascadeinfer.cli import flags
from cascadeinfer.cli.arrival import add_arrival_arguments, gamma_cv
from cascadeinfer.config import CascadeConfig
from cascadeinfer.planning import PlanResult, load_profile, plan_stages
from cascadeinfer.stage_count import OBJECTIVES, Candidate


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="partition N instances into length stages for a workload",
        description="Solve the stage partition (boundaries and instances per stage) that "
        "minimizes the predicted mean end-to-end latency; the number of stages is the one whose "
        "best plan has the lowest mean latency in the cluster simulator.",
    )
    p.add_argument(
        "--instances", type=flags.num_instances, required=True, help="number of engine instances"
    )
    p.add_argument("--workload", required=True, help="preset name or JSONL trace file")
    p.add_argument(
        "--profile", default="gpu-h100-llama3-8b", help="built-in profile name or JSON file"
    )
    p.add_argument(
        "--rate",
        type=flags.rate,
        help="arrivals per second (default: the trace's rate, "
        "or 60%% of the fleet's estimated capacity for a preset)",
    )
    add_arrival_arguments(
        p, "arrival process to plan for (a trace file's own gaps unless gamma is named)"
    )
    p.add_argument("--max-stages", type=flags.max_stages, help="at most this many stages")
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="mean",
        help="what the layout chosen by simulation optimizes: mean or p99 end-to-end latency, "
        "or goodput (TTFT <= 1 s + 0.2 ms per prompt token and TPOT <= 0.1 s)",
    )
    p.add_argument(
        "--no-capacity-guard",
        action="store_true",
        help="plan for a scheduler run with --no-capacity-guard (stage sizes stay as planned)",
    )
    p.add_argument(
        "--buckets",
        type=flags.num_buckets,
        default=128,
        help="length buckets (boundary resolution)",
    )
    p.add_argument("--seed", type=flags.seed, default=0, help="seed for preset sampling")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def _predicted(s: _core.PlannedStage) -> bool:
    """Whether the model predicted this stage: a stage it finds infeasible at its size (a
    one-stage plan, or sizes the selection searched) carries zeros."""
    return s.tpot_s > 0


def as_json(result: PlanResult) -> dict[str, Any]:
    return {
        "stages": [
            {
                "min_len": s.min_len,
                "max_len": s.max_len,
                "instances": s.num_instances,
                "predicted_tpot_s": s.tpot_s if _predicted(s) else None,
                "predicted_utilization": s.utilization if _predicted(s) else None,
                "predicted_queue_wait_s": s.queue_wait_s if _predicted(s) else None,
            }
            for s in result.plan.stages
        ],
        # None where the model finds the layout infeasible (the simulation chose it).
        "objective": result.plan.objective_s if math.isfinite(result.plan.objective_s) else None,
        "objective_name": "predicted mean end-to-end latency (s)",
        "stage_count_candidates": [
            {
                "stages": c.num_stages,
                "instances": [s.num_instances for s in c.plan.stages],
                "sizes_searched": c.is_resized,
                "one_stage_balanced": c.config.is_one_stage_balanced,
                "one_stage_kv_first": c.config.is_one_stage_kv_first,
                "one_stage_turns": c.config.one_stage_turns,
                "simulated_mean_e2e_s": c.simulated_mean_e2e_s,
                "simulated_p99_e2e_s": c.simulated_p99_e2e_s,
                # Against the default targets (the goodput objective and the goodput guard
                # weigh it); None where a request did not finish.
                "simulated_goodput": None
                if math.isnan(c.simulated_goodput)
                else c.simulated_goodput,
                "traces_simulated": len(c.per_trace),
            }
            for c in result.candidates
        ],
        "one_stage_balanced": result.config.is_one_stage_balanced,
        "one_stage_kv_first": result.config.is_one_stage_kv_first,
        "one_stage_turns": result.config.one_stage_turns,
        "capacity_guarded": result.config.is_capacity_guarded,
        "solve_ms": result.solve_ms,
        "rate": result.rate,
        "dropped_requests": result.requests.num_dropped,
        "truncated_requests": result.requests.num_truncated,
    }


def _label(c: Candidate) -> str:
    if c.num_stages > 1:
        sizes = "/".join(str(s.num_instances) for s in c.plan.stages)
        return f"{c.num_stages} stages ({sizes}{', sizes searched' if c.is_resized else ''})"
    if c.config.one_stage_turns == "blind":
        baseline = "Llumnix" if c.config.is_one_stage_kv_first else "least-load"
        return f"1 stage, turns blind to the caches ({baseline})"
    if c.config.one_stage_turns == "cache-aware":
        return "1 stage, turns placed as cache-aware"
    if c.config.is_one_stage_kv_first:
        return "1 stage, KV first (Llumnix's way)"
    return "1 stage, balanced" if c.config.is_one_stage_balanced else "1 stage (least-load)"


def as_table(result: PlanResult, args: argparse.Namespace) -> str:
    at_once = args.rate is None and result.requests.rate == math.inf
    pace = (
        f"arriving at once (planned for the fleet's capacity, {result.rate:.3f} req/s)"
        if at_once
        else f"at {result.rate:.3f} req/s"
    )
    lines = [
        f"workload {args.workload} {pace} on {args.instances} instances (profile {args.profile})",
        f"{'stage':>5} {'min_len':>8} {'max_len':>8} {'inst':>4} {'util':>6} {'tpot_ms':>8} "
        f"{'wait_ms':>8}",
    ]
    for k, s in enumerate(result.plan.stages):
        model = (
            f"{s.utilization:>6.1%} {s.tpot_s * 1e3:>8.2f} {s.queue_wait_s * 1e3:>8.2f}"
            if _predicted(s)
            else f"{'-':>6} {'-':>8} {'-':>8}"
        )
        lines.append(f"{k:>5} {s.min_len:>8} {s.max_len:>8} {s.num_instances:>4} {model}")
    objective = result.plan.objective_s
    predicted = (
        f"predicted mean end-to-end latency {objective:.3f} s"
        if math.isfinite(objective)
        else "the model finds this layout infeasible (the simulation chose it)"
    )
    lines.append(f"{predicted}; solved in {result.solve_ms:.1f} ms")
    if result.candidates:
        num_traces = max(len(c.per_trace) for c in result.candidates)
        simulated = ", ".join(
            f"{_label(c)} {c.simulated_mean_e2e_s:.2f}/{c.simulated_p99_e2e_s:.1f} s"
            + (
                f", goodput {c.simulated_goodput:.1%}"
                if not math.isnan(c.simulated_goodput)
                else ""
            )
            + (f" (dropped after {len(c.per_trace)} traces)" if c.is_pruned(num_traces) else "")
            for c in result.candidates
        )
        lines.append(
            "layout chosen in the simulator (mean/p99 e2e of each candidate; a split must beat "
            f"one stage): {simulated}"
        )
    lines.append(
        "capacity guard on: at run time whole instances move to a stage whose decode steps "
        "run slower than the pooled fleet's (--no-capacity-guard keeps these sizes)"
        if result.config.is_capacity_guarded
        else "capacity guard off: stage sizes change only by refinement"
    )
    r = result.requests
    if r.num_dropped or r.num_truncated:
        lines.append(
            f"note: {r.num_dropped} requests longer than the model's max length were dropped, "
            f"{r.num_truncated} had their output cut to fit"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    result = plan_stages(
        num_instances=args.instances,
        workload=args.workload,
        profile=profile,
        rate=args.rate,
        num_buckets=args.buckets,
        max_stages=args.max_stages,
        objective=args.objective,
        seed=args.seed,
        arrival_cv=gamma_cv(args) if args.arrival == "gamma" else None,
        config=CascadeConfig(is_capacity_guarded=not args.no_capacity_guard),
    )
    print(json.dumps(as_json(result), indent=2) if args.json else as_table(result, args))
    return 0
