"""Planning time: `plan_stages` (what `cascade plan --json` reports as `solve_ms`) for the
cases of docs/benchmarks.md, "Planning time", with the selection's size search on and off
(`stage_count.SIZE_SEARCH_ROUNDS`; until the twenty-fifth session this compared the pruning of
far-trailing splits, which changed nothing chosen), alternating, 3 runs each; prints the median
and range of each and the layouts chosen (stage sizes, balanced, run Llumnix's way).

    python bench/planning_time.py
"""

from __future__ import annotations

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
SEARCH = {"size search": stage_count.SIZE_SEARCH_ROUNDS, "no size search": 0}


def main() -> None:
    profile = load_profile("gpu-h100-llama3-8b")
    for n, workload, buckets in CASES:
        times: dict[str, list[float]] = {mode: [] for mode in SEARCH}
        chosen: dict[str, set[tuple[tuple[int, ...], bool, bool]]] = {m: set() for m in SEARCH}
        for _ in range(3):
            for mode, rounds in SEARCH.items():
                stage_count.SIZE_SEARCH_ROUNDS = rounds
                r = plan_stages(
                    num_instances=n, workload=workload, profile=profile, num_buckets=buckets
                )
                times[mode].append(r.solve_ms)
                c = r.config
                sizes = tuple(s.num_instances for s in r.plan.stages)
                chosen[mode].add((sizes, c.is_one_stage_balanced, c.is_one_stage_kv_first))
        figures = "; ".join(
            f"{mode} {statistics.median(v):.0f} ms ({min(v):.0f}-{max(v):.0f}), "
            f"chosen {sorted(chosen[mode])}"
            for mode, v in times.items()
        )
        print(f"N={n} B={buckets} {workload}: {figures}", flush=True)


if __name__ == "__main__":
    main()
