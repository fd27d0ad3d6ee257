"""Runs every layout candidate cascade's selection simulated on the trace itself, beside the
baselines, and compares the candidate the selection picks with and without its last rule
(`stage_count._least_regret`): for each cell, both picks' mean and p99 end-to-end latency over
the best baseline's for that figure (the issue's no-regret bound is 1.02).

    python bench/selection_on_trace.py mix FIRST LAST [--out FILE.jsonl]
    python bench/selection_on_trace.py presets W1,W2,... FIRST_SEED LAST_SEED [--out FILE.jsonl]

`mix`: bench/random_mixtures.py's traces of those seeds at their random loads (run as
`cascade bench sim --workload TRACE --rate R --seed 1` runs them). `presets`: each preset on
each seed, Gamma arrivals of CV 2, 3,000 requests, at 0.25x-1.25x the rate `cascade plan`
plans for. 16 instances of the default profile. Candidates and baselines run two cells at a
time; about 10 s a cell on this 2-core VM.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import no_regret
import random_mixtures
from cascadeinfer import _core
from cascadeinfer.evaluation.simbench import SimSetup, default_rate, policy_options, setup_trace
from cascadeinfer.planning import load_profile
from cascadeinfer.policies import build_policy, plan_cascade
from cascadeinfer.stage_count import pick

INSTANCES = 16
BASELINES = ("round-robin", "least-load", "power-of-two", "llumnix")
"""Cache-aware decides as least-load on traces without sessions; with sessions it runs too."""
MULTIPLES = (0.25, 0.5, 0.75, 1.0, 1.25)

Job = tuple[str, float, int, int, str, float]
"""(workload, rate, seed, requests, arrival, cv)."""


def cell(job: Job) -> dict[str, object]:
    """Every candidate's and baseline's (mean, p99) on the job's trace, and which candidate
    each pick takes."""
    workload, rate, seed, requests, arrival, cv = job
    profile = load_profile(no_regret.PROFILE)
    setup = SimSetup("cascade", profile, workload, INSTANCES, requests, arrival, cv, seed)
    trace = setup_trace(setup, rate)
    instances = list(range(INSTANCES))

    def run(policy: _core.Scheduler) -> tuple[float, float]:
        summary = _core.simulate(policy, profile, trace, instances).summary()
        return summary["mean_e2e_s"], summary["p99_e2e_s"]

    baselines = [*BASELINES, "cache-aware"] if any(len(e) > 3 for e in trace) else BASELINES
    figures = {
        b: run(build_policy(b, profile, instances, max_len=profile.max_model_len))
        for b in baselines
    }
    result = plan_cascade(profile, INSTANCES, **policy_options(setup, rate, len(trace)))
    candidates = result.candidates
    num_traces = max(len(c.per_trace) for c in candidates)
    picks = {
        "rules": pick(candidates, num_traces, with_least_regret=False),
        "least_regret": pick(candidates, num_traces),
    }
    runs = []
    for c in candidates:
        policy = _core.Scheduler.cascade(
            profile, c.plan, instances, result.workload.grid, c.config, result.workload
        )
        runs.append(run(policy))
    return {
        "trace": Path(workload).stem,
        "rate": rate,
        "seed": seed,
        "baselines": figures,
        "candidates": runs,
        "picks": {name: candidates.index(c) for name, c in picks.items()},
        # What the selection saw of each candidate, for trying other rules offline: its
        # (mean, p99) on each selection trace, and whether it is a baseline's one-stage form.
        "selection": [[list(t) for t in c.per_trace] for c in candidates],
        "is_form": [
            c.num_stages == 1 and not c.config.is_one_stage_balanced and not c.is_pruned(num_traces)
            for c in candidates
        ],
        "is_pruned": [c.is_pruned(num_traces) for c in candidates],
    }


def ratios(c: dict[str, object], name: str) -> tuple[float, float]:
    """The pick's mean and p99 over the best baseline's."""
    figures: dict[str, tuple[float, float]] = c["baselines"]  # type: ignore[assignment]
    mean, p99 = c["candidates"][c["picks"][name]]  # type: ignore[index]
    return (
        mean / min(f[0] for f in figures.values()),
        p99 / min(f[1] for f in figures.values()),
    )


def jobs_of(args: argparse.Namespace) -> list[Job]:
    jobs: list[Job] = []
    if args.kind == "mix":
        tmp = Path(args.traces)
        tmp.mkdir(parents=True, exist_ok=True)
        for seed in range(args.first, args.last + 1):
            path = tmp / f"mix-{seed}.jsonl"
            requests, _, _, factor = random_mixtures.write_trace(seed, path)
            rate = round(factor * no_regret._capacity(path, INSTANCES), 3)
            jobs.append((str(path), rate, 1, requests, "poisson", 1.0))
        return jobs
    profile = load_profile(no_regret.PROFILE)
    for workload in args.workloads.split(","):
        for seed in range(args.first, args.last + 1):
            setup = SimSetup("cascade", profile, workload, INSTANCES, 3000, "gamma", 2.0, seed)
            planned = default_rate(setup)
            jobs += [(workload, planned * m, seed, 3000, "gamma", 2.0) for m in MULTIPLES]
    return jobs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="kind", required=True)
    mix = sub.add_parser("mix")
    mix.add_argument("first", type=int)
    mix.add_argument("last", type=int)
    mix.add_argument("--traces", default="/tmp/selection-on-trace", help="where traces go")
    presets = sub.add_parser("presets")
    presets.add_argument("workloads")
    presets.add_argument("first", type=int)
    presets.add_argument("last", type=int)
    for s in (mix, presets):
        s.add_argument("--out", type=Path, help="also write every cell as JSONL")
    args = p.parse_args()
    cells = []
    print("| trace | rate | rules alone: mean / p99 | with least regret: mean / p99 |")
    print("|---|---|---|---|")
    with ProcessPoolExecutor(2) as pool:
        for c in pool.map(cell, jobs_of(args)):
            cells.append(c)
            before, after = ratios(c, "rules"), ratios(c, "least_regret")
            print(
                f"| {c['trace']} s{c['seed']} | {c['rate']:.3g} | {before[0]:.3f}x / "
                f"{before[1]:.3f}x | {after[0]:.3f}x / {after[1]:.3f}x |",
                flush=True,
            )
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(c) + "\n")
    for name in ("rules", "least_regret"):
        r = [ratios(c, name) for c in cells]
        over = sum(max(m, p) > no_regret.REGRET for m, p in r)
        geo = [math.exp(statistics.mean(math.log(x[k]) for x in r)) for k in (0, 1)]
        print(
            f"{name}: {len(r)} cells, over {no_regret.REGRET}x in {over}; geometric means "
            f"{geo[0]:.3f} / {geo[1]:.3f}; worst {max(x[0] for x in r):.3f}x / "
            f"{max(x[1] for x in r):.3f}x"
        )


if __name__ == "__main__":
    main()
