//! The stage partitioner: which length ranges form stages and how many instances each gets.
//!
//! A dynamic program over (bucket boundary, instances used) minimizes the predicted mean
//! end-to-end latency; the model, the objective, the recurrence and the complexity are written
//! up in docs/design/partitioner.md. `stage_cost` is the single place the objective lives.

use serde::{Deserialize, Serialize};

use crate::cost::CostProfile;
use crate::error::{CoreError, Result};
use crate::workload::WorkloadSummary;

mod minplus;

use minplus::{min_plus, Curve, Support};

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOptions {
    pub num_instances: u32,
    /// At most this many stages; `None` lets the objective decide.
    pub max_stages: Option<u32>,
}

/// What the model predicts for one stage at its steady state.
#[derive(Copy, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StagePrediction {
    /// Predicted decode step time (= time per output token), seconds.
    pub tpot_s: f64,
    /// Busy fraction of each instance.
    pub utilization: f64,
    /// Mean wait for admission (M/M/m approximation), seconds.
    pub queue_wait_s: f64,
    /// Decode requests running on each instance.
    pub running_per_instance: f64,
    /// Decode tokens per second the stage must produce.
    pub decode_tokens_per_s: f64,
    /// Requests per second entering the stage (new arrivals plus migrations in).
    pub entering_per_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageSpec {
    /// Inclusive lower bound of the context lengths the stage serves.
    pub min_len: u32,
    /// Exclusive upper bound; a request reaching it moves to the next stage.
    pub max_len: u32,
    pub num_instances: u32,
    pub prediction: StagePrediction,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    pub stages: Vec<StageSpec>,
    /// Predicted mean end-to-end latency, seconds (the minimized objective).
    pub objective_s: f64,
}

/// Aggregates of one candidate stage (buckets `[i, j)`), independent of its instance count.
#[derive(Copy, Clone, Debug, Default)]
pub(crate) struct StageLoad {
    decode_tokens: f64,
    mean_context: f64,
    /// Longest context the stage will hold (top of its highest bucket with traffic).
    longest_context: f64,
    /// Seconds of instance work per second (offered load in Erlangs).
    work: f64,
    arrivals: f64,
    prefill_tokens: f64,
    crossings_in: f64,
    /// Stall of one migration into the stage.
    migration_stall_s: f64,
}

/// Prefix sums over buckets so any stage's load is O(1).
pub(crate) struct RangeTable<'a> {
    profile: &'a CostProfile,
    edges: Vec<u32>,
    decode_tokens: Vec<f64>,
    decode_context: Vec<f64>,
    arrivals: Vec<f64>,
    prefill_tokens: Vec<f64>,
    prefill_work: Vec<f64>,
    crossings: Vec<f64>,
    /// `top_busy[j]`: 1 + highest bucket below `j` with traffic, 0 if none.
    top_busy: Vec<usize>,
}

fn prefix(v: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(v.len() + 1);
    out.push(0.0);
    let mut acc = 0.0;
    for x in v {
        acc += x;
        out.push(acc);
    }
    out
}

impl<'a> RangeTable<'a> {
    pub(crate) fn new(w: &WorkloadSummary, profile: &'a CostProfile) -> Self {
        let prefill_work: Vec<f64> = w
            .prefill_tokens
            .iter()
            .zip(&w.prefill_pairs)
            .map(|(t, p)| profile.per_prefill_token_s * t + profile.prefill_attention_s * p)
            .collect();
        let mut top_busy = vec![0usize; w.decode_tokens.len() + 1];
        for k in 0..w.decode_tokens.len() {
            let busy = w.decode_tokens[k] > 0.0 || w.arrivals[k] > 0.0;
            top_busy[k + 1] = if busy { k + 1 } else { top_busy[k] };
        }
        RangeTable {
            profile,
            edges: w.grid.edges().to_vec(),
            decode_tokens: prefix(&w.decode_tokens),
            decode_context: prefix(&w.decode_context),
            arrivals: prefix(&w.arrivals),
            prefill_tokens: prefix(&w.prefill_tokens),
            prefill_work: prefix(&prefill_work),
            crossings: w.crossings.clone(),
            top_busy,
        }
    }

    pub(crate) fn num_buckets(&self) -> usize {
        self.edges.len() - 1
    }

