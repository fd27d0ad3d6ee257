//! The cascade policy: length stages with per-token routing, within-stage balancing and
//! runtime range refinement.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::balance::{BalanceConfig, Balancer};
use crate::baselines::{cache_aware_choice, CacheAwareConfig, LlumnixConfig};
use crate::capacity::{CapacityConfig, CapacityGuard};
use crate::cost::CostProfile;
use crate::error::Result;
use crate::grid::BucketGrid;
use crate::ids::{InstanceId, RequestId};
use crate::layout::StageLayout;
use crate::policy::{Admission, LayoutChange, Migration, MigrationReason, NewRequest, Policy, StepEntry, TickOutcome};
use crate::refine::{RefineConfig, Refiner};
use crate::router::{FirstTokenSlo, Router};
use crate::workload::WorkloadSummary;

#[derive(Copy, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CascadeConfig {
    pub balance: BalanceConfig,
    pub refine: RefineConfig,
    /// Turn runtime refinement off (the initial plan stays).
    pub is_refine_enabled: bool,
    /// Balance a one-stage layout too. Off, one stage is least-load admission exactly; on, it
    /// is least-load plus balancing moves, which cut the tail on some traffic and cost a few
    /// percent of mean latency on other traffic, so the planner chooses by simulation.
    #[serde(default)]
    pub is_one_stage_balanced: bool,
    /// Run a one-stage layout Llumnix's way instead (it wins over `is_one_stage_balanced`):
    /// admission to the instance with the most free KV per request, and moves from the
    /// instance with the highest KV usage to the lowest while they differ by more than the
    /// Llumnix gap. Where KV pressure, not step time, decides the tail (long agent sessions),
    /// that single-pool policy beats least-load; the planner chooses by simulation.
    #[serde(default)]
    pub is_one_stage_kv_first: bool,
    /// Where a one-stage layout places a turn of a session ([`OneStageTurns`]).
    #[serde(default)]
    pub one_stage_turns: OneStageTurns,
    #[serde(default)]
    pub capacity: CapacityConfig,
    /// Move whole instances to a stage whose decode steps run slower than the pooled fleet's
    /// ([`CapacityGuard`]). Off in `Default`, like refinement, so a layout built by hand stays
    /// as built; the Python config (`cascadeinfer.config`), which the planner, the scheduler
    /// and the benchmarks use, turns both on.
    #[serde(default)]
    pub is_capacity_guarded: bool,
    /// The first-token service level the deployment promises: a new request whose first token
    /// is predicted to miss it at home starts where it comes in time (`Router::first_token_in_time`).
    #[serde(default)]
    pub first_token: FirstTokenSlo,
}

/// How a one-stage layout places the turns of sessions (requests without one take least-load's
/// or Llumnix's path as configured). Where a conversation's KV pays to follow depends on the
/// traffic: on ShareGPT conversations least-load, which ignores the caches, kept a p99 40%
/// lower than routing to the holder, and on agent sessions it lost most of its prefix hits;
/// the planner chooses by simulation, on selection traces that keep the sessions.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OneStageTurns {
    /// Cascade's own: the instance where the turn is predicted cheapest counting only what it
    /// has not cached, the holder kept unless another is much cheaper ([`Router::admit_turn`]).
    #[default]
    Cheapest,
    /// As a request without a session, blind to the caches: least-load exactly, or the
    /// Llumnix baseline exactly with `is_one_stage_kv_first`.
    Blind,
    /// The cache-aware baseline's rule exactly (SGLang's gateway `cache_aware` at its defaults).
    CacheAware,
}

