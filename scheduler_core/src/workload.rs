//! Workload summary: what the partitioner needs to know about traffic, per length bucket.
//!
//! All rates are per second of traffic. A request with prompt `p` and `o` output tokens decodes
//! at context lengths `p, p+1, ..., p+o-1`; each of those token-steps lands in the bucket holding
//! its context length, and the request crosses every edge `e` with `p < e <= p+o-1` (it must be
//! migrated there when that edge is a stage boundary).

use serde::{Deserialize, Serialize};

use crate::cost::{prefill_pairs, CostProfile};
use crate::error::{CoreError, Result};
use crate::grid::BucketGrid;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSample {
    pub prompt_len: u32,
    pub output_len: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSummary {
    pub grid: BucketGrid,
    /// Requests per second.
    pub arrival_rate: f64,
    /// Decode token-steps per second whose context length is in the bucket.
    pub decode_tokens: Vec<f64>,
    /// Sum of the context lengths of those token-steps, per second (KV read per second).
    pub decode_context: Vec<f64>,
    /// Requests per second whose prompt length is in the bucket (they enter there).
    pub arrivals: Vec<f64>,
    /// Prompt tokens per second of those arrivals.
    pub prefill_tokens: Vec<f64>,
    /// Prefill attention pairs per second of those arrivals.
    pub prefill_pairs: Vec<f64>,
    /// `crossings[k]`: requests per second crossing edge `k` (index 0 and the last are 0).
    pub crossings: Vec<f64>,
    pub mean_prompt_len: f64,
    pub mean_output_len: f64,
}

impl WorkloadSummary {
    /// Summarizes `samples` as traffic arriving at `arrival_rate` requests per second.
    pub fn from_samples(grid: &BucketGrid, samples: &[RequestSample], arrival_rate: f64) -> Result<Self> {
        if samples.is_empty() {
            return Err(CoreError::invalid("samples", 0, "need at least one request"));
        }
        if !arrival_rate.is_finite() || arrival_rate <= 0.0 {
            return Err(CoreError::invalid("arrival_rate", arrival_rate, "must be finite and > 0"));
        }
        let nb = grid.num_buckets();
        let edges = grid.edges();
        let weight = arrival_rate / samples.len() as f64;
        let mut s = WorkloadSummary {
            grid: grid.clone(),
            arrival_rate,
            decode_tokens: vec![0.0; nb],
            decode_context: vec![0.0; nb],
            arrivals: vec![0.0; nb],
            prefill_tokens: vec![0.0; nb],
            prefill_pairs: vec![0.0; nb],
            crossings: vec![0.0; nb + 1],
            mean_prompt_len: 0.0,
            mean_output_len: 0.0,
        };
        for (i, r) in samples.iter().enumerate() {
            validate_sample(i, r, grid.max_len())?;
            let (p, o) = (u64::from(r.prompt_len), u64::from(r.output_len));
            let first = grid.bucket_of(r.prompt_len)?;
            s.arrivals[first] += weight;
            s.prefill_tokens[first] += weight * p as f64;
            s.prefill_pairs[first] += weight * prefill_pairs(0, p) as f64;
            let last_len = p + o - 1;
            for k in first..nb {
                let lo = u64::from(edges[k]).max(p);
                let hi = u64::from(edges[k + 1]).min(last_len + 1);
                if lo >= hi {
                    break;
                }
                let count = (hi - lo) as f64;
                // Sum of the integers lo..hi-1.
                let sum = (lo + hi - 1) as f64 * count / 2.0;
                s.decode_tokens[k] += weight * count;
                s.decode_context[k] += weight * sum;
                if k > first {
                    s.crossings[k] += weight;
                }
            }
            s.mean_prompt_len += p as f64;
            s.mean_output_len += o as f64;
        }
        s.mean_prompt_len /= samples.len() as f64;
        s.mean_output_len /= samples.len() as f64;
        Ok(s)
    }

    /// Seconds of engine work per second this traffic asks of a fleet (ignoring batching
    /// heterogeneity and overheads): decode per token plus prefill. Dividing a fleet's size by
    /// this per unit rate gives the rate at which the fleet would be fully busy.
    pub fn work_per_second(&self, profile: &CostProfile) -> f64 {
        let decode: f64 = self
            .decode_tokens
            .iter()
            .zip(&self.decode_context)
            .map(|(t, c)| profile.per_sequence_s * t + profile.per_context_token_s * c)
            .sum();
        let prefill: f64 = self
            .prefill_tokens
            .iter()
            .zip(&self.prefill_pairs)
            .map(|(t, p)| profile.per_prefill_token_s * t + profile.prefill_attention_s * p)
            .sum();
        decode + prefill
    }

    pub fn total_decode_tokens(&self) -> f64 {
        self.decode_tokens.iter().sum()
    }
}

fn validate_sample(index: usize, r: &RequestSample, max_len: u32) -> Result<()> {
    if r.output_len == 0 {
        return Err(CoreError::invalid("output_len", format!("0 (request {index})"), "must be >= 1"));
    }
    if r.prompt_len == 0 {
        return Err(CoreError::invalid("prompt_len", format!("0 (request {index})"), "must be >= 1"));
    }
    let total = u64::from(r.prompt_len) + u64::from(r.output_len);
    if total > u64::from(max_len) {
        return Err(CoreError::invalid(
            "prompt_len + output_len",
            format!("{total} (request {index})"),
            format!("exceeds max_len {max_len}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_steps_and_crossings_are_exact() {
        let grid = BucketGrid::new(vec![0, 10, 20, 100]).unwrap();
        // Decodes at lengths 5..=24: 5 in bucket 0, 10 in bucket 1, 5 in bucket 2.
        let s = WorkloadSummary::from_samples(&grid, &[RequestSample { prompt_len: 5, output_len: 20 }], 2.0).unwrap();
        assert_eq!(s.decode_tokens, vec![10.0, 20.0, 10.0]);
        assert_eq!(s.decode_context[0], 2.0 * (5 + 6 + 7 + 8 + 9) as f64);
        assert_eq!(s.crossings, vec![0.0, 2.0, 2.0, 0.0]);
        assert_eq!(s.arrivals, vec![2.0, 0.0, 0.0]);
        assert_eq!(s.total_decode_tokens(), 2.0 * 20.0);
    }

    #[test]
    fn a_request_ending_exactly_at_an_edge_does_not_cross_it() {
        let grid = BucketGrid::new(vec![0, 10, 100]).unwrap();
        // Lengths 5..=9 only.
        let s = WorkloadSummary::from_samples(&grid, &[RequestSample { prompt_len: 5, output_len: 5 }], 1.0).unwrap();
        assert_eq!(s.crossings, vec![0.0, 0.0, 0.0]);
        assert_eq!(s.decode_tokens, vec![5.0, 0.0]);
    }

    #[test]
    fn bad_samples_name_the_field() {
        let grid = BucketGrid::new(vec![0, 10, 100]).unwrap();
        let too_long = [RequestSample { prompt_len: 90, output_len: 20 }];
        let err = WorkloadSummary::from_samples(&grid, &too_long, 1.0).unwrap_err().to_string();
        assert!(err.contains("max_len"), "{err}");
        let zero = [RequestSample { prompt_len: 1, output_len: 0 }];
        assert!(WorkloadSummary::from_samples(&grid, &zero, 1.0).unwrap_err().to_string().contains("output_len"));
        let ok = [RequestSample { prompt_len: 1, output_len: 1 }];
        assert!(WorkloadSummary::from_samples(&grid, &ok, f64::NAN).is_err());
    }
}
