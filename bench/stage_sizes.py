"""Every way to size the stages of one of the partitioner's plans, simulated on a benchmark's
own trace: how far the partitioner's steady-state sizes are from the best sizes for the run,
and what the layout selection's size search found (docs/benchmarks.md, "Stage sizes searched
by simulation").

    python bench/stage_sizes.py [--workload reasoning] [--rate 29.3] [--requests 3000]
                                [--stages 4] [--top 8]

The trace is the one `cascade bench sim --workload W --rate R --requests N --arrival gamma
--cv 2 --seed 1` runs (16 instances, default profile); the stage ranges are those of the
selection's candidate with `--stages` stages that the partitioner proposed. Each size split
runs with the policy as it ships (refinement, balancing and the capacity guard on). About 35
s for 4 stages (455 splits) on 2 cores.
"""

from __future__ import annotations

import argparse
import itertools

from cascadeinfer import _core
from cascadeinfer.evaluation.simbench import SimSetup, policy_options, run_at_rate, setup_trace
from cascadeinfer.planning import load_profile
from cascadeinfer.policies import plan_cascade
from cascadeinfer.stage_count import simulated_e2e

INSTANCES = 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="reasoning")
    p.add_argument("--rate", type=float, default=29.3)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    profile = load_profile("gpu-h100-llama3-8b")

    def setup(policy: str) -> SimSetup:
        return SimSetup(
            policy=policy,
            profile=profile,
            workload=args.workload,
            num_instances=INSTANCES,
            num_requests=args.requests,
            arrival="gamma",
            cv=2.0,
            seed=1,
        )

    trace = setup_trace(setup("cascade"), args.rate)
    result = plan_cascade(
        profile, INSTANCES, **policy_options(setup("cascade"), args.rate, len(trace))
    )
    chosen = next(c for c in result.candidates if c.plan is result.plan)
    proposed = next(
        c for c in result.candidates if c.num_stages == args.stages and not c.is_resized
    )

    def run(plan: _core.StagePlan) -> tuple[float, float]:
        return simulated_e2e(plan, result.workload, profile, INSTANCES, trace, proposed.config)

    def sizes(plan: _core.StagePlan) -> tuple[int, ...]:
        return tuple(s.num_instances for s in plan.stages)

    ranges = [(s.min_len, s.max_len) for s in proposed.plan.stages]
    print(f"{args.workload} at {args.rate} req/s, {len(trace)} requests; ranges {ranges}")
    for policy in ("least-load", "llumnix"):
        figures, _ = run_at_rate(setup(policy), args.rate)
        print(f"{policy}: {figures['mean_e2e_s']:.2f} / {figures['p99_e2e_s']:.1f} s")
    mean, p99 = run(proposed.plan)
    print(f"partitioner's sizes {sizes(proposed.plan)}: {mean:.2f} / {p99:.1f} s")
    mean, p99 = simulated_e2e(
        chosen.plan, result.workload, profile, INSTANCES, trace, chosen.config
    )
    print(f"chosen by the selection {sizes(chosen.plan)}: {mean:.2f} / {p99:.1f} s")
    every = []
    for split in itertools.product(range(1, INSTANCES), repeat=args.stages):
        if sum(split) == INSTANCES:
            plan = _core.resized_plan(result.workload, profile, proposed.plan, list(split))
            every.append((run(plan), split))
    every.sort()
    print(f"best of {len(every)} size splits (mean / p99 e2e):")
    for (mean, p99), split in every[: args.top]:
        print(f"  {split}: {mean:.2f} / {p99:.1f} s")


if __name__ == "__main__":
    main()
