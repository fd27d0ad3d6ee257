"""`cascade bench sim`: one policy on one workload in the cluster simulator, and the search for
the highest arrival rate that still meets a latency SLO.

The policy object is built by `cascadeinfer.policies.build_policy`, the function the live
scheduler uses, and the simulator drives it through the same `Policy` interface.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascadeinfer import _core, workloads
from cascadeinfer.config import CascadeConfig, FirstTokenSlo
from cascadeinfer.evaluation.summary import SUMMARY_KEYS as LIVE_KEYS
from cascadeinfer.goodput import GOODPUT_KEYS, GoodputSlo, goodput
from cascadeinfer.planning import clamp_lengths
from cascadeinfer.policies import build_policy
from cascadeinfer.traces import TraceEntry, arrival_rate, read_trace, to_entries, with_lengths

Trace = list[TraceEntry]

SUMMARY_KEYS = (
    *LIVE_KEYS,
    *GOODPUT_KEYS,
    "prefix_cache_hit_rate",
    "layout_changes",
    "capacity_moves",
    "stages",
    "plan_wall_s",
    "sim_wall_s",
)
"""What `cascade bench sim` prints: the keys a live run has, goodput under the setup's
`GoodputSlo`, the share of prompt tokens served from prefix caches (0 without sessions), the
times cascade changed its stage layout (of them, the capacity guard's instance moves; 0 for
the baselines), the layout the run started with (`stages`, as `describe_stages` writes it),
the wall time of building the policy (`plan_wall_s`: cascade's planning, all its simulations
included; about 0 for a baseline) and the simulator's wall time."""


def describe_stages(stages: list[tuple[int, int, list[int]]]) -> str:
    """A layout (`Scheduler.stages()`) as `[0, 6658) x6, [6658, 131072) x10`: each stage's
    context lengths and its number of instances; a baseline is one stage of every length."""
    return ", ".join(f"[{lo}, {hi}) x{len(instances)}" for lo, hi, instances in stages)


def clamp(trace: Trace, max_len: int) -> Trace:
    """Fits every request into `max_len` tokens of context (`planning.clamp_lengths`)."""
    return [with_lengths(e, *clamp_lengths(e[1], e[2], max_len)) for e in trace]


WHOLE_TRACE = 1 << 31
"""A request count no trace file reaches: `make_trace` then takes all of it (a run replays a
trace as recorded unless told to take its first part)."""


def make_trace(
    workload: str,
    *,
    num_requests: int,
    rate: float,
    arrival: str = "poisson",
    cv: float = 1.0,
    seed: int = 0,
    max_len: int,
) -> Trace:
    """A workload (`cascadeinfer.workloads`) sampled at `rate`, or a JSONL trace file (its
    first `num_requests` requests, arrivals rescaled to `rate` when one is given; as recorded
    at a `rate` of `math.inf`, a trace's own when it arrives at once)."""
    if workloads.is_workload(workload):
        trace = workloads.get(workload).trace(num_requests, rate, arrival, cv, seed)
    elif not Path(workload).is_file():
        raise workloads.not_found(workload)
    else:
        requests = read_trace(workload)[:num_requests]
        if not requests:
            raise ValueError(f"trace {workload!r} is empty")
        span = requests[-1].arrival_s - requests[0].arrival_s
        # `default_rate` of a trace that arrives at once is infinite: replayed as it is.
        rescale = bool(rate) and math.isfinite(rate)
        if rescale and span == 0 and len(requests) > 1:
            # Rescaling multiplies gaps; none to multiply would run the trace at once under
            # the label of `rate`.
            raise ValueError(
                f"trace {workload!r}: its {len(requests)} requests all arrive at once, so "
                f"there are no gaps to rescale to {rate:g} req/s"
            )
        scale = (len(requests) - 1) / rate / span if rescale and span > 0 else 1.0
        trace = to_entries(requests, requests[0].arrival_s, scale)
    return clamp(trace, max_len)


@dataclass(frozen=True)
class SimSetup:
    policy: str
    profile: _core.CostProfile
    workload: str
    num_instances: int
    num_requests: int
    arrival: str = "poisson"
    cv: float = 1.0
    seed: int = 0
    tick_interval_s: float = 0.5
    max_concurrent_migrations: int = 8
    max_optional_migrations_per_s: float = 4.0
    goodput_slo: GoodputSlo = field(default_factory=GoodputSlo)
    objective: str = "mean"
    """What cascade's layout selection optimizes (`plan_stages`); its goodput counts
    `goodput_slo`."""
    is_capacity_guarded: bool = True
    """Cascade runs with the capacity guard (`CascadeConfig.is_capacity_guarded`), as the
    scheduler does unless started with --no-capacity-guard."""


def setup_trace(setup: SimSetup, rate: float) -> Trace:
    """The trace `run_at_rate` simulates for `setup` at `rate` req/s."""
    return make_trace(
        setup.workload,
        num_requests=setup.num_requests,
        rate=rate,
        arrival=setup.arrival,
        cv=setup.cv,
        seed=setup.seed,
        max_len=setup.profile.max_model_len,
    )


