//! Runtime range refinement: a decayed online histogram of observed traffic; boundaries between
//! adjacent stages are nudged one bucket when their loads diverge, and the whole plan is
//! re-solved when the arrival mix has shifted. A change is taken only when the model predicts
//! a clear gain, when its trigger has held for `persist_s` (one burst or one noisy window is not
//! a shift), and never within the cooldown of the last one, so a steady workload settles and
//! stays put.
//!
//! The re-plan trigger compares the share of arrivals each current stage receives (by prompt
//! length) with the share the plan expected. Arrivals show a shift at once and carry no
//! warm-up bias, unlike the decode-token histogram: early in a run only short contexts have
//! been seen, because long generations have not grown yet, and re-planning on that histogram
//! starved the last stage on reasoning-style traffic (mean e2e 1.3x, p99 3.5x of a fixed plan).
//! Stage shares, not per-bucket shares, keep the sampling noise of a few hundred arrivals far
//! below the threshold.

use serde::{Deserialize, Serialize};

use crate::cost::{prefill_pairs, CostProfile};
use crate::error::{CoreError, Result};
use crate::grid::BucketGrid;
use crate::layout::{StageLayout, StageRange};
use crate::partition::{partition, PartitionOptions, RangeTable};
use crate::policy::StepEntry;
use crate::workload::WorkloadSummary;

#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefineConfig {
    /// Observations lose half their weight every this many seconds.
    pub half_life_s: f64,
    /// No change within this many seconds of the previous one.
    pub cooldown_s: f64,
    /// Re-plan when the total-variation distance between the observed token-length
    /// distribution and the one of the last plan exceeds this.
    pub replan_divergence: f64,
    /// Nudge a boundary only when the two stages' utilizations differ by more than this.
    pub nudge_imbalance: f64,
    /// A change must cut the predicted mean latency by at least this fraction.
    pub min_improvement: f64,
    /// Ignore the histogram until it holds this many seconds of (decayed) observation.
    pub min_window_s: f64,
    /// A trigger (arrival shift or stage imbalance) must hold this long before a change.
    #[serde(default = "default_persist_s")]
    pub persist_s: f64,
}

fn default_persist_s() -> f64 {
    60.0
}

impl Default for RefineConfig {
    fn default() -> Self {
        RefineConfig {
            half_life_s: 60.0,
            cooldown_s: 30.0,
            replan_divergence: 0.15,
            nudge_imbalance: 0.2,
            min_improvement: 0.05,
            min_window_s: 30.0,
            persist_s: default_persist_s(),
        }
    }
}

impl RefineConfig {
    pub fn validate(&self) -> Result<()> {
        let positive = [("refine.half_life_s", self.half_life_s), ("refine.min_window_s", self.min_window_s)];
        if !(self.persist_s.is_finite() && self.persist_s >= 0.0) {
            return Err(CoreError::invalid("refine.persist_s", self.persist_s, "must be finite and >= 0"));
        }
        for (field, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(CoreError::invalid(field, v, "must be finite and > 0"));
            }
        }
        let fractions = [
            ("refine.replan_divergence", self.replan_divergence),
            ("refine.nudge_imbalance", self.nudge_imbalance),
            ("refine.min_improvement", self.min_improvement),
        ];
        for (field, v) in fractions {
            if !(0.0..=1.0).contains(&v) {
                return Err(CoreError::invalid(field, v, "must be in [0, 1]"));
            }
        }
        if !(self.cooldown_s.is_finite() && self.cooldown_s >= 0.0) {
            return Err(CoreError::invalid("refine.cooldown_s", self.cooldown_s, "must be finite and >= 0"));
        }
        Ok(())
    }
}

/// What a refinement step changed.
#[derive(Clone, Debug, PartialEq)]
pub enum Refinement {
    /// The boundary between stage `stage` and `stage + 1` moved from `from` to `to`.
    Nudge { stage: usize, from: u32, to: u32 },
    /// A new plan; instance counts per stage may have changed.
    Replan,
}

