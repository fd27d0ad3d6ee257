"""Policy objects through the bindings: the calls the scheduler service makes every step."""

from __future__ import annotations

import pytest
from cascadeinfer import (
    POLICY_NAMES,
    BucketGrid,
    CascadeConfig,
    CostProfile,
    Scheduler,
    Workload,
    partition,
    sample_preset,
)


def three_stage(profile: CostProfile, grid: BucketGrid) -> Scheduler:
    stages = [(0, 1000, [0, 1]), (1000, 8000, [2, 3]), (8000, grid.max_len, [4])]
    return Scheduler.cascade_with_stages(
        profile, stages, grid, CascadeConfig(is_refine_enabled=False)
    )


def test_admission_follows_the_prompt_length(gpu_profile: CostProfile, grid: BucketGrid) -> None:
    s = three_stage(gpu_profile, grid)
    assert s.admit(1, 10, 0.0) is not None
    first = s.admit(2, 500, 0.0)
    second = s.admit(3, 500, 0.0)
    assert first is not None and second is not None
    assert first[1] == second[1] == 0
    assert {first[0], second[0]} == {0, 1}
    assert s.admit(4, 3000, 0.0) in {(2, 1), (3, 1)}
    assert s.admit(5, 60_000, 0.0) == (4, 2)


def test_a_request_crossing_a_bound_moves_forward_once(
    gpu_profile: CostProfile, grid: BucketGrid
) -> None:
    s = three_stage(gpu_profile, grid)
    assert s.on_step([10, 11], [0, 0], [998, 10], 0.0) == []
    moves = s.on_step([10, 11], [0, 0], [1000, 11], 0.01)
    assert len(moves) == 1
    m = moves[0]
    assert (m.request_id, m.from_instance, m.context_len, m.reason) == (10, 0, 1000, "stage_bound")
    assert m.to_instance in (2, 3)
    assert s.on_step([10], [0], [1001], 0.02) == [], "in flight: not sent twice"
    s.migration_done(m, False)
    assert len(s.on_step([10], [0], [1002], 0.03)) == 1, "failed: retried from the source"


def test_the_plan_becomes_the_layout(gpu_profile: CostProfile, grid: BucketGrid) -> None:
    prompts, outputs = sample_preset("long-context-mixed", 5000, 1)
    w = Workload.from_samples(grid, prompts, outputs, 6.0)
    plan = partition(w, gpu_profile, 8)
    s = Scheduler.cascade(gpu_profile, plan, list(range(8)), grid, CascadeConfig(), planned_for=w)
    layout = s.stages()
    assert [(lo, hi, len(insts)) for lo, hi, insts in layout] == [
        (st.min_len, st.max_len, st.num_instances) for st in plan.stages
    ]
    assert sorted(i for _, _, insts in layout for i in insts) == list(range(8))
    with pytest.raises(ValueError, match="exactly"):
        Scheduler.cascade(gpu_profile, plan, [0, 1], grid, CascadeConfig())


@pytest.mark.parametrize("name", [p for p in POLICY_NAMES if p != "cascade"])
def test_every_baseline_serves_the_same_calls(name: str, gpu_profile: CostProfile) -> None:
    s = Scheduler.baseline(name, gpu_profile, [0, 1, 2, 3], 131_072, seed=1)
    assert s.name == name
    picks = [s.admit(r, 100, 0.0) for r in range(8)]
    assert all(p is not None and p[1] == 0 for p in picks)
    assert len({p[0] for p in picks if p is not None}) > 1, "load is spread"
    s.on_step(list(range(8)), [p[0] for p in picks if p is not None], [101] * 8, 0.1)
    migrations, change = s.tick(1.0)
    assert change is None
    for m in migrations:
        s.migration_done(m, True)
    s.request_finished(0, picks[0][0] if picks[0] else 0)


def test_a_dead_instance_leaves_and_its_stage_is_refilled(
    gpu_profile: CostProfile, grid: BucketGrid
) -> None:
    s = three_stage(gpu_profile, grid)
    s.remove_instance(4)
    stages = s.stages()
    assert len(stages) == 3
    assert all(insts for _, _, insts in stages)
    s.add_instance(9)
    assert 9 in [i for _, _, insts in s.stages() for i in insts]
    with pytest.raises(ValueError, match="unknown instance"):
        s.remove_instance(42)
