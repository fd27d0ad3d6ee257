//! A discrete-event simulator of a cluster of engine instances, driving the very [`Policy`]
//! objects the live scheduler drives (cascade and every baseline), called as the live
//! coordinator calls them:
//!
//! - `admit` when a request arrives; `None` puts it at the back of a FIFO admission queue whose
//!   head is retried after every engine step and every tick until the policy refuses again;
//! - `request_finished` for requests that finished in a step, then `on_step` with that step's
//!   other requests that produced a token (`context_len` = prompt + output so far), once per
//!   instance step, as the worker's step feed reports them;
//! - `tick(now)` every `tick_interval_s` (the live default, 0.5 s);
//! - `migration_done(m, ok)` when a migration the policy asked for lands or fails.
//!
//! Engines ([`engine`]) batch continuously under the profile's token budget and sequence cap,
//! prefill in chunks, hold KV in blocks and preempt the newest request by recompute when a block
//! is missing; a step lasts `CostProfile::step_time` of its batch. The policy may believe in a
//! different profile than the engines run (model-error studies).
//!
//! Migrations follow the live path. A decided move is dropped (reported failed) when the request
//! is gone, and optional moves (every reason but stage_bound) pass the scheduler's token bucket;
//! at most `max_concurrent_migrations` transfers run at once, the rest wait in order. A transfer
//! starts only if the request is decoding on its source and the target has KV room for its
//! context, which is reserved there at once; else it fails. Two-stage copy, as the workers do it:
//! the full blocks are copied at `migration_bandwidth_bytes_per_s` while the request keeps
//! decoding on the source; at the source's next step boundary it stops for `migration_pause_s`
//! plus the copy of the tokens the bulk copy missed (the partial block and what was decoded
//! meanwhile), holding KV on both ends; then it resumes on the target, whose reservation is
//! topped up to the final context. If the target cannot take the top-up, or the request was
//! preempted or finished during the bulk copy, the migration fails and the request goes on
//! where it was.
//!
//! The run is a function of its inputs: events are ordered by (time, insertion order), nothing
//! iterates a hash map, and no clock is read except by [`simulate`], which times the run.

mod engine;
mod events;
mod flights;
mod inputs;
mod migrate;
mod prefix;
mod report;
mod run;

#[cfg(test)]
mod link_tests;
#[cfg(test)]
mod prefix_tests;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use report::{goodput, InstanceStats, RequestRecord, SimReport, SimSummary, StageLoadSample};

use crate::arrivals::TraceRequest;
use crate::cost::CostProfile;
use crate::error::{CoreError, Result};
use crate::ids::InstanceId;
use crate::policy::Policy;

/// How the simulated scheduler runs; the defaults are the live scheduler's.
#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    /// Seconds between policy ticks.
    pub tick_interval_s: f64,
    /// Most migrations transferring at once.
    pub max_concurrent_migrations: u32,
    /// Optional migrations (all but stage_bound) allowed per second, bursts of up to
    /// `max(rate, 1)`; `None` does not limit them.
    pub max_optional_migrations_per_s: Option<f64>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig { tick_interval_s: 0.5, max_concurrent_migrations: 8, max_optional_migrations_per_s: Some(4.0) }
    }
}

impl SimConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.tick_interval_s.is_finite() && self.tick_interval_s > 0.0) {
            return Err(CoreError::invalid("tick_interval_s", self.tick_interval_s, "must be finite and > 0"));
        }
        if self.max_concurrent_migrations == 0 {
            return Err(CoreError::invalid("max_concurrent_migrations", 0, "must be >= 1"));
        }
        if let Some(rate) = self.max_optional_migrations_per_s {
            if !(rate.is_finite() && rate >= 0.0) {
                return Err(CoreError::invalid("max_optional_migrations_per_s", rate, "must be finite and >= 0"));
            }
        }
        Ok(())
    }
}

/// Simulates `trace` on engines running `profile`, one per id in `instances` (exactly the
/// policy's instances), scheduled by `policy`, which is left in its final state. The report's
/// `sim_wall_s` is this call's wall time; everything else depends only on the inputs.
pub fn simulate(
    policy: &mut dyn Policy,
    profile: &CostProfile,
    trace: &[TraceRequest],
    instances: &[InstanceId],
    config: &SimConfig,
) -> Result<SimReport> {
    let started = std::time::Instant::now();
    let mut report = run::Simulation::new(policy, profile, trace, instances, *config)?.run()?;
    report.summary.sim_wall_s = started.elapsed().as_secs_f64();
    Ok(report)
}