#[derive(Clone, Debug)]
pub struct Refiner {
    config: RefineConfig,
    grid: BucketGrid,
    decode_tokens: Vec<f64>,
    decode_context: Vec<f64>,
    pub(crate) arrivals: Vec<f64>,
    prefill_tokens: Vec<f64>,
    prefill_pairs: Vec<f64>,
    /// Decayed seconds of observation (the denominator of every rate).
    window_s: f64,
    last_advance: Option<f64>,
    /// Per bucket, the share of arrivals the current plan was made for.
    planned_arrivals: Option<Vec<f64>>,
    last_change: f64,
    /// Since when the arrival mix has diverged from the plan's, and since when some boundary's
    /// stages have been imbalanced (`None` while the trigger does not hold).
    diverged_since: Option<f64>,
    imbalanced_since: Option<f64>,
}

impl Refiner {
    pub fn new(config: RefineConfig, grid: BucketGrid) -> Result<Self> {
        config.validate()?;
        let nb = grid.num_buckets();
        Ok(Refiner {
            config,
            grid,
            decode_tokens: vec![0.0; nb],
            decode_context: vec![0.0; nb],
            arrivals: vec![0.0; nb],
            prefill_tokens: vec![0.0; nb],
            prefill_pairs: vec![0.0; nb],
            window_s: 0.0,
            last_advance: None,
            planned_arrivals: None,
            last_change: f64::NEG_INFINITY,
            diverged_since: None,
            imbalanced_since: None,
        })
    }

    fn bucket(&self, len: u32) -> usize {
        self.grid.bucket_of(len.min(self.grid.max_len() - 1)).expect("clamped below max_len")
    }

    /// Records the arrival mix the current plan was made for; re-planning is considered once
    /// the observed mix drifts from it. Without it, the first full window of observations
    /// becomes the reference.
    pub fn set_planned_workload(&mut self, planned: &WorkloadSummary) {
        self.planned_arrivals = Some(normalized(&planned.arrivals));
    }

    /// One engine step: every entry is one decode token at its context length.
    pub fn observe_step(&mut self, entries: &[StepEntry]) {
        self.observe_lens(entries.iter().map(|e| e.context_len));
    }

    /// `observe_step` of a step whose entries have these context lengths, in this order.
    pub fn observe_lens(&mut self, lens: impl Iterator<Item = u32>) {
        for len in lens {
            let b = self.bucket(len);
            self.decode_tokens[b] += 1.0;
            self.decode_context[b] += f64::from(len);
        }
    }

    pub fn observe_arrival(&mut self, prompt_len: u32) {
        let b = self.bucket(prompt_len);
        self.arrivals[b] += 1.0;
        self.prefill_tokens[b] += f64::from(prompt_len);
        self.prefill_pairs[b] += prefill_pairs(0, u64::from(prompt_len)) as f64;
    }

    /// Ages the histogram to `now`.
    pub fn advance(&mut self, now: f64) {
        let Some(last) = self.last_advance.replace(now) else { return };
        let dt = (now - last).max(0.0);
        let decay_rate = std::f64::consts::LN_2 / self.config.half_life_s;
        let keep = (-dt * decay_rate).exp();
        for v in [
            &mut self.decode_tokens,
            &mut self.decode_context,
            &mut self.arrivals,
            &mut self.prefill_tokens,
            &mut self.prefill_pairs,
        ] {
            v.iter_mut().for_each(|x| *x = forget_faded(*x * keep));
        }
        // The decayed integral of time: what a steady rate of observations over `dt` weighs,
        // exactly, so that one call over an idle stretch ages the history as calls every tick
        // would.
        self.window_s = self.window_s * keep - (-dt * decay_rate).exp_m1() / decay_rate;
    }