    pub(crate) fn load(&self, i: usize, j: usize) -> StageLoad {
        let p = self.profile;
        let decode_tokens = self.decode_tokens[j] - self.decode_tokens[i];
        let context = self.decode_context[j] - self.decode_context[i];
        let top = self.top_busy[j];
        let longest_context = if top > i { f64::from(self.edges[top]) } else { 0.0 };
        let mean_context = if decode_tokens > 0.0 { context / decode_tokens } else { 0.0 };
        // Per decode token: per-request cost plus attention over the context, where the padding
        // to the batch's longest request costs `heterogeneity` of full price, and the longest
        // request's critical path is spread over the largest batch (a lower bound of that term:
        // the batch size is not known here; the selection by simulation sees the exact one).
        let padded = mean_context + p.heterogeneity * (longest_context - mean_context).max(0.0);
        let critical_path = p.critical_path(p.max_num_seqs, longest_context) / f64::from(p.max_num_seqs);
        let per_token = p.per_sequence_s + p.per_context_token_s * padded.max(critical_path);
        let crossings_in = if i > 0 { self.crossings[i] } else { 0.0 };
        StageLoad {
            decode_tokens,
            mean_context,
            longest_context,
            work: per_token * decode_tokens + (self.prefill_work[j] - self.prefill_work[i]),
            arrivals: self.arrivals[j] - self.arrivals[i],
            prefill_tokens: self.prefill_tokens[j] - self.prefill_tokens[i],
            crossings_in,
            migration_stall_s: if i > 0 { p.migration_stall(u64::from(self.edges[i])) } else { 0.0 },
        }
    }

    /// `out[m]` = cost of the stage on `m` instances for m in 0..=max_m (`INFINITY` where
    /// infeasible). Finite values form a suffix and are convex and non-increasing in `m`.
    pub(crate) fn stage_costs(&self, load: &StageLoad, max_m: usize, out: &mut Vec<f64>) {
        out.clear();
        out.resize(max_m + 1, f64::INFINITY);
        let mut erlang_b = 1.0; // Erlang B with 0 servers.
        for (m, slot) in out.iter_mut().enumerate().skip(1) {
            // Once it underflows to 0 the recurrence stays at 0: skip its serial divisions.
            if erlang_b != 0.0 {
                erlang_b = load.work * erlang_b / (m as f64 + load.work * erlang_b);
            }
            if let Some((cost, _)) = stage_cost(self.profile, load, m as u32, erlang_b) {
                *slot = cost;
            }
        }
    }

    pub(crate) fn predict(&self, load: &StageLoad, m: u32) -> Option<(f64, StagePrediction)> {
        let mut erlang_b = 1.0;
        for k in 1..=m {
            erlang_b = load.work * erlang_b / (f64::from(k) + load.work * erlang_b);
        }
        stage_cost(self.profile, load, m, erlang_b)
    }
}

/// Latency-seconds per second (= requests in the system, by Little's law) that a stage adds
/// when run on `m` instances; `None` when the stage cannot carry its load.
fn stage_cost(p: &CostProfile, load: &StageLoad, m: u32, erlang_b: f64) -> Option<(f64, StagePrediction)> {
    if load.longest_context > p.kv_capacity_tokens as f64 || load.longest_context > f64::from(p.max_model_len) {
        return None;
    }
    let m_f = f64::from(m);
    let utilization = load.work / m_f;
    if utilization > p.max_utilization {
        return None;
    }
    // Continuous batching at steady state: per step, t0 of overhead plus work; the busy share
    // `utilization` of every second is work, so a step lasts t0 / (1 - utilization).
    let tpot = p.step_overhead_s / (1.0 - utilization);
    let running = load.decode_tokens / m_f * tpot;
    if running > f64::from(p.max_num_seqs) || running * load.mean_context > p.kv_capacity_tokens as f64 {
        return None;
    }
    let entering = load.arrivals + load.crossings_in;
    // Admission wait: M/M/m with the stage's offered work (Erlangs) and mean work per request.
    let queue_wait = if entering > 0.0 && load.work > 0.0 {
        let erlang_c = m_f * erlang_b / (m_f - load.work * (1.0 - erlang_b));
        erlang_c * (load.work / entering) / (m_f - load.work)
    } else {
        0.0
    };
    // First token: one step plus one step per prefill chunk.
    let first_token_steps = load.arrivals + load.prefill_tokens / f64::from(p.max_batch_tokens);
    let cost = tpot * (load.decode_tokens + first_token_steps)
        + entering * queue_wait
        + load.crossings_in * load.migration_stall_s;
    let prediction = StagePrediction {
        tpot_s: tpot,
        utilization,
        queue_wait_s: queue_wait,
        running_per_instance: running,
        decode_tokens_per_s: load.decode_tokens,
        entering_per_s: entering,
    };
    Some((cost, prediction))
}

