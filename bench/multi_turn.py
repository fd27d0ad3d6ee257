"""Multi-turn traffic with prefix caching: every policy on the multi-turn presets (`agentic`,
`sharegpt-multiturn`), whose requests carry their sessions, in the simulator with prefix
caches (docs/design/simulator.md), on 16 instances of the GPU profile, Gamma CV 2 arrivals
as in `make evaluation`, 3 seeds, at 0.5x, 1x, 1.5x and 3x the rate `cascade plan` plans for
(which counts every prompt token as prefill, so with prefix caching the fleet has more room).

Prints a markdown table per workload: mean and p99 TTFT and end-to-end latency and the
prefix-cache hit rate of each policy (mean over seeds), and cascade over cache-aware (worst
seed, then the range). docs/evaluation.md quotes it. A session's turns come ~30 s apart, so a
trace reaches its nominal rate only once sessions overlap, and its last sessions run on alone
long after the others: the table gives the rate offered while sessions still start (requests
arriving up to the last session's start over that time), which is what loads the fleet.

    .venv/bin/python bench/multi_turn.py [--requests 12000] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascadeinfer.config import POLICY_NAMES
from cascadeinfer.evaluation.simbench import SimSetup, default_rate, run_at_rate, setup_trace
from cascadeinfer.planning import load_profile

WORKLOADS = ("agentic", "sharegpt-multiturn")
RATE_FACTORS = (0.5, 1.0, 1.5, 3.0)
KEYS = ("mean_ttft_s", "p99_ttft_s", "mean_e2e_s", "p99_e2e_s", "prefix_cache_hit_rate")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=12_000)
    p.add_argument("--instances", type=int, default=16)
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args()
    profile = load_profile("gpu-h100-llama3-8b")
    seeds = [int(s) for s in args.seeds.split(",")]
    for workload in WORKLOADS:
        base = SimSetup("cascade", profile, workload, args.instances, args.requests, "gamma", 2.0)
        planned = default_rate(base)
        print(
            f"\n### {workload} (Gamma CV 2, {args.instances} instances, {args.requests} requests)\n"
        )
        print(
            "| rate (req/s) | offered (req/s) | policy | mean TTFT (s) | p99 TTFT (s) "
            "| mean e2e (s) | p99 e2e (s) | prefix-cache hits | unfinished |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        ratios: list[str] = []
        for factor in RATE_FACTORS:
            rate = factor * planned
            offered = statistics.fmean(_offered(replace(base, seed=seed), rate) for seed in seeds)
            runs = {
                policy: [
                    run_at_rate(replace(base, policy=policy, seed=seed), rate)[0] for seed in seeds
                ]
                for policy in POLICY_NAMES
            }
            for policy, summaries in runs.items():
                mean = {k: statistics.fmean(s[k] for s in summaries) for k in KEYS}
                unfinished = sum(s["requests"] - s["completed"] for s in summaries)
                print(
                    f"| {rate:.3g} | {offered:.3g} | {policy} | {mean['mean_ttft_s']:.3f} "
                    f"| {mean['p99_ttft_s']:.2f} "
                    f"| {mean['mean_e2e_s']:.2f} | {mean['p99_e2e_s']:.1f} "
                    f"| {mean['prefix_cache_hit_rate']:.1%} | {unfinished:.0f} |"
                )
            ratios.append(_ratio_row(rate, runs["cascade"], runs["cache-aware"]))
        print("\nCascade over cache-aware, worst seed (range over seeds):\n")
        print("| rate (req/s) | mean e2e | p99 e2e | mean TTFT | p99 TTFT |")
        print("|---|---|---|---|---|")
        print("\n".join(ratios))


def _offered(setup: SimSetup, rate: float) -> float:
    """Requests a second from the first arrival to the last session's start."""
    trace = setup_trace(setup, rate)
    last_start = max(e[0] for e in trace if len(e) == 6 and e[4] == 0)
    num_before = sum(1 for e in trace if e[0] <= last_start)
    return (num_before - 1) / (last_start - trace[0][0])


def _ratio_row(rate: float, ours: list[dict[str, float]], theirs: list[dict[str, float]]) -> str:
    cells = []
    for key in ("mean_e2e_s", "p99_e2e_s", "mean_ttft_s", "p99_ttft_s"):
        r = [a[key] / b[key] for a, b in zip(ours, theirs, strict=True)]
        cells.append(f"{max(r):.3f} ({min(r):.3f}-{max(r):.3f})")
    return f"| {rate:.3g} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