impl OneStageTurns {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "cheapest" => Ok(OneStageTurns::Cheapest),
            "blind" => Ok(OneStageTurns::Blind),
            "cache-aware" => Ok(OneStageTurns::CacheAware),
            _ => Err(crate::error::CoreError::invalid("one_stage_turns", name, "known: cheapest, blind, cache-aware")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CascadePolicy {
    router: Router,
    balancer: Balancer,
    refiner: Option<Refiner>,
    capacity: Option<CapacityGuard>,
    /// Requests refused admission so far, with their prompt lengths: the caller asks again for
    /// them, refinement must count each arrival once, not once per retry, and the capacity
    /// guard counts them as demand on their stage.
    refused: HashMap<RequestId, u32>,
    is_one_stage_balanced: bool,
    is_one_stage_kv_first: bool,
    one_stage_turns: OneStageTurns,
    /// The stage boundaries the plan (or the operator's stages, or the last refinement) chose.
    /// An instance leaving a stage of one merges that stage into a neighbour; instances that
    /// join later restore these boundaries, one per instance.
    planned_bounds: Vec<u32>,
}

impl CascadePolicy {
    /// `grid` is the bucket grid refinement observes on; the layout's boundaries should be its
    /// edges (a plan from the partitioner on the same grid always is).
    /// `planned_for` is the workload the layout was planned for, when known: refinement
    /// re-plans once observed traffic drifts away from it.
    pub fn new(
        profile: CostProfile,
        layout: StageLayout,
        grid: BucketGrid,
        config: CascadeConfig,
        planned_for: Option<&WorkloadSummary>,
    ) -> Result<Self> {
        let refiner = if config.is_refine_enabled {
            let mut refiner = Refiner::new(config.refine, grid)?;
            if let Some(w) = planned_for {
                refiner.set_planned_workload(w);
            }
            Some(refiner)
        } else {
            None
        };
        let capacity = if config.is_capacity_guarded { Some(CapacityGuard::new(config.capacity)?) } else { None };
        let planned_bounds = inner_bounds(&layout);
        let mut router = Router::new(profile, layout)?;
        if let Some(w) = planned_for.filter(|w| w.mean_output_len > 0.0) {
            router.set_output_horizon(w.mean_output_len);
        }
        router.set_first_token_slo(config.first_token)?;
        Ok(CascadePolicy {
            router,
            balancer: Balancer::new(config.balance)?,
            refiner,
            capacity,
            refused: HashMap::new(),
            is_one_stage_balanced: config.is_one_stage_balanced,
            is_one_stage_kv_first: config.is_one_stage_kv_first,
            one_stage_turns: config.one_stage_turns,
            planned_bounds,
        })
    }

    /// A planned boundary that an instance's departure merged away, with the stage that now
    /// spans it: the lowest such.
    fn merged_bound(&self) -> Option<(usize, u32)> {
        let stages = self.router.layout.stages();
        self.planned_bounds.iter().find_map(|&b| {
            let k = stages.iter().position(|s| s.min_len < b && b < s.max_len)?;
            Some((k, b))
        })
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// One stage, run Llumnix's way (`CascadeConfig::is_one_stage_kv_first`).
    fn is_kv_first(&self) -> bool {
        self.is_one_stage_kv_first && self.router.layout.stages().len() == 1
    }

    /// A turn of a session on a one-stage layout run as the cache-aware baseline runs: the
    /// holder of the longest part of its prompt unless it is far busier than the least-loaded
    /// instance.
    fn admit_turn_cache_aware(&mut self, new: &NewRequest) -> Result<Option<Admission>> {
        let NewRequest { id: request, prompt_len, session } = *new;
        self.router.check_len(prompt_len)?;
        let Some(instance) = cache_aware_choice(&self.router, &CacheAwareConfig::default(), new) else {
            return Ok(None);
        };
        self.router.loads.add_queued(instance, request, prompt_len);
        if let Some(turn) = session {
            self.router.prefixes.placed(request, turn.session, instance, prompt_len);
        }
        Ok(Some(Admission { instance, stage: 0 }))
    }

    /// Requests now outside their instance's stage go to the stage they belong to.
    fn realign(&mut self) -> Vec<Migration> {
        let misplaced: Vec<StepEntry> = self
            .router
            .layout
            .instances()
            .flat_map(|inst| {
                let stage = &self.router.layout.stages()[self.router.layout.stage_of_instance(inst).unwrap()];
                self.router
                    .loads
                    .get(inst)
                    .running
                    .iter()
                    .filter(|(r, len)| {
                        (*len < stage.min_len || *len >= stage.max_len) && !self.router.in_flight.contains(r)
                    })
                    .map(move |&(request, context_len)| StepEntry { request, instance: inst, context_len })
                    .collect::<Vec<_>>()
            })
            .collect();
        misplaced.into_iter().filter_map(|e| self.router.migrate_to_own_stage(e, MigrationReason::Refinement)).collect()
    }
}

impl Policy for CascadePolicy {
    fn name(&self) -> &'static str {
        "cascade"
    }

    fn admit(&mut self, new: &NewRequest, now: f64) -> Result<Option<Admission>> {
        let NewRequest { id: request, prompt_len, session } = *new;
        let wakes = self.is_idle();
        if let (Some(refiner), true) = (&mut self.refiner, wakes) {
            // Idle ticks leave the history alone (`tick`): it ages over the idle stretch now,
            // before the traffic that ends it is observed.
            refiner.advance(now);
        }
        // A turn of a session goes where its conversation's KV makes it cheapest, unless one
        // stage places turns as a baseline does.
        let is_one_stage = self.router.layout.stages().len() == 1;
        let turns = if is_one_stage { self.one_stage_turns } else { OneStageTurns::Cheapest };
        let admission = if let (Some(turn), OneStageTurns::Cheapest) = (session, turns) {
            self.router.admit_turn(request, prompt_len, turn)?
        } else if let (Some(_), OneStageTurns::CacheAware) = (session, turns) {
            self.admit_turn_cache_aware(new)?
        } else if self.is_kv_first() {
            self.router.admit_freest(request, prompt_len)?
        } else {
            self.router.admit(request, prompt_len)?
        };
        let is_retry = if admission.is_some() {
            self.refused.remove(&request).is_some()
        } else {
            self.refused.insert(request, prompt_len).is_some()
        };
        if let (Some(refiner), false) = (&mut self.refiner, is_retry) {
            refiner.observe_arrival(prompt_len);
        }
        Ok(admission)
    }

    fn on_step(&mut self, entries: &[StepEntry], _now: f64) -> Result<Vec<Migration>> {
        let migrations = self.router.check_step(entries)?;
        if let Some(refiner) = &mut self.refiner {
            refiner.observe_step(entries);
        }
        Ok(migrations)
    }

    fn on_repeat_step(&mut self, instance: InstanceId, _now: f64) -> Option<Result<Vec<Migration>>> {
        let migrations = self.router.check_repeat_step(instance)?;
        if let (Ok(_), Some(refiner)) = (&migrations, &mut self.refiner) {
            // The lengths the feed would have listed, in its order: the book's after the step.
            refiner.observe_lens(self.router.loads.get(instance).running.iter().map(|&(_, len)| len));
        }
        Some(migrations)
    }

    fn tick(&mut self, now: f64) -> TickOutcome {
        let mut outcome = TickOutcome::default();
        // An idle fleet gives refinement nothing to observe and nothing to move: its history
        // ages at the next admission instead (`admit`), so that idle ticks are no-ops (the
        // contract of `Policy::tick`). The guard and the balancer see no load and only reset.
        let is_idle = self.is_idle();
        if let (Some(refiner), false) = (&mut self.refiner, is_idle) {
            refiner.advance(now);
            if let Some((layout, _)) = refiner.decide(&self.router.layout, &self.router.profile, now) {
                self.planned_bounds = inner_bounds(&layout);
                self.router.layout = layout.clone();
                outcome.new_layout = Some((layout, LayoutChange::Refinement));
                outcome.migrations = self.realign();
            }
        }
        if let Some(guard) = &mut self.capacity {
            let stranded = stranded_demand(&self.router, &self.refused);
            let router = &self.router;
            if let Some(layout) = guard.decide(&router.layout, &router.loads, &stranded, &router.profile, now) {
                self.router.layout = layout.clone();
                outcome.new_layout = Some((layout, LayoutChange::CapacityMove));
            }
        }
        // Without balancing, one stage is the least-load policy exactly: the fallback the
        // planner picks when no split pays.
        if self.is_kv_first() {
            let instances = self.router.layout.stages()[0].instances.clone();
            let LlumnixConfig { usage_gap, max_moves_per_tick } = LlumnixConfig::default();
            outcome.migrations.extend(self.router.even_kv_usage(
                &instances,
                usage_gap,
                max_moves_per_tick,
                MigrationReason::Balance,
            ));
        } else if self.router.layout.stages().len() > 1 || self.is_one_stage_balanced {
            outcome.migrations.extend(self.balancer.decide(&mut self.router, now));
        }
        outcome
    }

    fn router(&self) -> &Router {
        &self.router
    }

    fn router_mut(&mut self) -> &mut Router {
        &mut self.router
    }

    fn request_finished(&mut self, request: RequestId, instance: InstanceId) {
        // A request placed again while it ran (a drain moving it off) may have been refused.
        self.refused.remove(&request);
        self.router.request_finished(request, instance);
    }

    fn request_withdrawn(&mut self, request: RequestId) {
        self.refused.remove(&request);
    }

    fn is_idle(&self) -> bool {
        self.refused.is_empty() && self.router.is_idle()
    }

    /// A new instance restores a planned stage an earlier departure merged away (it takes the
    /// lower part, which new requests enter); otherwise it joins the stage whose instances are
    /// the most loaded.
    fn add_instance(&mut self, instance: InstanceId) -> Result<()> {
        if let Some((stage, bound)) = self.merged_bound() {
            return self.router.layout.split_for(instance, stage, bound);
        }
        let r = &self.router;
        let mean_step = |k: usize| {
            let insts = &r.layout.stages()[k].instances;
            insts.iter().map(|&i| r.loads.predicted_step(&r.profile, i)).sum::<f64>() / insts.len() as f64
        };
        let busiest = (0..r.layout.stages().len()).max_by(|&a, &b| mean_step(a).total_cmp(&mean_step(b))).unwrap();
        self.router.layout.add_instance(instance, busiest)
    }
}

/// The prompt lengths of the `refused` requests (prompt lengths by request) that the fleet as a
/// whole has KV room for: each reserved in turn, longest first, on the instance with the most
/// free KV tokens left. Those waited only because their own stage and the later ones were
/// full, which a pooled fleet would not have made them do, and they are the demand the
/// capacity guard counts ([`CapacityGuard::decide`]). The others wait under least-load too
/// (the fleet is full): counting them would move capacity for an overload no layout relieves.
fn stranded_demand(router: &Router, refused: &HashMap<RequestId, u32>) -> Vec<u32> {
    if refused.is_empty() {
        return Vec::new();
    }
    let capacity = router.profile.kv_capacity_tokens;
    let mut free: Vec<u64> =
        router.layout.instances().map(|i| capacity.saturating_sub(router.loads.get(i).kv_tokens())).collect();
    let mut lens: Vec<u32> = refused.values().copied().collect();
    lens.sort_unstable_by(|a, b| b.cmp(a));
    lens.into_iter()
        .filter(|&len| {
            let Some(most) = free.iter_mut().max() else { return false };
            let fits = *most >= u64::from(len);
            if fits {
                *most -= u64::from(len);
            }
            fits
        })
        .collect()
}

/// The boundaries between a layout's stages.
fn inner_bounds(layout: &StageLayout) -> Vec<u32> {
    layout.stages().iter().skip(1).map(|s| s.min_len).collect()
}

#[cfg(test)]
mod tests;
