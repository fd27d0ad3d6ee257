"""CascadeInfer: length-aware, stage-partitioned scheduling for serving one LLM on many engines.

The public names: the Rust core's types (cost profiles, grids, workloads, the partitioner, the
policy objects and the cluster simulator that drives them) and the Python helpers that load them
from names and files. `preset_names` lists the core's parametric presets; `workload_names` every
built-in workload name, the data-derived ones included (`cascadeinfer.workloads`). The core's
errors are `ValueError`s of one class per failure: `InvalidArgumentError`, `InfeasibleError`,
`UnknownIdError`.
"""

import os

# gRPC's C core prints its INFO lines to stderr unless told otherwise (a GOAWAY received from a
# server closing an idle connection, every 30 s of a channel's idling), between the daemons'
# JSON log lines; its errors still come out. Set before any module imports grpc; an
# operator's own GRPC_VERBOSITY wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from cascadeinfer._core import (
    BucketGrid,
    CostProfile,
    InfeasibleError,
    InvalidArgumentError,
    Migration,
    MigrationReason,
    PlannedStage,
    Scheduler,
    SimReport,
    StagePlan,
    UnknownIdError,
    Workload,
    generate_trace,
    partition,
    preset_max_len,
    preset_names,
    sample_preset,
    simulate,
)
from cascadeinfer.config import (
    POLICY_NAMES,
    BalanceConfig,
    CascadeConfig,
    FirstTokenSlo,
    LlumnixConfig,
    RefineConfig,
)
from cascadeinfer.planning import PlanResult, load_profile, plan_stages
from cascadeinfer.traces import TraceRequest, read_trace, write_trace
from cascadeinfer.workloads import UnknownWorkloadError
from cascadeinfer.workloads import names as workload_names

__all__ = [
    "POLICY_NAMES",
    "BalanceConfig",
    "BucketGrid",
    "CascadeConfig",
    "CostProfile",
    "FirstTokenSlo",
    "InfeasibleError",
    "InvalidArgumentError",
    "LlumnixConfig",
    "Migration",
    "MigrationReason",
    "PlanResult",
    "PlannedStage",
    "RefineConfig",
    "Scheduler",
    "SimReport",
    "StagePlan",
    "TraceRequest",
    "UnknownIdError",
    "UnknownWorkloadError",
    "Workload",
    "generate_trace",
    "load_profile",
    "partition",
    "plan_stages",
    "preset_max_len",
    "preset_names",
    "read_trace",
    "sample_preset",
    "simulate",
    "workload_names",
    "write_trace",
]
