"""Migration reasons through the bindings: an enum whose values are the wire strings (metric
labels, logs, the simulator report's keys), handed back to the core unchanged."""

from __future__ import annotations

import json
import pickle

from cascadeinfer import (
    BucketGrid,
    CascadeConfig,
    CostProfile,
    MigrationReason,
    Scheduler,
    generate_trace,
    simulate,
)

WIRE_NAMES = {"stage_bound", "balance", "refinement", "rebalance"}


def test_the_values_are_the_wire_names_and_round_trip() -> None:
    assert {r.value for r in MigrationReason} == WIRE_NAMES
    for r in MigrationReason:
        assert MigrationReason(r.value) is r
        assert MigrationReason[r.value.upper()] is r
        assert str(r) == f"{r}" == r.value, "a metric label or log field reads the wire name"
        assert json.dumps(r) == json.dumps(r.value)
        assert pickle.loads(pickle.dumps(r)) is r


def test_a_migration_carries_the_enum_and_goes_back_to_the_core(
    gpu_profile: CostProfile, grid: BucketGrid
) -> None:
    stages = [(0, 1000, [0]), (1000, grid.max_len, [1])]
    s = Scheduler.cascade_with_stages(
        gpu_profile, stages, grid, CascadeConfig(is_refine_enabled=False)
    )
    assert s.admit(7, 900, 0.0) == (0, 0)
    [m] = s.on_step([7], [0], [1000], 0.0)
    assert m.reason is MigrationReason.STAGE_BOUND
    assert repr(m).endswith('reason="stage_bound")')
    s.migration_done(m, False)
    [retry] = s.on_step([7], [0], [1001], 0.01)
    assert retry.reason is MigrationReason.STAGE_BOUND, "the failed move is retried as itself"
    s.migration_done(retry, True)
    assert s.on_step([7], [1], [1002], 0.02) == []


def test_the_simulator_counts_by_the_same_names(gpu_profile: CostProfile, grid: BucketGrid) -> None:
    stages = [(0, 1024, [0, 1, 2]), (1024, grid.max_len, [3, 4, 5])]
    policy = Scheduler.cascade_with_stages(
        gpu_profile, stages, grid, CascadeConfig(is_refine_enabled=False)
    )
    report = simulate(policy, gpu_profile, generate_trace("bimodal", 300, 4.0, seed=3))
    moved = report.migrations_by_reason()
    assert set(moved) <= WIRE_NAMES
    assert moved[MigrationReason.STAGE_BOUND] > 0
