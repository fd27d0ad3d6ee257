//! The stage partitioner: which length ranges form stages and how many instances each gets.
//!
//! A dynamic program over (bucket boundary, instances used) minimizes the predicted mean
//! end-to-end latency; the model, the objective, the recurrence and the complexity are written
//! up in docs/design/partitioner.md. `stage_cost` is the single place the objective lives.

use serde::{Deserialize, Serialize};

use crate::cost::CostProfile;
use crate::error::{CoreError, Result};
use crate::workload::WorkloadSummary;

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
        // to the batch's longest request costs `heterogeneity` of full price.
        let per_token = p.per_sequence_s
            + p.per_context_token_s * (mean_context + p.heterogeneity * (longest_context - mean_context).max(0.0));
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
            erlang_b = load.work * erlang_b / (m as f64 + load.work * erlang_b);
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

/// Leftmost argmin and value of `f[k] + g[n - k]` over `k` in `[k_lo, k_hi]`.
#[inline]
fn best_split(f: &[f64], g: &[f64], n: usize, k_lo: usize, k_hi: usize) -> (f64, usize) {
    let mut best = (f64::INFINITY, k_lo);
    for k in k_lo..=k_hi {
        let v = f[k] + g[n - k];
        if v < best.0 {
            best = (v, k);
        }
    }
    best
}

fn first_finite(v: &[f64]) -> Option<usize> {
    v.iter().position(|x| x.is_finite())
}

fn is_finite_suffix_from(v: &[f64], start: usize) -> bool {
    v[start..].iter().all(|x| x.is_finite())
}

fn is_convex(g: &[f64], start: usize) -> bool {
    g[start..].windows(3).all(|w| w[2] - w[1] >= w[1] - w[0] - 1e-12 * (1.0 + w[1].abs()))
}

/// `out[n] = min_k f[k] + g[n-k]` with the chosen `k` in `arg[n]`, only where it improves `out`.
///
/// When `g` is convex on its finite suffix and `f` finite on a suffix, the matrix
/// `f[k] + g[n-k]` is Monge, so the leftmost argmin is non-decreasing in `n` and a
/// divide-and-conquer finds all row minima in O(N log N); otherwise the plain O(N^2) scan.
fn min_plus_into(f: &[f64], g: &[f64], out: &mut [f64], arg: &mut [usize]) {
    let n_max = out.len() - 1;
    let (Some(f_lo), Some(g_lo)) = (first_finite(f), first_finite(g)) else { return };
    if f_lo + g_lo > n_max {
        return;
    }
    let monge = is_finite_suffix_from(f, f_lo) && is_finite_suffix_from(g, g_lo) && is_convex(g, g_lo);
    let mut relax = |n: usize, (v, k): (f64, usize)| {
        if v < out[n] {
            out[n] = v;
            arg[n] = k;
        }
    };
    if !monge {
        for n in f_lo + g_lo..=n_max {
            relax(n, best_split(f, g, n, f_lo, n - g_lo));
        }
        return;
    }
    // Explicit stack of (n_lo, n_hi, k_lo, k_hi) ranges.
    let mut stack = vec![(f_lo + g_lo, n_max, f_lo, n_max - g_lo)];
    while let Some((n_lo, n_hi, k_lo, k_hi)) = stack.pop() {
        let mid = (n_lo + n_hi) / 2;
        let found = best_split(f, g, mid, k_lo, k_hi.min(mid - g_lo));
        relax(mid, found);
        if mid > n_lo {
            stack.push((n_lo, mid - 1, k_lo, found.1));
        }
        if mid < n_hi {
            stack.push((mid + 1, n_hi, found.1, k_hi));
        }
    }
}

/// One DP table: `cost[j][n]` = least cost of covering buckets `[0, j)` with `n` instances,
/// with the last stage's start bucket and instance count kept to rebuild the plan.
struct Table {
    cost: Vec<Vec<f64>>,
    parent: Vec<Vec<(usize, usize)>>,
}