/// One DP table: `cost[j][n]` = least cost of covering buckets `[0, j)` with `n` instances,
/// with the last stage's start bucket and instance count kept to rebuild the plan, and where
/// each row's finite values lie.
struct Table {
    cost: Vec<Vec<f64>>,
    parent: Vec<Vec<(usize, usize)>>,
    support: Vec<Option<Support>>,
    /// `least[j][n]`: the least of `cost[j][..=n]`, for bounds.
    least: Vec<Vec<f64>>,
}

impl Table {
    fn new(num_buckets: usize, n: usize) -> Self {
        Table {
            cost: vec![vec![f64::INFINITY; n + 1]; num_buckets + 1],
            parent: vec![vec![(0, 0); n + 1]; num_buckets + 1],
            support: vec![None; num_buckets + 1],
            least: vec![vec![f64::INFINITY; n + 1]; num_buckets + 1],
        }
    }

    /// Records what bounds and convolutions need to know about row `j`, once it is final.
    fn finish_row(&mut self, j: usize) {
        self.support[j] = Support::of(&self.cost[j]);
        prefix_min(&self.cost[j], &mut self.least[j]);
    }

    /// The table of plans with no stage yet: nothing covered, no instance used.
    fn empty_plan(num_buckets: usize, n: usize) -> Self {
        let mut t = Table::new(num_buckets, n);
        t.cost[0][0] = 0.0;
        t.finish_row(0);
        t
    }
}

/// `out[k]` = the least of `v[..=k]`.
fn prefix_min(v: &[f64], out: &mut [f64]) {
    let mut least = f64::INFINITY;
    for (o, &x) in out.iter_mut().zip(v) {
        least = least.min(x);
        *o = least;
    }
}

/// Fills the DP. Unlayered (`tables` holds one table, row 0 set) stages are appended in
/// boundary order within the one table. Layered, `tables[k]` holds plans of exactly `k`
/// stages and extends `tables[k - 1]` by one stage. Either way row `j` is final once every
/// stage ending at `j` has been tried, starts `i` from `j - 1` down (ties keep the later
/// start), and a stage's cost curve is computed once for all layers.
fn solve(table: &RangeTable, tables: &mut [Table], n: usize) {
    let nb = table.num_buckets();
    let num_layers = tables.len().saturating_sub(1).max(1);
    let is_layered = tables.len() > 1;
    let mut g = Vec::with_capacity(n + 1);
    let mut g_least = vec![f64::INFINITY; n + 1];
    let mut stack = Vec::new();
    let mut best = vec![vec![f64::INFINITY; n + 1]; num_layers];
    let mut best_parent = vec![vec![(0usize, 0usize); n + 1]; num_layers];
    for j in 1..=nb {
        best.iter_mut().for_each(|b| b.fill(f64::INFINITY));
        for i in (0..j).rev() {
            let load = table.load(i, j);
            // Work only grows as the stage widens downwards: once even n instances cannot carry
            // it, no wider stage ending at j can either.
            if load.work / table.profile.max_utilization > n as f64 {
                break;
            }
            table.stage_costs(&load, n, &mut g);
            let Some(curve) = Curve::new(&g) else { continue };
            prefix_min(&g, &mut g_least);
            for layer in 0..num_layers {
                let from = if is_layered { &tables[layer] } else { &tables[0] };
                let Some(f_support) = from.support[i] else { continue };
                let (best, best_parent) = (&mut best[layer], &mut best_parent[layer]);
                // Every sum the convolution forms for a total `t` is at least the least `f`
                // it may use plus the least `g`; when no total could beat what is known, the
                // convolution would change nothing.
                let (f_lo, g_lo) = (f_support.lo, curve.support.lo);
                let f_least = &from.least[i];
                let can_improve = (f_lo + g_lo..=n).any(|t| f_least[t - g_lo] + g_least[t - f_lo] < best[t]);
                if !can_improve {
                    continue;
                }
                min_plus(&from.cost[i], f_support, &curve, n, &mut stack, |total, v, k| {
                    if v < best[total] {
                        best[total] = v;
                        best_parent[total] = (i, total - k);
                    }
                });
            }
        }
        for layer in 0..num_layers {
            let to = &mut tables[if is_layered { layer + 1 } else { 0 }];
            to.cost[j].copy_from_slice(&best[layer]);
            to.parent[j].copy_from_slice(&best_parent[layer]);
            to.finish_row(j);
        }
    }
}