def policy_options(setup: SimSetup, rate: float, num_requests: int) -> dict[str, Any]:
    """`build_policy`'s (and `plan_cascade`'s) keyword arguments for `setup` at `rate` on a
    trace of `num_requests` requests: cascade plans for this workload and rate."""
    return {
        "max_len": setup.profile.max_model_len,
        "workload": setup.workload,
        # A trace that arrives at once (`default_rate` infinite) is planned from its own.
        "rate": rate if math.isfinite(rate) else None,
        "seed": setup.seed,
        "plan_within_capacity": True,
        "clamp_prompts": True,
        # Gamma arrivals of a preset plan for their burstiness; a trace file's own gaps say it.
        "arrival_cv": setup.cv if setup.arrival == "gamma" else None,
        "objective": setup.objective,
        "goodput_slo": setup.goodput_slo,
        "horizon_requests": num_requests,
        # The first-token level the run's goodput counts is the one cascade places for.
        "cascade_config": CascadeConfig(
            is_capacity_guarded=setup.is_capacity_guarded,
            first_token=FirstTokenSlo(
                setup.goodput_slo.ttft_base_s, setup.goodput_slo.ttft_per_prompt_token_s
            ),
        ),
    }


def run_at_rate(setup: SimSetup, rate: float) -> tuple[dict[str, Any], _core.SimReport]:
    """One simulation at `rate` req/s; the cascade plan is made for this workload and rate.
    Every figure of the summary is a number but `stages` (`describe_stages`)."""
    trace = setup_trace(setup, rate)
    instances = list(range(setup.num_instances))
    started = time.perf_counter()
    policy = build_policy(
        setup.policy, setup.profile, instances, **policy_options(setup, rate, len(trace))
    )
    plan_wall_s = time.perf_counter() - started
    stages = describe_stages(policy.stages())
    report = _core.simulate(
        policy,
        setup.profile,
        trace,
        instances,
        tick_interval_s=setup.tick_interval_s,
        max_concurrent_migrations=setup.max_concurrent_migrations,
        max_optional_migrations_per_s=setup.max_optional_migrations_per_s,
    )
    summary: dict[str, Any] = dict(report.summary())
    r = report.requests()
    summary |= goodput(
        setup.goodput_slo,
        [int(p) for p in r["prompt_len"]],
        r["ttft_s"],
        r["tpot_s"],
        r["e2e_s"],
        r["arrival_s"],
    )
    summary["rate"] = rate if math.isfinite(rate) else None  # None: all at once, as recorded
    summary["requests"] = len(trace)
    summary["layout_changes"] = report.num_layout_changes
    summary["capacity_moves"] = report.num_capacity_moves
    summary["stages"] = stages
    summary["plan_wall_s"] = plan_wall_s
    return summary, report


@dataclass(frozen=True)
class Slo:
    p99_ttft_s: float
    p99_tpot_s: float

    def is_met(self, summary: dict[str, float]) -> bool:
        return (
            summary["completed"] == summary["requests"]
            and summary["p99_ttft_s"] <= self.p99_ttft_s
            and summary["p99_tpot_s"] <= self.p99_tpot_s
        )


MAX_RATE_FACTOR = 64.0
"""How far above its start `find_max_rate` searches before it calls the rate unbounded."""


def find_max_rate(
    run: Callable[[float], dict[str, float]],
    slo: Slo,
    *,
    start: float,
    relative_tolerance: float = 0.03,
    max_runs: int = 24,
    max_factor: float = MAX_RATE_FACTOR,
) -> tuple[float, dict[str, float] | None, list[dict[str, float]]]:
    """The highest rate meeting `slo`: doubling (or halving) from `start` to bracket it, then
    bisection to `relative_tolerance`. Returns the rate (0 if none met; `math.inf` if the SLO
    still holds at `max_factor` times `start`, with that run's summary), its summary, and every
    run made. Assumes what holds for the SLO at a rate holds at every lower rate.

    The cap is for traffic whose load does not follow the rate: the turns of a multi-turn
    preset come one think time after the last, so past the rate at which every session has
    started the trace offers no more load, and doubling would go on for ever; and a finite
    trace replayed fast enough arrives as one burst, which a fleet with KV room for all of it
    may serve within the SLO."""
    runs: list[dict[str, float]] = []

    def meets(rate: float) -> tuple[bool, dict[str, float]]:
        summary = run(rate)
        runs.append(summary)
        return slo.is_met(summary), summary

    ok, summary = meets(start)
    best: tuple[float, dict[str, float] | None] = (start, summary) if ok else (0.0, None)
    lo, hi = (start, start * 2) if ok else (start / 2, start)
    while len(runs) < max_runs:
        if ok:
            if hi > start * max_factor:
                return math.inf, best[1], runs
            ok, summary = meets(hi)
            if not ok:
                break
            best, lo, hi = (hi, summary), hi, hi * 2
        else:
            ok, summary = meets(lo)
            if ok:
                best = (lo, summary)
                break
            hi, lo = lo, lo / 2
            if lo < start / 64:
                return 0.0, None, runs
    while hi - lo > relative_tolerance * hi and len(runs) < max_runs:
        mid = (lo + hi) / 2
        ok, summary = meets(mid)
        if ok:
            best, lo = (mid, summary), mid
        else:
            hi = mid
    return best[0], best[1], runs


def default_rate(setup: SimSetup) -> float:
    """The rate a run takes when none is given: a trace's own arrival rate, as recorded (past
    the fleet's capacity too: replaying an overload is a benchmark, not an error; `math.inf`
    for one whose requests all arrive at once, which `run_at_rate` replays so); for a
    preset, what `cascade plan` would plan for on this fleet (60% of capacity)."""
    from cascadeinfer.planning import plan_stages

    if not workloads.is_workload(setup.workload):
        # The requests the run replays: a trace's first part can come faster than its whole.
        return arrival_rate(read_trace(setup.workload)[: setup.num_requests])
    return plan_stages(
        num_instances=setup.num_instances,
        workload=setup.workload,
        profile=setup.profile,
        max_len=setup.profile.max_model_len,
        seed=setup.seed,
        clamp_prompts=True,
    ).rate