    /// The observed traffic as rates, or `None` before enough has been seen.
    pub fn summary(&self) -> Option<WorkloadSummary> {
        let arrivals: f64 = self.arrivals.iter().sum();
        if self.window_s < self.config.min_window_s || arrivals <= 0.0 {
            return None;
        }
        let rate = |v: &[f64]| v.iter().map(|x| x / self.window_s).collect::<Vec<f64>>();
        let decode_tokens = rate(&self.decode_tokens);
        let edges = self.grid.edges();
        // A request passing length L leaves exactly one token-step at L, so the crossing rate
        // of an edge is the token density just below it.
        let mut crossings = vec![0.0; edges.len()];
        for k in 1..edges.len() - 1 {
            crossings[k] = decode_tokens[k - 1] / f64::from(edges[k] - edges[k - 1]);
        }
        let arrival_rate = arrivals / self.window_s;
        let prompt_tokens: f64 = self.prefill_tokens.iter().sum();
        let total_tokens: f64 = self.decode_tokens.iter().sum();
        Some(WorkloadSummary {
            grid: self.grid.clone(),
            arrival_rate,
            decode_context: rate(&self.decode_context),
            arrivals: rate(&self.arrivals),
            prefill_tokens: rate(&self.prefill_tokens),
            prefill_pairs: rate(&self.prefill_pairs),
            crossings,
            mean_prompt_len: prompt_tokens / arrivals,
            mean_output_len: total_tokens / arrivals,
            decode_tokens,
        })
    }

    /// Total-variation distance between the planned and the observed shares of arrivals per
    /// stage of `cuts`.
    fn arrival_shift(&self, planned: &[f64], cuts: &[usize]) -> f64 {
        let observed = normalized(&self.arrivals);
        let share = |v: &[f64], w: &[usize]| v[w[0]..w[1]].iter().sum::<f64>();
        0.5 * cuts.windows(2).map(|w| (share(planned, w) - share(&observed, w)).abs()).sum::<f64>()
    }

    /// Whether `condition` has held for `persist_s` at `now`, tracking its start in `since`.
    fn persisted(since: &mut Option<f64>, condition: bool, now: f64, persist_s: f64) -> bool {
        if !condition {
            *since = None;
            return false;
        }
        now - *since.get_or_insert(now) >= persist_s
    }

    /// Decides a layout change at `now`, or `None` to keep the current one.
    pub fn decide(
        &mut self,
        layout: &StageLayout,
        profile: &CostProfile,
        now: f64,
    ) -> Option<(StageLayout, Refinement)> {
        if now - self.last_change < self.config.cooldown_s {
            return None;
        }
        let summary = self.summary()?;
        let table = RangeTable::new(&summary, profile);
        let cuts = self.cuts_of(layout);
        let counts: Vec<u32> = layout.stages().iter().map(|s| s.instances.len() as u32).collect();
        let current = layout_cost(&table, &cuts, &counts);
        let good_enough = |candidate: f64| candidate < current * (1.0 - self.config.min_improvement);
        let shift = match &self.planned_arrivals {
            // No reference yet: the first full window becomes it; re-plan only if the current
            // layout cannot carry the traffic.
            None => {
                self.planned_arrivals = Some(normalized(&self.arrivals));
                if current.is_finite() {
                    0.0
                } else {
                    1.0
                }
            }
            Some(planned) => self.arrival_shift(planned, &cuts),
        };
        let persist_s = self.config.persist_s;
        if Self::persisted(&mut self.diverged_since, shift > self.config.replan_divergence, now, persist_s) {
            // The stage count is the planner's choice (made by simulation, which the analytic
            // objective gets wrong most often); a re-plan moves boundaries and instances only.
            let options = PartitionOptions {
                num_instances: layout.num_instances() as u32,
                max_stages: Some(layout.stages().len() as u32),
            };
            if let Ok(plan) = partition(&summary, profile, &options) {
                self.planned_arrivals = Some(normalized(&self.arrivals));
                self.diverged_since = None;
                if good_enough(plan.objective_s * summary.arrival_rate) {
                    let new_layout = layout.reassign(&plan).ok()?;
                    self.last_change = now;
                    return Some((new_layout, Refinement::Replan));
                }
            }
        }
        let nudge = self.best_nudge(&table, layout, &cuts, &counts).filter(|&(_, _, cost)| good_enough(cost));
        if !Self::persisted(&mut self.imbalanced_since, nudge.is_some(), now, persist_s) {
            return None;
        }
        self.imbalanced_since = None;
        let (stage, cut, _) = nudge?;
        let edges = self.grid.edges();
        let from = edges[cuts[stage + 1]];
        let mut stages: Vec<StageRange> = layout.stages().to_vec();
        stages[stage].max_len = edges[cut];
        stages[stage + 1].min_len = edges[cut];
        self.last_change = now;
        Some((StageLayout::new(stages).ok()?, Refinement::Nudge { stage, from, to: edges[cut] }))
    }

