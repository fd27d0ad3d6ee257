"""The core's errors through the bindings: one exception class per failure, each a ValueError,
carrying the field or id that was wrong so callers never parse messages."""

from __future__ import annotations

from collections.abc import Callable

import cascadeinfer as ci
import pytest
from cascadeinfer import (
    BucketGrid,
    CascadeConfig,
    CostProfile,
    InfeasibleError,
    InvalidArgumentError,
    Scheduler,
    UnknownIdError,
    Workload,
    partition,
    sample_preset,
)


def overloaded(grid: BucketGrid) -> Workload:
    prompts, outputs = sample_preset("agentic", 2000, 1)
    return Workload.from_samples(grid, prompts, outputs, 500.0)


def two_stage(profile: CostProfile, grid: BucketGrid) -> Scheduler:
    stages = [(0, 1000, [0]), (1000, grid.max_len, [1])]
    return Scheduler.cascade_with_stages(
        profile, stages, grid, CascadeConfig(is_refine_enabled=False)
    )


def test_an_overloaded_fleet_is_infeasible_and_still_a_value_error(
    gpu_profile: CostProfile, grid: BucketGrid
) -> None:
    with pytest.raises(InfeasibleError) as err:
        partition(overloaded(grid), gpu_profile, 4)
    assert isinstance(err.value, ValueError), "`except ValueError` callers keep working"
    assert not isinstance(err.value, InvalidArgumentError | UnknownIdError)


def test_an_asked_rate_past_capacity_is_infeasible_through_plan_stages() -> None:
    profile = ci.load_profile("gpu-h100-llama3-8b")
    with pytest.raises(InfeasibleError):
        ci.plan_stages(
            num_instances=1, workload="short-chat", profile=profile, max_len=8192, rate=1000.0
        )


def test_an_invalid_argument_is_not_mistaken_for_infeasible(
    gpu_profile: CostProfile, grid: BucketGrid
) -> None:
    """The planner backs off only on InfeasibleError; a bad argument surfaces as itself."""
    with pytest.raises(InvalidArgumentError) as err:
        partition(overloaded(grid), gpu_profile, 4, max_stages=0)
    assert not isinstance(err.value, InfeasibleError)
    assert (err.value.field, err.value.value) == ("max_stages", "0")


@pytest.mark.parametrize(
    ("call", "field", "value"),
    [
        (lambda: BucketGrid.geometric(1000, 0), "num_buckets", "0"),
        (lambda: BucketGrid([5, 10]), "edges", "5"),
        (lambda: Workload.from_samples(BucketGrid([0, 10]), [1], [1], -1.0), "arrival_rate", "-1"),
        (lambda: ci.preset_max_len("no-such-preset"), "workload", "no-such-preset"),
    ],
)
def test_invalid_input_names_the_field_and_value(
    call: Callable[[], object], field: str, value: str
) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        call()
    assert isinstance(err.value, ValueError)
    assert (err.value.field, err.value.value) == (field, value)
    assert err.value.reason and field in str(err.value)


def test_a_prompt_past_the_last_stage_is_an_invalid_context_len(
    gpu_profile: CostProfile, grid: BucketGrid
) -> None:
    s = two_stage(gpu_profile, grid)
    with pytest.raises(InvalidArgumentError) as err:
        s.admit(1, grid.max_len, 0.0)
    assert err.value.field == "context_len"


def test_an_unknown_instance_is_an_unknown_id(gpu_profile: CostProfile, grid: BucketGrid) -> None:
    s = two_stage(gpu_profile, grid)
    with pytest.raises(UnknownIdError) as err:
        s.remove_instance(99)
    assert isinstance(err.value, ValueError)
    assert (err.value.kind, err.value.id) == ("instance", 99)
    s.remove_instance(1)  # its stage, left empty, merges into the other
    with pytest.raises(InvalidArgumentError) as last:
        s.remove_instance(0)
    assert (last.value.field, last.value.value) == ("instance", "0")


def test_the_classes_are_the_public_ones() -> None:
    from cascadeinfer import _core

    assert ci.InfeasibleError is _core.InfeasibleError
    for cls in (InfeasibleError, InvalidArgumentError, UnknownIdError):
        assert cls.__module__ == "cascadeinfer._core" and issubclass(cls, ValueError)
