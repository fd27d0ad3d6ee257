//! Cost model: the predicted wall time of one engine step as a function of its batch.
//!
//! ```text
//! step(batch) = step_overhead_s
//!             + per_sequence_s      * n                      (per decode request: MLP, sampling)
//!             + per_context_token_s * max(S + h * (n*Lmax - S),   (decode attention, S = sum of
//!                                         min(n, f) * Lmax)        contexts, Lmax = longest)
//!             + per_prefill_token_s * P                       (prefill tokens: linear layers)
//!             + prefill_attention_s * Q                       (prefill attention pairs)
//! ```
//! `h` (`heterogeneity`) is the share of the idle attention slots `n*Lmax - S` that costs real
//! time. `f` (`longest_request_floor`) is the critical path: a decode kernel that gives each
//! request one thread block per KV head (no split of the KV axis, which is what FlashAttention's
//! heuristic picks once the batch fills the GPU) runs the longest request on a few
//! multiprocessors, so the step's attention lasts at least `f` times that request's fair share.
//! `min(n, f)` keeps the floor under the fully padded cost `n * Lmax`; below
//! `longest_request_floor_from` requests the kernel splits the KV axis and there is no floor.
//! Both were measured on an H200, which has the H100's 132 multiprocessors
//! (docs/design/cost-model.md); `h = f = 0` means the step follows total context (what vLLM on
//! CPU shows).

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// Parameters of one engine instance's cost; loaded from a JSON profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostProfile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Fixed time of every step (kernel launches, scheduling, sampling), seconds.
    pub step_overhead_s: f64,
    /// Per decode request in the batch, seconds.
    pub per_sequence_s: f64,
    /// Decode attention: per KV token read, seconds.
    pub per_context_token_s: f64,
    /// Share in [0, 1] of the padding slots `n*Lmax - S` that cost time.
    pub heterogeneity: f64,
    /// Decode attention lasts at least `min(n, floor) * Lmax` context tokens' worth: the
    /// longest request runs on a `1/floor` share of the GPU. 0 (the default) turns it off.
    #[serde(default)]
    pub longest_request_floor: f64,
    /// Batches of fewer decode requests than this have no floor: FlashAttention splits the KV
    /// axis while `n * kv_heads` thread blocks leave the GPU under 80% full. 0 (the default):
    /// the floor holds at every batch size.
    #[serde(default)]
    pub longest_request_floor_from: u32,
    /// Per prefill token (linear layers), seconds.
    pub per_prefill_token_s: f64,
    /// Per (query token, context token) pair of prefill attention, seconds.
    pub prefill_attention_s: f64,
    /// KV cache capacity of one instance, tokens.
    pub kv_capacity_tokens: u64,
    /// KV block size, tokens.
    pub kv_block_size: u32,
    /// KV cache bytes per token (all layers, K and V).
    pub kv_bytes_per_token: u64,
    /// Most requests one step may hold.
    pub max_num_seqs: u32,
    /// Token budget of one step (chunked prefill).
    pub max_batch_tokens: u32,
    /// Longest context the model accepts.
    pub max_model_len: u32,
    /// Stall a request sees during a live migration besides the byte transfer, seconds.
    pub migration_pause_s: f64,
    /// KV transfer bandwidth between instances, bytes per second.
    pub migration_bandwidth_bytes_per_s: f64,
    /// The partitioner keeps each instance's busy fraction at or below this.
    #[serde(default = "default_max_utilization")]
    pub max_utilization: f64,
}

fn default_max_utilization() -> f64 {
    0.95
}

/// What the cost model needs to know about a batch.
#[derive(Copy, Clone, Debug, Default, PartialEq)]
pub struct BatchShape {
    pub num_decode: u32,
    pub sum_context: u64,
    pub max_context: u32,
    pub prefill_tokens: u32,
    /// Sum over prefill tokens of the context each attends to (see [`prefill_pairs`]).
    pub prefill_pairs: u64,
}

impl BatchShape {
    /// This batch with one more decode request of `len` tokens of context.
    pub fn with_decode(mut self, len: u32) -> BatchShape {
        self.num_decode += 1;
        self.sum_context += u64::from(len);
        self.max_context = self.max_context.max(len);
        self
    }
}

/// Attention pairs of a prefill chunk of `tokens` tokens placed after `start` cached tokens.
pub fn prefill_pairs(start: u64, tokens: u64) -> u64 {
    tokens * start + tokens * (tokens + 1) / 2
}