    /// Bucket index of every stage boundary (snapped to the grid), `[0, ..., num_buckets]`.
    fn cuts_of(&self, layout: &StageLayout) -> Vec<usize> {
        let edges = self.grid.edges();
        let mut cuts: Vec<usize> = layout.stages().iter().map(|s| edges.partition_point(|&e| e < s.min_len)).collect();
        cuts.push(edges.len() - 1);
        cuts
    }

    /// Among one-bucket moves of boundaries between stages whose utilizations diverge, the
    /// one with the lowest predicted cost: (stage, new cut, cost).
    fn best_nudge(
        &self,
        table: &RangeTable,
        layout: &StageLayout,
        cuts: &[usize],
        counts: &[u32],
    ) -> Option<(usize, usize, f64)> {
        let utilization = |k: usize| {
            table.predict(&table.load(cuts[k], cuts[k + 1]), counts[k]).map_or(f64::INFINITY, |(_, p)| p.utilization)
        };
        let mut best: Option<(usize, usize, f64)> = None;
        for k in 0..layout.stages().len() - 1 {
            if (utilization(k) - utilization(k + 1)).abs() <= self.config.nudge_imbalance {
                continue;
            }
            for cut in [cuts[k + 1] - 1, cuts[k + 1] + 1] {
                if cut <= cuts[k] || cut >= cuts[k + 2] {
                    continue;
                }
                let mut moved = cuts.to_vec();
                moved[k + 1] = cut;
                let cost = layout_cost(table, &moved, counts);
                if best.is_none_or(|(_, _, c)| cost < c) {
                    best = Some((k, cut, cost));
                }
            }
        }
        best
    }
}

/// Below this a decayed weight is 0: 500 half-lives since its bucket was last observed (8 hours
/// at the default half-life). Far smaller weights changed no sum they entered, but rates
/// derived from them reached the subnormal range, where arithmetic runs up to a hundred times
/// slower on x86: a bucket left unobserved for a day of simulated traffic made every tick's
/// range table crawl. It also stops such a bucket from counting as traffic (the longest
/// context a stage is priced for).
const FORGOTTEN_WEIGHT: f64 = 1e-150;

/// `x`, or 0 below [`FORGOTTEN_WEIGHT`].
fn forget_faded(x: f64) -> f64 {
    if x < FORGOTTEN_WEIGHT {
        0.0
    } else {
        x
    }
}

fn normalized(v: &[f64]) -> Vec<f64> {
    let total: f64 = v.iter().sum();
    v.iter().map(|x| if total > 0.0 { x / total } else { 0.0 }).collect()
}

fn layout_cost(table: &RangeTable, cuts: &[usize], counts: &[u32]) -> f64 {
    cuts.windows(2)
        .zip(counts)
        .map(|(w, &m)| table.predict(&table.load(w[0], w[1]), m).map_or(f64::INFINITY, |(c, _)| c))
        .sum()
}
