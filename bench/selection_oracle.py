"""How much of cascade's regret on random mixtures is the layout selection's: for each cell of
`bench/random_mixtures.py` (same traces, rates and fleet), every layout candidate the planner
simulated is also run on the trace itself, beside the baselines. It prints, over the cells:

- the chosen candidate's cells over 1.02x of the best baseline (mean, p99), as
  `random_mixtures.py` counts them, and which kind of candidate was chosen there;
- the oracle bound: the cells where no candidate is within 1.02x on both figures, which no
  selection rule can bring under;
- the same counts with `stage_count.pick` replaced by each rule in `RULES` (rules to try go
  there), evaluated exactly from the candidates' figures, with no new simulation.

    python bench/selection_oracle.py [--seeds 1-40] [--instances 16] [--cache DIR]

A cell's figures are cached as JSON in `--cache` (default: a new temporary folder), so rules
can be compared on the same cells again in seconds. About 3 s a cell on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import no_regret
import random_mixtures
from cascadeinfer import _core
from cascadeinfer.config import CascadeConfig, FirstTokenSlo
from cascadeinfer.evaluation.simbench import SimSetup, run_at_rate, setup_trace
from cascadeinfer.planning import load_profile, plan_stages
from cascadeinfer.stage_count import Candidate, pick

BASELINES = ("round-robin", "least-load", "power-of-two", "llumnix", "cache-aware")
REGRET = 1.02

Rule = Callable[[Sequence[Candidate], int], Candidate]
RULES: dict[str, Rule] = {"pick (as shipped)": lambda cands, n: pick(cands, n)}
"""Selection rules to compare: each gets the candidates (as `choose_layout` made them) and the
number of selection traces, and returns the one to run."""


def _cell(args: tuple[int, int, Path]) -> Path:
    """Plans one random-mixture cell as `cascade bench sim` does and runs every candidate and
    every baseline on its trace; writes the figures to the cache."""
    seed, instances, cache = args
    out = cache / f"mix-{seed}.json"
    if out.exists():
        return out
    path = cache / f"mix-{seed}.jsonl"
    num_requests, _, _, factor = random_mixtures.write_trace(seed, path)
    rate = round(factor * no_regret._capacity(path, instances), 3)
    profile = load_profile(no_regret.PROFILE)
    setup = SimSetup("cascade", profile, str(path), instances, num_requests, seed=1)
    trace = setup_trace(setup, rate)
    slo = setup.goodput_slo
    result = plan_stages(
        num_instances=instances,
        workload=str(path),
        profile=profile,
        rate=rate,
        seed=1,
        back_off_when_infeasible=True,
        clamp_prompts=True,
        horizon_requests=len(trace),
        config=CascadeConfig(
            first_token=FirstTokenSlo(slo.ttft_base_s, slo.ttft_per_prompt_token_s)
        ),
    )
    ids = list(range(instances))
    candidates = []
    for c in result.candidates:
        policy = _core.Scheduler.cascade(
            profile, c.plan, ids, result.workload.grid, c.config, result.workload
        )
        s = _core.simulate(policy, profile, trace, ids).summary()
        finished = s["completed"] == len(trace)
        candidates.append(
            {
                "num_stages": c.num_stages,
                "config": {
                    "is_one_stage_balanced": c.config.is_one_stage_balanced,
                    "is_one_stage_kv_first": c.config.is_one_stage_kv_first,
                    "one_stage_turns": c.config.one_stage_turns,
                },
                "per_trace": c.per_trace,
                "on_trace": [s["mean_e2e_s"], s["p99_e2e_s"]] if finished else None,
            }
        )
    baselines = {}
    for name in BASELINES:
        summary, report = run_at_rate(replace(setup, policy=name), rate)
        if report.num_unfinished == 0:
            baselines[name] = [summary["mean_e2e_s"], summary["p99_e2e_s"]]
    cell = {"seed": seed, "requests": num_requests, "candidates": candidates}
    out.write_text(json.dumps(cell | {"baselines": baselines}))
    return out


def _candidates(cell: dict[str, object]) -> list[Candidate]:
    return [
        Candidate(
            c["num_stages"],
            None,  # type: ignore[arg-type]  # the rules read figures, not plans
            replace(CascadeConfig(), **c["config"]),
            tuple(tuple(t) for t in c["per_trace"]),  # type: ignore[misc]
        )
        for c in cell["candidates"]  # type: ignore[attr-defined]
    ]


def _kind(c: Candidate) -> str:
    if c.num_stages > 1:
        return "split"
    if c.config.is_one_stage_kv_first:
        return "one stage, Llumnix's way"
    return "one stage, balanced" if c.config.is_one_stage_balanced else "one stage (least-load)"


def _report(cells: list[dict[str, object]]) -> None:
    num_traces = [max(len(c["per_trace"]) for c in cell["candidates"]) for cell in cells]  # type: ignore[attr-defined]
    best = [
        [min(f[k] for f in cell["baselines"].values()) for k in (0, 1)]  # type: ignore[attr-defined]
        for cell in cells
    ]
    no_candidate = 0
    for cell, (bm, bp) in zip(cells, best, strict=True):
        ratios = [
            max(c["on_trace"][0] / bm, c["on_trace"][1] / bp)
            for c in cell["candidates"]  # type: ignore[attr-defined]
            if c["on_trace"]
        ]
        no_candidate += min(ratios) > REGRET
    print(
        f"{len(cells)} cells; oracle bound: no candidate within {REGRET}x on both in {no_candidate}"
    )
    for name, rule in RULES.items():
        over_mean = over_p99 = 0
        kinds: Counter[str] = Counter()
        logs = [0.0, 0.0]
        for cell, n, (bm, bp) in zip(cells, num_traces, best, strict=True):
            cands = _candidates(cell)
            chosen = rule(cands, n)
            figures = cell["candidates"][cands.index(chosen)]["on_trace"]  # type: ignore[index]
            # A layout that left requests unfinished is as far over as it gets.
            mean, p99 = (figures[0] / bm, figures[1] / bp) if figures else (math.inf, math.inf)
            over_mean += mean > REGRET
            over_p99 += p99 > REGRET
            if max(mean, p99) > REGRET:
                kinds[_kind(chosen)] += 1
            logs[0] += math.log(mean)
            logs[1] += math.log(p99)
        geo = [math.exp(x / len(cells)) for x in logs]  # inf where a layout left requests
        print(
            f"{name}: mean over {REGRET}x in {over_mean}, p99 in {over_p99}; geometric means "
            f"{geo[0]:.3f} / {geo[1]:.3f}; chosen where over: {dict(kinds)}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1-40", help="random-mixture seeds, FIRST-LAST")
    p.add_argument("--instances", type=int, default=16)
    p.add_argument("--cache", type=Path, help="folder for the cells' figures (reused)")
    args = p.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="selection-oracle-"))
    cache.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, args.instances, cache) for seed in no_regret._seeds(args.seeds)]
    with ProcessPoolExecutor(2) as pool:
        paths = list(pool.map(_cell, jobs))
    cells = [json.loads(path.read_text()) for path in paths]
    # A cell whose every candidate or baseline left requests unfinished has no ratio.
    cells = [c for c in cells if c["baselines"] and any(x["on_trace"] for x in c["candidates"])]
    _report(cells)


if __name__ == "__main__":
    main()
