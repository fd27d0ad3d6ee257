"""Checks the no-regret property on multi-turn trace FILES: conversations whose turns carry a
session id, a turn index and the prefix shared with the turn before, as an operator would replay
them with `cascade bench sim --workload TRACE.jsonl`. `bench/multi_turn.py` runs the multi-turn
presets, which cascade plans for from the preset's own draws; a trace file is planned for from
resamples of itself, which is what this checks.

    python bench/session_traces.py [--kinds agentic,sharegpt-multiturn] [--seeds 31-32]
                                   [--capacity-factors 0.3,0.6,0.9] [--requests 3000]
                                   [--instances 16] [--out FILE.jsonl]

Each trace is a multi-turn preset drawn with a seed of its own (Gamma CV 2 between sessions'
starts, turns ~30 s apart) and written as JSONL with its sessions, then replayed at multiples of
its capacity on the fleet as the planner bounds it (every prompt token counted as prefill, so
with prefix caching the real load is lower). Every cell runs all six policies as `cascade bench
sim --workload TRACE --rate R --seed 1` does (default profile). About 2 minutes for the default
12 cells on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import no_regret
import random_mixtures
from cascadeinfer import workloads
from cascadeinfer.traces import from_entries, write_trace

RATE = 5.0
"""Mean arrival rate of a written trace (req/s); the cell's rate rescales it."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="agentic,sharegpt-multiturn")
    p.add_argument("--seeds", default="31-32", help="trace seeds, FIRST-LAST")
    p.add_argument("--capacity-factors", default="0.3,0.6,0.9")
    p.add_argument("--requests", type=int, default=3000, help="requests per trace")
    p.add_argument("--instances", type=int, default=16)
    p.add_argument("--out", type=Path, help="also write every cell's figures as JSONL")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="session-traces-"))
    jobs: list[tuple[str, float, int, int, dict[str, list[float]]]] = []
    for kind in args.kinds.split(","):
        preset = workloads.get(kind)
        for seed in no_regret._seeds(args.seeds):
            path = tmp / f"{kind}-{seed}.jsonl"
            write_trace(path, from_entries(preset.trace(args.requests, RATE, "gamma", 2.0, seed)))
            capacity = no_regret._capacity(path, args.instances)
            for factor in args.capacity_factors.split(","):
                rate = round(float(factor) * capacity, 3)
                jobs.append((str(path), rate, args.instances, args.requests, {}))
    print("| trace | rate | cascade mean / best | best (mean) | cascade p99 / best | best (p99) |")
    print("|---|---|---|---|---|---|")
    cells: list[tuple[float, float, str | None]] = []
    with ProcessPoolExecutor(2) as pool:
        for cell in pool.map(no_regret._cell, jobs):
            mean, p99, by_mean, by_p99 = no_regret._ratios(cell)
            ran_as = random_mixtures._ran_as(cell)
            cells.append((mean, p99, ran_as))
            flag = " **over**" if max(mean, p99) > no_regret.REGRET else ""
            note = f" (ran as {ran_as})" if ran_as else ""
            print(
                f"| {cell['trace']} | {cell['rate']:g} | {mean:.3f}x | {by_mean} "
                f"| {p99:.3f}x | {by_p99} |{flag}{note}",
                flush=True,
            )
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(cell) + "\n")
    regret = no_regret.REGRET
    geo = [math.exp(statistics.mean(math.log(c[k]) for c in cells)) for k in (0, 1)]
    print(
        f"\n{len(cells)} cells: mean over {regret}x in {sum(c[0] > regret for c in cells)}, "
        f"p99 over in {sum(c[1] > regret for c in cells)}; geometric means {geo[0]:.3f} (mean), "
        f"{geo[1]:.3f} (p99); worst {max(c[0] for c in cells):.3f}x (mean), "
        f"{max(c[1] for c in cells):.3f}x (p99)"
    )


if __name__ == "__main__":
    main()