impl CostProfile {
    pub fn from_json(text: &str) -> Result<Self> {
        let profile: CostProfile =
            serde_json::from_str(text).map_err(|e| CoreError::invalid("profile", "<json>", e.to_string()))?;
        profile.validate()?;
        Ok(profile)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("profile serializes")
    }

    /// Every parameter finite and in its domain; the error names the first one that is not.
    pub fn validate(&self) -> Result<()> {
        let non_negative = [
            ("step_overhead_s", self.step_overhead_s),
            ("per_sequence_s", self.per_sequence_s),
            ("per_context_token_s", self.per_context_token_s),
            ("per_prefill_token_s", self.per_prefill_token_s),
            ("prefill_attention_s", self.prefill_attention_s),
            ("migration_pause_s", self.migration_pause_s),
            ("longest_request_floor", self.longest_request_floor),
        ];
        for (field, value) in non_negative {
            if !value.is_finite() || value < 0.0 {
                return Err(CoreError::invalid(field, value, "must be finite and >= 0"));
            }
        }
        if self.step_overhead_s <= 0.0 {
            return Err(CoreError::invalid(
                "step_overhead_s",
                self.step_overhead_s,
                "must be > 0 (a step never takes no time)",
            ));
        }
        if !(0.0..=1.0).contains(&self.heterogeneity) {
            return Err(CoreError::invalid("heterogeneity", self.heterogeneity, "must be in [0, 1]"));
        }
        let bandwidth = self.migration_bandwidth_bytes_per_s;
        if !bandwidth.is_finite() || bandwidth <= 0.0 {
            return Err(CoreError::invalid("migration_bandwidth_bytes_per_s", bandwidth, "must be > 0"));
        }
        if !(self.max_utilization > 0.0 && self.max_utilization < 1.0) {
            return Err(CoreError::invalid("max_utilization", self.max_utilization, "must be in (0, 1)"));
        }
        let positive = [
            ("kv_capacity_tokens", self.kv_capacity_tokens),
            ("kv_block_size", u64::from(self.kv_block_size)),
            ("kv_bytes_per_token", self.kv_bytes_per_token),
            ("max_num_seqs", u64::from(self.max_num_seqs)),
            ("max_batch_tokens", u64::from(self.max_batch_tokens)),
            ("max_model_len", u64::from(self.max_model_len)),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(CoreError::invalid(field, value, "must be > 0"));
            }
        }
        Ok(())
    }

    /// Predicted wall time of one step over `batch`, seconds.
    pub fn step_time(&self, batch: &BatchShape) -> f64 {
        let n = f64::from(batch.num_decode);
        let sum = batch.sum_context as f64;
        let longest = f64::from(batch.max_context);
        let padding = (n * longest - sum).max(0.0);
        let critical_path = self.critical_path(batch.num_decode, longest);
        self.step_overhead_s
            + self.per_sequence_s * n
            + self.per_context_token_s * (sum + self.heterogeneity * padding).max(critical_path)
            + self.per_prefill_token_s * f64::from(batch.prefill_tokens)
            + self.prefill_attention_s * batch.prefill_pairs as f64
    }

    /// The longest request's attention floor in context tokens, `min(n, f) * longest`, for a
    /// batch of `num_decode` requests (0 below `longest_request_floor_from`).
    pub fn critical_path(&self, num_decode: u32, longest: f64) -> f64 {
        if num_decode < self.longest_request_floor_from {
            return 0.0;
        }
        f64::from(num_decode).min(self.longest_request_floor) * longest
    }

    /// Compute time of a whole prefill of `prompt_len` tokens (no overhead), seconds.
    pub fn prefill_work(&self, prompt_len: u64) -> f64 {
        self.per_prefill_token_s * prompt_len as f64 + self.prefill_attention_s * prefill_pairs(0, prompt_len) as f64
    }

    /// Stall of a request migrated at context length `len`: fixed pause plus the KV bytes over
    /// the link (a stop-and-copy upper bound; multi-stage copy hides part of the bytes).
    pub fn migration_stall(&self, len: u64) -> f64 {
        self.migration_pause_s + (len * self.kv_bytes_per_token) as f64 / self.migration_bandwidth_bytes_per_s
    }
}

