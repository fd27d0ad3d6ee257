//! CascadeInfer's scheduling core.
//!
//! Pure policy and model code: no I/O, no clock reads (time is always an argument), no pyo3
//! outside `py`. The live scheduler service and the cluster simulator (`sim`) drive the same
//! objects; the simulator's one clock read times its own run.

pub mod arrivals;
pub mod balance;
pub mod baselines;
pub mod capacity;
pub mod cascade;
pub mod cost;
pub mod error;
pub mod grid;
pub mod ids;
pub mod layout;
pub mod load;
pub mod partition;
pub mod policy;
pub mod prefix_index;
pub mod presets;
pub mod refine;
pub mod rng;
pub mod router;
pub mod session;
pub mod sim;
pub mod workload;

#[cfg(feature = "python")]
mod py;

pub use cost::{BatchShape, CostProfile};
pub use error::CoreError;
pub use grid::BucketGrid;
pub use ids::{InstanceId, RequestId};

pub use partition::{partition, partition_by_stage_count, PartitionOptions, StagePlan, StageSpec};

pub use arrivals::{generate_trace, ArrivalProcess, TraceRequest};
pub use baselines::{Baseline, BaselineKind, LlumnixConfig};
pub use cascade::{CascadeConfig, CascadePolicy};
pub use layout::{StageLayout, StageRange};
pub use policy::{Admission, Migration, MigrationReason, NewRequest, Policy, StepEntry, TickOutcome};
pub use presets::Preset;
pub use refine::{RefineConfig, Refiner};
pub use router::FirstTokenSlo;
pub use router::Router;
pub use session::{SessionId, SessionTurn};
pub use sim::{simulate, SimConfig, SimReport, SimSummary};
pub use workload::{RequestSample, WorkloadSummary};
