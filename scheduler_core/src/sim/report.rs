//! What a simulation run reports: one record per request, the summary, migration counts, a
//! per-stage load series sampled every tick, and per-instance peaks.

use std::collections::BTreeMap;

use crate::ids::{InstanceId, RequestId};

/// One request's fate. Times are seconds on the simulated clock; `None` where it never got there.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct RequestRecord {
    /// The request's index in the trace.
    pub request: RequestId,
    pub prompt_len: u32,
    pub output_len: u32,
    pub arrival_s: f64,
    /// When the policy first placed it.
    pub admitted_s: Option<f64>,
    pub first_token_s: Option<f64>,
    pub finished_s: Option<f64>,
    pub num_migrations: u32,
    pub num_preemptions: u32,
    /// Prompt tokens served from the prefix cache of the instance it was admitted to.
    pub num_cached_prompt_tokens: u32,
}

impl RequestRecord {
    pub fn queue_s(&self) -> Option<f64> {
        self.admitted_s.map(|t| t - self.arrival_s)
    }

    pub fn ttft_s(&self) -> Option<f64> {
        self.first_token_s.map(|t| t - self.arrival_s)
    }

    pub fn e2e_s(&self) -> Option<f64> {
        self.finished_s.map(|t| t - self.arrival_s)
    }

    /// Mean time per output token after the first; `None` for single-token outputs.
    pub fn tpot_s(&self) -> Option<f64> {
        if self.output_len < 2 {
            return None;
        }
        Some((self.e2e_s()? - self.ttft_s()?) / f64::from(self.output_len - 1))
    }
}

/// The headline figures, over completed requests (NaN where no request qualifies).
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct SimSummary {
    pub mean_e2e_s: f64,
    pub p99_e2e_s: f64,
    pub mean_ttft_s: f64,
    pub p99_ttft_s: f64,
    pub mean_tpot_s: f64,
    pub p99_tpot_s: f64,
    /// Output tokens over the makespan (first arrival to last completion).
    pub throughput_tok_s: f64,
    pub completed: u64,
    /// Migrations that landed.
    pub migrations: u64,
    /// Prompt tokens served from prefix caches over all prompt tokens of admitted requests
    /// (0 on a trace without sessions).
    pub prefix_cache_hit_rate: f64,
    /// The simulator's own wall time, seconds (0 unless measured by [`super::simulate`]).
    pub sim_wall_s: f64,
}

/// Load of one stage at one tick.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct StageLoadSample {
    pub time_s: f64,
    pub stage: u32,
    pub min_len: u32,
    pub max_len: u32,
    /// Instances in the stage at that time (the capacity guard and refinement change it).
    pub num_instances: u32,
    /// Requests in the running batches of the stage's instances.
    pub num_running: u32,
    /// KV allocated on those instances (blocks times block size, reservations included).
    pub kv_tokens: u64,
}

/// What one instance went through.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct InstanceStats {
    pub instance: InstanceId,
    pub num_steps: u64,
    /// Seconds spent stepping.
    pub busy_s: f64,
    pub peak_kv_tokens: u64,
    /// Most tokens (prefill chunks plus decodes) in one step.
    pub peak_batch_tokens: u32,
    pub peak_batch_seqs: u32,
    /// KV still allocated when the run ended (0 after a complete run).
    pub final_kv_tokens: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SimReport {
    pub policy: String,
    pub summary: SimSummary,
    /// In trace order.
    pub requests: Vec<RequestRecord>,
    /// Landed migrations by reason ("stage_bound", "balance", ...).
    pub migrations_by_reason: BTreeMap<&'static str, u64>,
    /// Migrations reported to the policy as failed, by reason (rate-limited ones included).
    pub failed_migrations_by_reason: BTreeMap<&'static str, u64>,
    /// The same failures by cause: "gone" (finished before its transfer started),
    /// "rate_limited", "not_on_source" (the policy's view was stale), "preempted", "no_room",
    /// "interrupted" (finished or preempted during the bulk copy), "no_room_at_landing".
    pub failed_migrations_by_cause: BTreeMap<&'static str, u64>,
    pub num_preemptions: u64,
    /// Ticks at which the policy changed its stage layout.
    pub num_layout_changes: u64,
    /// Of those, the capacity guard's instance moves (the rest are refinement's).
    pub num_capacity_moves: u64,
    /// Requests not completed when the run stopped (the admission queue stalled).
    pub num_unfinished: u64,
    pub total_output_tokens: u64,
    pub makespan_s: f64,
    pub stage_load: Vec<StageLoadSample>,
    pub instances: Vec<InstanceStats>,
}

impl SimReport {
    /// The share of all requests that finished with TTFT at most `ttft_base_s +
    /// ttft_per_prompt_token_s * prompt_len` and TPOT at most `tpot_s` (`goodput`).
    pub fn goodput(&self, ttft_base_s: f64, ttft_per_prompt_token_s: f64, tpot_s: f64) -> f64 {
        goodput(&self.requests, ttft_base_s, ttft_per_prompt_token_s, tpot_s)
    }
}

