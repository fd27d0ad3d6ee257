"""Chooses how many stages to run by simulating the partitioner's best plan for each count.

The partitioner's objective is an analytic queueing model (docs/design/partitioner.md). It
prices a stage's padding at the stage's longest context and a prefill chunk at an average
step, so it overrates splitting where prompts are long and lumpy: on the agentic preset with
the GPU profile it predicted 6.2 s mean latency for four stages and 12.2 s for one, and the
simulator measured 10.5 s and 7.8 s. The count is the decision that model gets most wrong, and
the cluster simulator in the core runs the very policy the scheduler will run, so each count's
plan is simulated on a synthetic trace drawn from the same lengths at the same rate, and the
count with the lowest simulated mean end-to-end latency wins. Boundaries and instance counts
within a stage count stay the partitioner's; runtime refinement keeps the count it is given.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from cascadeinfer import _core
from cascadeinfer.config import CascadeConfig

SELECTION_REQUESTS = 2000
"""Requests in a candidate's simulation: enough for a stable mean, a few ms to ~0.1 s each."""
SELECTION_SEED_OFFSET = 7919
"""The selection trace's seed is the planning seed plus this, so it is not a benchmark's trace
drawn with the planning seed."""


@dataclass(frozen=True)
class Candidate:
    num_stages: int
    plan: _core.StagePlan
    simulated_mean_e2e_s: float
    """NaN when a request did not finish in the simulation (the plan cannot carry the rate)."""


def selection_trace(
    prompt_lens: Sequence[int], output_lens: Sequence[int], rate: float, seed: int
) -> list[tuple[float, int, int]]:
    """Poisson arrivals at `rate`, each request's lengths drawn from the planning samples."""
    rng = random.Random(seed + SELECTION_SEED_OFFSET)
    now, trace = 0.0, []
    for _ in range(SELECTION_REQUESTS):
        now += rng.expovariate(rate)
        i = rng.randrange(len(prompt_lens))
        trace.append((now, prompt_lens[i], output_lens[i]))
    return trace


def simulated_mean_e2e(
    plan: _core.StagePlan,
    summary: _core.Workload,
    profile: _core.CostProfile,
    num_instances: int,
    trace: Sequence[tuple[float, int, int]],
) -> float:
    """The plan's layout, held fixed (no refinement), on `trace`."""
    instances = list(range(num_instances))
    config = CascadeConfig(is_refine_enabled=False)
    policy = _core.Scheduler.cascade(profile, plan, instances, summary.grid, config, summary)
    report = _core.simulate(policy, profile, trace, instances)
    result = report.summary()
    if result["completed"] < len(trace):
        return math.nan
    return float(result["mean_e2e_s"])


def choose_stage_count(
    best: _core.StagePlan,
    summary: _core.Workload,
    profile: _core.CostProfile,
    num_instances: int,
    trace: Sequence[tuple[float, int, int]],
) -> tuple[_core.StagePlan, list[Candidate]]:
    """`best` is the partitioner's unconstrained plan (K stages); candidates are its best plan
    for every count 1..K. Returns the chosen plan (the lowest simulated mean; on a tie, the
    fewer stages) and every candidate simulated."""
    candidates: list[Candidate] = []
    for k in range(1, len(best.stages) + 1):
        try:
            plan = (
                best
                if k == len(best.stages)
                else _core.partition(summary, profile, num_instances, k)
            )
        except ValueError:
            continue  # this few stages cannot carry the rate
        if any(c.num_stages == len(plan.stages) for c in candidates):
            continue  # "at most k" found fewer
        mean = simulated_mean_e2e(plan, summary, profile, num_instances, trace)
        candidates.append(Candidate(len(plan.stages), plan, mean))
    finished = [c for c in candidates if not math.isnan(c.simulated_mean_e2e_s)]
    if not finished:
        return best, candidates
    chosen = min(finished, key=lambda c: (c.simulated_mean_e2e_s, c.num_stages))
    return chosen.plan, candidates
