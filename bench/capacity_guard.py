"""The capacity guard's own effect: plans each cell once, as `bench/no_regret.py` does, then
simulates the chosen plan with the guard on and off, so the difference is the guard's alone
(the plan, the trace and everything else held fixed).

    python bench/capacity_guard.py p2:302:12 prod:203:12 [--instances 16]

A cell is KIND:SEED:RATE, KIND one of `bench/bursty_traces.py`'s kinds. Prints per cell the
stage count of the chosen plan, then mean and p99 end-to-end latency and layout changes with
the guard on and off (profile `gpu-h100-llama3-8b`, 3,000 requests).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bursty_traces
from cascadeinfer import _core
from cascadeinfer.evaluation.simbench import make_trace
from cascadeinfer.planning import load_profile, plan_stages

PROFILE = "gpu-h100-llama3-8b"
REQUESTS = 3000


def _cell(args: tuple[str, int]) -> str:
    spec, instances = args
    kind, seed, rate_text = spec.split(":")
    rate = float(rate_text)
    profile = load_profile(PROFILE)
    lengths, arrivals, _ = bursty_traces.TRACES[kind]
    path = Path(tempfile.mkdtemp(prefix="guard-")) / f"{kind}-{seed}.jsonl"
    bursty_traces.write(path, lengths, arrivals, int(seed))
    trace = make_trace(str(path), num_requests=REQUESTS, rate=rate, max_len=profile.max_model_len)
    chosen = plan_stages(
        num_instances=instances, workload=str(path), profile=profile, rate=rate,
        max_len=profile.max_model_len, seed=1, back_off_when_infeasible=True,
        clamp_prompts=True, horizon_requests=REQUESTS,
    )  # fmt: skip
    ids = list(range(instances))
    figures = []
    for is_guarded in (True, False):
        config = dataclasses.replace(chosen.config, is_capacity_guarded=is_guarded)
        policy = _core.Scheduler.cascade(
            profile, chosen.plan, ids, chosen.workload.grid, config, chosen.workload
        )
        report = _core.simulate(policy, profile, trace, ids)
        s = report.summary()
        figures.append(
            f"{s['mean_e2e_s']:.2f} s / {s['p99_e2e_s']:.1f} s ({report.num_layout_changes})"
        )
    return f"| {spec} | {len(chosen.plan.stages)} | {figures[0]} | {figures[1]} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cells", nargs="+", help="KIND:SEED:RATE")
    p.add_argument("--instances", type=int, default=16)
    args = p.parse_args()
    print("| cell | stages | guard on: mean / p99 (changes) | guard off |")
    print("|---|---|---|---|")
    with ProcessPoolExecutor(2) as pool:
        for row in pool.map(_cell, [(c, args.instances) for c in args.cells]):
            print(row, flush=True)


if __name__ == "__main__":
    main()
