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
import sys
import tempfile
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
    jobs: list[no_regret.Job] = []
    for kind in args.kinds.split(","):
        preset = workloads.get(kind)
        for seed in no_regret._seeds(args.seeds):
            path = tmp / f"{kind}-{seed}.jsonl"
            write_trace(path, from_entries(preset.trace(args.requests, RATE, "gamma", 2.0, seed)))
            capacity = no_regret._capacity(path, args.instances)
            for factor in args.capacity_factors.split(","):
                rate = round(float(factor) * capacity, 3)
                jobs.append((str(path), rate, args.instances, args.requests, {}, "mean"))
    cells = random_mixtures.run_cells(jobs, None, args.out)
    print(f"\n{random_mixtures.summary(cells)}")


if __name__ == "__main__":
    main()