/// The optimal plan for `workload` on `options.num_instances` instances under `profile`.
pub fn partition(workload: &WorkloadSummary, profile: &CostProfile, options: &PartitionOptions) -> Result<StagePlan> {
    validate(profile, options.num_instances, options.max_stages)?;
    let table = RangeTable::new(workload, profile);
    let (nb, n) = (table.num_buckets(), options.num_instances as usize);
    match options.max_stages {
        None => {
            let mut t = [Table::empty_plan(nb, n)];
            solve(&table, &mut t, n);
            best_plan(&table, workload, &t, false)
        }
        Some(k) => {
            let layers = solve_layers(&table, (k as usize).min(nb).min(n), n);
            best_plan(&table, workload, &layers, true)
        }
    }
}

/// For every `k` in `1..=max_stages`, what [`partition`] returns with `max_stages = Some(k)`
/// (`None` where that is infeasible), from one solve: layer `k` of a stage-limited DP does
/// not depend on how many layers follow it, so the plans are the same, at the cost of one
/// call with the largest limit instead of one call per limit.
pub fn partition_by_stage_count(
    workload: &WorkloadSummary,
    profile: &CostProfile,
    num_instances: u32,
    max_stages: u32,
) -> Result<Vec<Option<StagePlan>>> {
    validate(profile, num_instances, Some(max_stages))?;
    let table = RangeTable::new(workload, profile);
    let (nb, n) = (table.num_buckets(), num_instances as usize);
    let layers = solve_layers(&table, (max_stages as usize).min(nb).min(n), n);
    (1..=max_stages as usize)
        .map(|k| match best_plan(&table, workload, &layers[..=k.min(layers.len() - 1)], true) {
            Ok(plan) => Ok(Some(plan)),
            Err(CoreError::Infeasible(_)) => Ok(None),
            Err(e) => Err(e),
        })
        .collect()
}

fn validate(profile: &CostProfile, num_instances: u32, max_stages: Option<u32>) -> Result<()> {
    profile.validate()?;
    if num_instances == 0 {
        return Err(CoreError::invalid("num_instances", 0, "must be >= 1"));
    }
    if max_stages == Some(0) {
        return Err(CoreError::invalid("max_stages", 0, "must be >= 1"));
    }
    Ok(())
}

/// Tables of plans with exactly `0..=k` stages.
fn solve_layers(table: &RangeTable, k: usize, n: usize) -> Vec<Table> {
    let nb = table.num_buckets();
    let mut layers: Vec<Table> = Vec::with_capacity(k + 1);
    layers.push(Table::empty_plan(nb, n));
    layers.extend((0..k).map(|_| Table::new(nb, n)));
    solve(table, &mut layers, n);
    layers
}

/// Why no plan of `n` instances carries the workload: the busy instances it needs past what
/// `n` can give, or a context no instance can hold (naming only the cause that holds).
fn infeasible_reason(table: &RangeTable, workload: &WorkloadSummary, nb: usize, n: usize) -> String {
    let total = table.load(0, nb);
    let profile = table.profile;
    let available = n as f64 * profile.max_utilization;
    let longest_held = (profile.kv_capacity_tokens as f64).min(f64::from(profile.max_model_len));
    if total.work > available {
        format!(
            "{n} instances cannot carry {:.2} req/s of this workload: it needs about {:.1} busy instances, \
             and {n} give at most {available:.1} (max_utilization {})",
            workload.arrival_rate, total.work, profile.max_utilization
        )
    } else if total.longest_context > longest_held {
        format!(
            "a context of {} tokens does not fit an instance (KV capacity {} tokens, max_model_len {})",
            total.longest_context, profile.kv_capacity_tokens, profile.max_model_len
        )
    } else {
        format!(
            "{n} instances cannot carry {:.2} req/s of this workload: the requests it keeps running at \
             once exceed the instances' batch ({} sequences) or KV ({} tokens) limits",
            workload.arrival_rate, profile.max_num_seqs, profile.kv_capacity_tokens
        )
    }
}