/// Profiles shipped with the package, by name (the JSON lives in `profiles/`).
pub fn builtin_profile(name: &str) -> Option<&'static str> {
    match name {
        "gpu-h100-llama3-8b" => Some(include_str!("../../python/cascadeinfer/profiles/gpu-h100-llama3-8b.json")),
        "cpu-vllm-tiny-llama" => Some(include_str!("../../python/cascadeinfer/profiles/cpu-vllm-tiny-llama.json")),
        _ => None,
    }
}

pub const BUILTIN_PROFILES: [&str; 2] = ["gpu-h100-llama3-8b", "cpu-vllm-tiny-llama"];

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn gpu() -> CostProfile {
        CostProfile::from_json(builtin_profile("gpu-h100-llama3-8b").unwrap()).unwrap()
    }

    #[test]
    fn builtin_profiles_parse_and_validate() {
        for name in BUILTIN_PROFILES {
            CostProfile::from_json(builtin_profile(name).unwrap()).unwrap();
        }
    }

    #[test]
    fn one_long_request_stretches_the_step_when_h_or_the_floor_is_positive() {
        let p = gpu();
        let homogeneous =
            BatchShape { num_decode: 16, sum_context: 16 * 1024, max_context: 1024, ..Default::default() };
        let skewed = BatchShape { num_decode: 16, sum_context: 16 * 1024, max_context: 12_000, ..Default::default() };
        assert!(p.step_time(&skewed) > p.step_time(&homogeneous));
        let flat = CostProfile { heterogeneity: 0.0, longest_request_floor: 0.0, ..p };
        assert_eq!(flat.step_time(&skewed), flat.step_time(&homogeneous));
    }

    #[test]
    fn the_longest_request_floor_bounds_attention_from_below_and_padding_from_above() {
        let p = CostProfile { heterogeneity: 0.0, longest_request_floor: 20.0, longest_request_floor_from: 0, ..gpu() };
        let attention = |q: &CostProfile, b: &BatchShape| {
            q.step_time(b) - q.step_time(&BatchShape { sum_context: 0, max_context: 0, ..*b })
        };
        // 100 requests, one of 32K among short ones: the floor (20 x 32K) exceeds S.
        let skewed =
            BatchShape { num_decode: 100, sum_context: 99 * 256 + 32_768, max_context: 32_768, ..Default::default() };
        let expect = p.per_context_token_s * 20.0 * 32_768.0;
        assert!((attention(&p, &skewed) - expect).abs() < 1e-12 * expect.max(1.0));
        // Uniform batches are untouched: S = n * Lmax >= min(n, f) * Lmax.
        let uniform = BatchShape { num_decode: 100, sum_context: 100 * 4096, max_context: 4096, ..Default::default() };
        let plain = CostProfile { longest_request_floor: 0.0, ..p.clone() };
        assert_eq!(p.step_time(&uniform), plain.step_time(&uniform));
        // Few requests: never more than the fully padded batch (h = 1).
        let few =
            BatchShape { num_decode: 4, sum_context: 3 * 256 + 32_768, max_context: 32_768, ..Default::default() };
        let padded = CostProfile { heterogeneity: 1.0, longest_request_floor: 0.0, ..p.clone() };
        assert!(attention(&p, &few) <= attention(&padded, &few) + 1e-15);
        assert!(attention(&p, &few) > attention(&plain, &few));
        // Below `longest_request_floor_from` the kernel splits: no floor.
        let splitting = CostProfile { longest_request_floor_from: 14, ..p.clone() };
        assert_eq!(attention(&splitting, &few), attention(&plain, &few));
        assert_eq!(attention(&splitting, &skewed), attention(&p, &skewed));
    }

    #[test]
    fn validation_names_the_field() {
        let bad = CostProfile { per_context_token_s: f64::NAN, ..gpu() };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("per_context_token_s"), "{err}");
        let bad = CostProfile { heterogeneity: 1.5, ..gpu() };
        assert!(bad.validate().unwrap_err().to_string().contains("heterogeneity"));
        let bad = CostProfile { longest_request_floor: -1.0, ..gpu() };
        assert!(bad.validate().unwrap_err().to_string().contains("longest_request_floor"));
        let bad = CostProfile { kv_capacity_tokens: 0, ..gpu() };
        assert!(bad.validate().unwrap_err().to_string().contains("kv_capacity_tokens"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let mut v: serde_json::Value = serde_json::from_str(&gpu().to_json()).unwrap();
        v["typo_field"] = 1.into();
        let err = CostProfile::from_json(&v.to_string()).unwrap_err().to_string();
        assert!(err.contains("typo_field"), "{err}");
    }
}
