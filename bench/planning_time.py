"""Planning time: `plan_stages` (what `cascade plan --json` reports as `solve_ms`) for the
cases of docs/benchmarks.md, "Planning time", with the selection's pruning of far-trailing
splits on and off, alternating, 3 runs each; prints the median and range of each and the
layout chosen.

    python bench/planning_time.py
"""

from __future__ import annotations

import math
import statistics

import cascadeinfer.stage_count as stage_count
from cascadeinfer.planning import load_profile, plan_stages

CASES = (
    (64, "long-context-mixed", 128),
    (16, "long-context-mixed", 128),
    (16, "agentic", 128),
    (16, "reasoning", 128),
    (512, "long-context-mixed", 256),
)
PRUNE = {"pruned": stage_count.PRUNE_RATIO, "not pruned": math.inf}


def main() -> None:
    profile = load_profile("gpu-h100-llama3-8b")
    for n, workload, buckets in CASES:
        times: dict[str, list[float]] = {mode: [] for mode in PRUNE}
        chosen: set[tuple[int, bool, bool]] = set()
        for _ in range(3):
            for mode, ratio in PRUNE.items():
                stage_count.PRUNE_RATIO = ratio
                r = plan_stages(
                    num_instances=n, workload=workload, profile=profile, num_buckets=buckets
                )
                times[mode].append(r.solve_ms)
                c = r.config
                chosen.add((len(r.plan.stages), c.is_one_stage_balanced, c.is_one_stage_kv_first))
        figures = ", ".join(
            f"{mode} {statistics.median(v):.0f} ms ({min(v):.0f}-{max(v):.0f})"
            for mode, v in times.items()
        )
        print(f"N={n} B={buckets} {workload}: {figures}; chosen {sorted(chosen)}", flush=True)


if __name__ == "__main__":
    main()