/// The plan covering every bucket with every instance: from the one table, or (`layered`) from
/// the cheapest of `tables[1..]` (the first on a tie).
fn best_plan(table: &RangeTable, workload: &WorkloadSummary, tables: &[Table], layered: bool) -> Result<StagePlan> {
    let (nb, n) = (table.num_buckets(), tables[0].cost[0].len() - 1);
    let tables = if layered {
        let best = (1..tables.len()).min_by(|&a, &b| tables[a].cost[nb][n].total_cmp(&tables[b].cost[nb][n]));
        &tables[..=best.expect("at least one layer")]
    } else {
        tables
    };
    let cost = tables[tables.len() - 1].cost[nb][n];
    if !cost.is_finite() {
        return Err(CoreError::Infeasible(infeasible_reason(table, workload, nb, n)));
    }
    // Rebuild the stage list from the parents, from the last bucket back.
    let edges = workload.grid.edges();
    let stages = walk_back(tables, nb, n, layered)
        .into_iter()
        .rev()
        .map(|(i, j, m)| {
            let (_, prediction) = table.predict(&table.load(i, j), m as u32).expect("chosen stages are feasible");
            StageSpec { min_len: edges[i], max_len: edges[j], num_instances: m as u32, prediction }
        })
        .collect();
    Ok(StagePlan { stages, objective_s: cost / workload.arrival_rate })
}

/// The one-stage plan: every length on all `num_instances` instances, which the cascade policy
/// runs as least-load admission (the no-regret fallback the planner compares every split
/// against). Unlike [`partition`] it never refuses: where the model calls one stage infeasible
/// (it prices a stage's padding at its longest context, so a 128K tail makes a single stage
/// look far slower than least-load measures) the prediction is left at zero and the objective
/// is infinite, and the planner judges the layout by simulation instead.
pub fn single_stage(workload: &WorkloadSummary, profile: &CostProfile, num_instances: u32) -> Result<StagePlan> {
    profile.validate()?;
    if num_instances == 0 {
        return Err(CoreError::invalid("num_instances", 0, "must be >= 1"));
    }
    let table = RangeTable::new(workload, profile);
    let (cost, prediction) = table
        .predict(&table.load(0, table.num_buckets()), num_instances)
        .unwrap_or((f64::INFINITY, StagePrediction::default()));
    let stage = StageSpec { min_len: 0, max_len: workload.grid.max_len(), num_instances, prediction };
    Ok(StagePlan { stages: vec![stage], objective_s: cost / workload.arrival_rate })
}

/// `plan`'s stage ranges on `sizes` instances each (the layout selection's size search). The
/// model predicts each stage where it finds the stage feasible; where it does not (it prices a
/// stage at its steady state, which a finite run's long stage may never reach) the prediction
/// is left at zero and the objective is infinite, as in [`single_stage`], and the planner
/// judges the layout by simulation. Every size must be at least 1 and every stage range must
/// be a range of `workload`'s grid.
pub fn resized(
    workload: &WorkloadSummary,
    profile: &CostProfile,
    plan: &StagePlan,
    sizes: &[u32],
) -> Result<StagePlan> {
    profile.validate()?;
    if sizes.len() != plan.stages.len() {
        return Err(CoreError::invalid(
            "sizes",
            sizes.len(),
            format!("must give one size for each of the plan's {} stages", plan.stages.len()),
        ));
    }
    if let Some(&zero) = sizes.iter().find(|&&m| m == 0) {
        return Err(CoreError::invalid("sizes", zero, "every stage needs at least 1 instance"));
    }
    let table = RangeTable::new(workload, profile);
    let edges = workload.grid.edges();
    let bucket = |len: u32| {
        edges
            .binary_search(&len)
            .map_err(|_| CoreError::invalid("stage bound", len, "must be an edge of the workload's grid"))
    };
    let mut cost = 0.0;
    let mut stages = Vec::with_capacity(sizes.len());
    for (stage, &m) in plan.stages.iter().zip(sizes) {
        let (i, j) = (bucket(stage.min_len)?, bucket(stage.max_len)?);
        let (c, prediction) =
            table.predict(&table.load(i, j), m).unwrap_or((f64::INFINITY, StagePrediction::default()));
        cost += c;
        stages.push(StageSpec { min_len: stage.min_len, max_len: stage.max_len, num_instances: m, prediction });
    }
    Ok(StagePlan { stages, objective_s: cost / workload.arrival_rate })
}

/// (start bucket, end bucket, instances) of each stage, last stage first.
fn walk_back(layers: &[Table], nb: usize, n: usize, layered: bool) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let (mut j, mut left) = (nb, n);
    let mut layer = layers.len() - 1;
    while j > 0 {
        let (i, m) = layers[layer].parent[j][left];
        out.push((i, j, m));
        j = i;
        left -= m;
        if layered {
            layer -= 1;
        }
    }
    out
}

#[cfg(test)]
mod tests;
