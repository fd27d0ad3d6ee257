"""Builds a scheduling policy object the one way both the live scheduler and the simulator use,
so a comparison in `cascade bench sim` runs exactly what `cascade-scheduler` would run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cascadeinfer import _core
from cascadeinfer.config import POLICY_NAMES, CascadeConfig
from cascadeinfer.goodput import GoodputSlo
from cascadeinfer.planning import PlanResult, plan_stages


@dataclass(frozen=True)
class FixedStage:
    """An explicit cascade stage: context lengths [min_len, max_len) on `num_instances`."""

    min_len: int
    max_len: int
    num_instances: int


def build_policy(
    name: str,
    profile: _core.CostProfile,
    instances: Sequence[int],
    *,
    max_len: int,
    workload: str = "short-chat",
    rate: float | None = None,
    stages: Sequence[FixedStage] = (),
    seed: int = 0,
    plan_within_capacity: bool = False,
    clamp_prompts: bool = False,
    arrival_cv: float | None = None,
    objective: str = "mean",
    horizon_requests: int | None = None,
    cascade_config: CascadeConfig | None = None,
    goodput_slo: GoodputSlo | None = None,
) -> _core.Scheduler:
    """`name` is one of POLICY_NAMES. Cascade uses `stages` when given (instances beyond them
    join the last stage), else a plan from the partitioner for `workload` at `rate`.
    `plan_within_capacity`: a rate the fleet cannot carry is planned for at the highest rate it
    can (benchmarks run past saturation on purpose); otherwise it is an error.
    `clamp_prompts`: plan for prompts cut to `max_len` as the benchmarks cut them, instead of
    without the prompts no instance can hold. `arrival_cv`: the burstiness to plan for
    (`plan_stages`); `objective`: what the layout selection optimizes (`goodput_slo`: the
    targets its goodput counts), `horizon_requests`: how many requests it simulates
    (`plan_stages`). `cascade_config`: cascade's settings (default
    `CascadeConfig()`); the layout selection simulates with them."""
    if name not in POLICY_NAMES:
        raise ValueError(f"policy {name!r}: known {', '.join(POLICY_NAMES)}")
    instances = list(instances)
    if name != "cascade":
        return _core.Scheduler.baseline(name, profile, instances, max_len, seed)
    if stages:
        if sum(s.num_instances for s in stages) > len(instances):
            raise ValueError(f"stages ask for more than the {len(instances)} instances there are")
        grid = _core.BucketGrid.geometric(max_len, 64)
        it = iter(instances)
        spec = [(s.min_len, s.max_len, [next(it) for _ in range(s.num_instances)]) for s in stages]
        spec[-1][2].extend(it)
        return _core.Scheduler.cascade_with_stages(
            profile, spec, grid, cascade_config or CascadeConfig()
        )
    result = plan_cascade(
        profile,
        len(instances),
        max_len=max_len,
        workload=workload,
        rate=rate,
        seed=seed,
        plan_within_capacity=plan_within_capacity,
        clamp_prompts=clamp_prompts,
        arrival_cv=arrival_cv,
        objective=objective,
        horizon_requests=horizon_requests,
        cascade_config=cascade_config,
        goodput_slo=goodput_slo,
    )
    return _core.Scheduler.cascade(
        profile, result.plan, instances, result.workload.grid, result.config, result.workload
    )


def plan_cascade(
    profile: _core.CostProfile,
    num_instances: int,
    *,
    max_len: int,
    workload: str = "short-chat",
    rate: float | None = None,
    seed: int = 0,
    plan_within_capacity: bool = False,
    clamp_prompts: bool = False,
    arrival_cv: float | None = None,
    objective: str = "mean",
    horizon_requests: int | None = None,
    cascade_config: CascadeConfig | None = None,
    goodput_slo: GoodputSlo | None = None,
) -> PlanResult:
    """The plan `build_policy` runs cascade with when no stages are given (its arguments mean
    the same), with every layout candidate the selection simulated."""
    return plan_stages(
        num_instances=num_instances,
        workload=workload,
        profile=profile,
        rate=rate,
        max_len=max_len,
        seed=seed,
        back_off_when_infeasible=plan_within_capacity,
        clamp_prompts=clamp_prompts,
        arrival_cv=arrival_cv,
        objective=objective,
        horizon_requests=horizon_requests,
        config=cascade_config,
        goodput_slo=goodput_slo,
    )
