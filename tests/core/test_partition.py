"""The partitioner through the bindings: plan shape and what the plan says."""

from __future__ import annotations

import itertools
import json

import pytest
from cascadeinfer import BucketGrid, CostProfile, Workload, partition, preset_names, sample_preset


@pytest.mark.parametrize("preset", preset_names())
def test_plans_cover_the_range_and_use_every_instance(
    preset: str, gpu_profile: CostProfile, grid: BucketGrid
) -> None:
    prompts, outputs = sample_preset(preset, 5000, 1)
    w = Workload.from_samples(grid, prompts, outputs, 2.0)
    plan = partition(w, gpu_profile, 16)
    stages = plan.stages
    assert stages[0].min_len == 0
    assert stages[-1].max_len == grid.max_len
    assert all(a.max_len == b.min_len for a, b in itertools.pairwise(stages))
    assert sum(s.num_instances for s in stages) == 16
    assert plan.objective_s > 0
    assert json.loads(plan.to_json())["stages"][0]["min_len"] == 0


def test_a_stage_limit_is_respected_and_costs_latency(
    gpu_profile: CostProfile, grid: BucketGrid
) -> None:
    prompts, outputs = sample_preset("long-context-mixed", 5000, 1)
    w = Workload.from_samples(grid, prompts, outputs, 6.0)
    free = partition(w, gpu_profile, 16)
    one = partition(w, gpu_profile, 16, max_stages=1)
    assert len(one.stages) == 1
    assert len(free.stages) > 1
    assert free.objective_s < one.objective_s


def test_more_instances_never_predict_worse(gpu_profile: CostProfile, grid: BucketGrid) -> None:
    prompts, outputs = sample_preset("bimodal", 5000, 1)
    w = Workload.from_samples(grid, prompts, outputs, 10.0)
    objectives = [partition(w, gpu_profile, n).objective_s for n in (8, 12, 16, 32)]
    assert objectives == sorted(objectives, reverse=True)


def test_overload_is_infeasible_with_a_reason(gpu_profile: CostProfile, grid: BucketGrid) -> None:
    prompts, outputs = sample_preset("agentic", 2000, 1)
    w = Workload.from_samples(grid, prompts, outputs, 500.0)
    with pytest.raises(ValueError, match="infeasible"):
        partition(w, gpu_profile, 4)


def test_heterogeneity_is_what_makes_splitting_pay(
    gpu_profile: CostProfile, grid: BucketGrid
) -> None:
    """With h=0 and no floor a skewed batch costs what a uniform one does; either term charges it."""
    skewed = gpu_profile.step_time(16, 16 * 1024, 12_000)
    uniform = gpu_profile.step_time(16, 16 * 1024, 1024)
    assert skewed > uniform
    doc = json.loads(gpu_profile.to_json())
    doc["heterogeneity"] = 0.0
    doc["longest_request_floor"] = 0.0
    flat = CostProfile.from_json(json.dumps(doc))
    assert flat.step_time(16, 16 * 1024, 12_000) == flat.step_time(16, 16 * 1024, 1024)
    for term, value in (("heterogeneity", 0.1), ("longest_request_floor", 4.0)):
        one = CostProfile.from_json(json.dumps({**doc, term: value}))
        assert one.step_time(16, 16 * 1024, 12_000) > one.step_time(16, 16 * 1024, 1024), term
