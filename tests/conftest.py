"""Shared fixtures: built-in profiles and small grids."""

from __future__ import annotations

import pytest
from cascadeinfer import BucketGrid, CostProfile


@pytest.fixture(scope="session")
def gpu_profile() -> CostProfile:
    return CostProfile.builtin("gpu-h100-llama3-8b")


@pytest.fixture(scope="session")
def cpu_profile() -> CostProfile:
    return CostProfile.builtin("cpu-vllm-tiny-llama")


@pytest.fixture()
def grid() -> BucketGrid:
    return BucketGrid.geometric(131_072, 64, 64)
