"""Invalid input reaches Python as ValueError naming the field, never as a panic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cascadeinfer import (
    BalanceConfig,
    BucketGrid,
    CascadeConfig,
    CostProfile,
    FirstTokenSlo,
    RefineConfig,
    Scheduler,
    Workload,
    load_profile,
    partition,
)


def test_zero_instances(gpu_profile: CostProfile, grid: BucketGrid) -> None:
    w = Workload.from_samples(grid, [100], [100], 1.0)
    with pytest.raises(ValueError, match="num_instances"):
        partition(w, gpu_profile, 0)


@pytest.mark.parametrize("edges", [[], [0], [5, 10], [0, 10, 10], [0, 20, 10]])
def test_bad_grids(edges: list[int]) -> None:
    with pytest.raises(ValueError, match="edges"):
        BucketGrid(edges)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("per_context_token_s", -1.0),
        ("step_overhead_s", 0.0),
        ("heterogeneity", 2.0),
        ("kv_capacity_tokens", 0),
        ("max_utilization", 1.0),
    ],
)
def test_bad_profile_values_name_the_field(
    gpu_profile: CostProfile, field: str, value: float
) -> None:
    doc = json.loads(gpu_profile.to_json())
    doc[field] = value
    with pytest.raises(ValueError, match=field):
        CostProfile.from_json(json.dumps(doc))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_profile_file_names_the_field(
    gpu_profile: CostProfile, tmp_path: Path, bad: float
) -> None:
    doc = json.loads(gpu_profile.to_json())
    doc["per_sequence_s"] = bad
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="per_sequence_s"):
        load_profile(str(path))
    with pytest.raises(ValueError, match="profile"):
        CostProfile.from_json(json.dumps(doc))


def test_unknown_builtin_profile_lists_the_known() -> None:
    with pytest.raises(ValueError, match="gpu-h100-llama3-8b"):
        CostProfile.builtin("tpu")


def test_lengths_beyond_max_len(gpu_profile: CostProfile, grid: BucketGrid) -> None:
    with pytest.raises(ValueError, match="length"):
        grid.bucket_of(131_072)
    with pytest.raises(ValueError, match="max_len"):
        Workload.from_samples(grid, [131_000], [100], 1.0)
    w = Workload.from_samples(grid, [100], [100], 1.0)
    plan = partition(w, gpu_profile, 2)
    s = Scheduler.cascade(gpu_profile, plan, [0, 1], grid, CascadeConfig())
    with pytest.raises(ValueError, match="max_len"):
        s.admit(1, 131_072, 0.0)
    with pytest.raises(ValueError, match="max_len"):
        s.on_step([1], [0], [200_000], 0.0)


def test_mismatched_lists(gpu_profile: CostProfile, grid: BucketGrid) -> None:
    with pytest.raises(ValueError, match="output_lens"):
        Workload.from_samples(grid, [1, 2], [3], 1.0)
    s = Scheduler.baseline("least-load", gpu_profile, [0, 1], 131_072)
    with pytest.raises(ValueError, match="equal lengths"):
        s.on_step([1, 2], [0], [10, 10], 0.0)


def test_bad_configs_name_the_field(gpu_profile: CostProfile, grid: BucketGrid) -> None:
    stages = [(0, 1000, [0]), (1000, 131_072, [1])]
    bad_balance = CascadeConfig(balance=BalanceConfig(start_imbalance=0.1, stop_imbalance=0.5))
    with pytest.raises(ValueError, match="start_imbalance"):
        Scheduler.cascade_with_stages(gpu_profile, stages, grid, bad_balance)
    bad_refine = CascadeConfig(refine=RefineConfig(half_life_s=0.0))
    with pytest.raises(ValueError, match="half_life_s"):
        Scheduler.cascade_with_stages(gpu_profile, stages, grid, bad_refine)


def test_a_first_token_level_must_be_finite_and_not_negative(
    gpu_profile: CostProfile, grid: BucketGrid
) -> None:
    with pytest.raises(ValueError, match="base_s"):
        FirstTokenSlo(base_s=-1.0)
    with pytest.raises(ValueError, match="per_prompt_token_s"):
        FirstTokenSlo(per_prompt_token_s=math.inf)
    stages = [(0, 1000, [0]), (1000, 131_072, [1])]
    config = CascadeConfig(first_token=FirstTokenSlo(0.0, 0.0))
    Scheduler.cascade_with_stages(gpu_profile, stages, grid, config)


def test_unknown_instance_and_policy(gpu_profile: CostProfile) -> None:
    s = Scheduler.baseline("round-robin", gpu_profile, [0, 1], 131_072)
    with pytest.raises(ValueError, match="unknown instance 7"):
        s.on_step([1], [7], [10], 0.0)
    with pytest.raises(ValueError, match="policy"):
        Scheduler.baseline("fifo", gpu_profile, [0], 131_072)


def test_gapped_stages_are_rejected(gpu_profile: CostProfile, grid: BucketGrid) -> None:
    with pytest.raises(ValueError, match="contiguous"):
        Scheduler.cascade_with_stages(
            gpu_profile, [(0, 100, [0]), (200, 131_072, [1])], grid, CascadeConfig()
        )