impl Table {
    fn new(num_buckets: usize, n: usize) -> Self {
        Table {
            cost: vec![vec![f64::INFINITY; n + 1]; num_buckets + 1],
            parent: vec![vec![(0, 0); n + 1]; num_buckets + 1],
        }
    }
}

/// Extends `prev` (plans ending at each boundary) by one more stage into `next`. When `next`
/// is `prev` itself (no stage limit) stages are appended in boundary order, which is the same
/// recurrence computed in place.
fn extend(table: &RangeTable, prev: Option<&Table>, next: &mut Table, n: usize) {
    let nb = table.num_buckets();
    let mut g = Vec::with_capacity(n + 1);
    let mut row = vec![f64::INFINITY; n + 1];
    let mut arg = vec![0usize; n + 1];
    let mut best = vec![f64::INFINITY; n + 1];
    let mut best_parent = vec![(0usize, 0usize); n + 1];
    for j in 1..=nb {
        best.fill(f64::INFINITY);
        for i in (0..j).rev() {
            let load = table.load(i, j);
            // Work only grows as the stage widens downwards: once even n instances cannot carry
            // it, no wider stage ending at j can either.
            if load.work / table.profile.max_utilization > n as f64 {
                break;
            }
            table.stage_costs(&load, n, &mut g);
            row.fill(f64::INFINITY);
            let f = match prev {
                Some(p) => &p.cost[i],
                None => &next.cost[i],
            };
            min_plus_into(f, &g, &mut row, &mut arg);
            for total in 0..=n {
                if row[total] < best[total] {
                    best[total] = row[total];
                    best_parent[total] = (i, total - arg[total]);
                }
            }
        }
        next.cost[j].copy_from_slice(&best);
        next.parent[j].copy_from_slice(&best_parent);
    }
}

/// The optimal plan for `workload` on `options.num_instances` instances under `profile`.
pub fn partition(workload: &WorkloadSummary, profile: &CostProfile, options: &PartitionOptions) -> Result<StagePlan> {
    profile.validate()?;
    if options.num_instances == 0 {
        return Err(CoreError::invalid("num_instances", 0, "must be >= 1"));
    }
    if options.max_stages == Some(0) {
        return Err(CoreError::invalid("max_stages", 0, "must be >= 1"));
    }
    let table = RangeTable::new(workload, profile);
    let nb = table.num_buckets();
    let n = options.num_instances as usize;

    // Rebuild the stage list from the parents, from the last bucket back.
    let (cost, stages_rev) = match options.max_stages {
        None => {
            let mut t = Table::new(nb, n);
            t.cost[0][0] = 0.0;
            extend(&table, None, &mut t, n);
            let cost = t.cost[nb][n];
            (cost, walk_back(&[t], nb, n, false))
        }
        Some(k) => {
            let k = (k as usize).min(nb).min(n);
            let mut layers: Vec<Table> = Vec::with_capacity(k + 1);
            let mut base = Table::new(nb, n);
            base.cost[0][0] = 0.0;
            layers.push(base);
            for _ in 0..k {
                let mut next = Table::new(nb, n);
                extend(&table, layers.last(), &mut next, n);
                layers.push(next);
            }
            let best_layer = (1..=k).min_by(|&a, &b| layers[a].cost[nb][n].total_cmp(&layers[b].cost[nb][n])).unwrap();
            let cost = layers[best_layer].cost[nb][n];
            (cost, walk_back(&layers[..=best_layer], nb, n, true))
        }
    };
    if !cost.is_finite() {
        let total = table.load(0, nb);
        return Err(CoreError::Infeasible(format!(
            "{} instances cannot carry {:.2} req/s of this workload: it needs about {:.1} busy instances \
             (max_utilization {}), or a context of {} tokens exceeds the KV capacity {} / max_model_len {}",
            n,
            workload.arrival_rate,
            total.work,
            profile.max_utilization,
            total.longest_context,
            profile.kv_capacity_tokens,
            profile.max_model_len
        )));
    }
    let edges = workload.grid.edges();
    let stages = stages_rev
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
