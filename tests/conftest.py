"""Shared fixtures: built-in profiles and small grids."""

from __future__ import annotations

import os

# The vLLM engines built in this process compute the references migrated requests are checked
# against; they must run the kernels the worker daemons run (set before torch loads; see
# cascadeinfer.worker.engines.vllm_engine._prepare_cpu_kernels).
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

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