/// The share of `records` that finished with TTFT at most `ttft_base_s +
/// ttft_per_prompt_token_s * prompt_len` and TPOT at most `tpot_s` (single-token outputs have no
/// TPOT and meet it): the goodput of DistServe-style evaluations, as `cascadeinfer.goodput`
/// defines it for Python. Here so the layout selection can weigh every simulation's goodput
/// without a per-request list crossing into Python. NaN for no records.
pub fn goodput(records: &[RequestRecord], ttft_base_s: f64, ttft_per_prompt_token_s: f64, tpot_s: f64) -> f64 {
    if records.is_empty() {
        return f64::NAN;
    }
    let met = records
        .iter()
        .filter(|r| {
            let (Some(_), Some(ttft)) = (r.finished_s, r.ttft_s()) else { return false };
            ttft <= ttft_base_s + ttft_per_prompt_token_s * f64::from(r.prompt_len)
                && r.tpot_s().is_none_or(|t| t <= tpot_s)
        })
        .count();
    met as f64 / records.len() as f64
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

/// Nearest-rank percentile `q` in (0, 1]; reorders `values`.
fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1;
    *values.select_nth_unstable_by(rank, f64::total_cmp).1
}

/// The latency part of the summary from the records (throughput and counts are the caller's).
pub(super) fn summarize(records: &[RequestRecord], migrations: u64, throughput_tok_s: f64) -> SimSummary {
    let collect = |f: fn(&RequestRecord) -> Option<f64>| -> Vec<f64> {
        records.iter().filter(|r| r.finished_s.is_some()).filter_map(f).collect()
    };
    let (mut e2e, mut ttft, mut tpot) =
        (collect(RequestRecord::e2e_s), collect(RequestRecord::ttft_s), collect(RequestRecord::tpot_s));
    let admitted = || records.iter().filter(|r| r.admitted_s.is_some());
    let num_prompt_tokens: u64 = admitted().map(|r| u64::from(r.prompt_len)).sum();
    let num_cached: u64 = admitted().map(|r| u64::from(r.num_cached_prompt_tokens)).sum();
    SimSummary {
        mean_e2e_s: mean(&e2e),
        p99_e2e_s: percentile(&mut e2e, 0.99),
        mean_ttft_s: mean(&ttft),
        p99_ttft_s: percentile(&mut ttft, 0.99),
        mean_tpot_s: mean(&tpot),
        p99_tpot_s: percentile(&mut tpot, 0.99),
        throughput_tok_s,
        completed: e2e.len() as u64,
        migrations,
        prefix_cache_hit_rate: if num_prompt_tokens > 0 { num_cached as f64 / num_prompt_tokens as f64 } else { 0.0 },
        sim_wall_s: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentile() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert_eq!(percentile(&mut v, 0.5), 50.0);
        assert_eq!(percentile(&mut [3.0], 0.99), 3.0);
        assert!(percentile(&mut [], 0.99).is_nan());
    }

    #[test]
    fn tpot_excludes_the_first_token() {
        let r = RequestRecord {
            request: RequestId(0),
            prompt_len: 10,
            output_len: 5,
            arrival_s: 1.0,
            admitted_s: Some(1.0),
            first_token_s: Some(1.5),
            finished_s: Some(2.5),
            num_migrations: 0,
            num_preemptions: 0,
            num_cached_prompt_tokens: 0,
        };
        assert_eq!((r.ttft_s(), r.e2e_s(), r.tpot_s()), (Some(0.5), Some(1.5), Some(0.25)));
        assert_eq!(RequestRecord { output_len: 1, ..r }.tpot_s(), None);
    }

    #[test]
    fn goodput_counts_finished_requests_meeting_both_targets_over_all() {
        let r = RequestRecord {
            request: RequestId(0),
            prompt_len: 1000,
            output_len: 11,
            arrival_s: 0.0,
            admitted_s: Some(0.0),
            first_token_s: Some(1.0), // within 1 s + 0.2 ms x 1000 tokens
            finished_s: Some(2.0),    // TPOT 0.1 s, the target
            num_migrations: 0,
            num_preemptions: 0,
            num_cached_prompt_tokens: 0,
        };
        let records = [
            r,
            RequestRecord { first_token_s: Some(1.25), finished_s: Some(2.25), ..r }, // TTFT late
            RequestRecord { finished_s: Some(2.5), ..r },                             // TPOT over
            RequestRecord { finished_s: None, ..r },                                  // unfinished
            RequestRecord { output_len: 1, finished_s: Some(1.0), ..r },              // no TPOT
        ];
        assert_eq!(goodput(&records, 1.0, 2e-4, 0.1), 2.0 / 5.0);
        assert!(goodput(&[], 1.0, 2e-4, 0.1).is_nan());
    }
}
