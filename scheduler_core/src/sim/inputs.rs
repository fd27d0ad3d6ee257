//! Checks of a run's inputs, each error naming the field and the value that is wrong.

use super::engine::EngineParams;
use crate::arrivals::TraceRequest;
use crate::error::{CoreError, Result};
use crate::ids::InstanceId;
use crate::policy::Policy;

/// Latest arrival a run simulates (about 31,700 years): the simulated clock must still move by
/// a tick there (past 2^53 half-seconds `now + tick` is `now`, and ticks never end).
const MAX_ARRIVAL_S: f64 = 1e12;

/// Every request must be servable: lengths within the model, the policy and one instance's KV.
pub(super) fn validate_trace(trace: &[TraceRequest], p: &EngineParams, policy_max_len: u32) -> Result<()> {
    if trace.is_empty() {
        return Err(CoreError::invalid("trace", "[]", "need at least one request"));
    }
    if trace.len() >= u32::MAX as usize {
        return Err(CoreError::invalid("trace", trace.len(), "too many requests (ids are 32-bit)"));
    }
    let kv_tokens = p.total_blocks * u64::from(p.block_size);
    for (i, r) in trace.iter().enumerate() {
        let total = u64::from(r.prompt_len) + u64::from(r.output_len);
        let problem = if !(r.arrival_s.is_finite() && r.arrival_s >= 0.0) {
            Some(("arrival_s", r.arrival_s.to_string(), "must be finite and >= 0".to_string()))
        } else if r.arrival_s > MAX_ARRIVAL_S {
            Some(("arrival_s", format!("{:e}", r.arrival_s), format!("must be at most {MAX_ARRIVAL_S:e} s")))
        } else if r.prompt_len == 0 || r.output_len == 0 {
            Some(("prompt_len/output_len", format!("{}/{}", r.prompt_len, r.output_len), "must be >= 1".to_string()))
        } else if total > u64::from(p.max_model_len.min(policy_max_len)) {
            let limit = p.max_model_len.min(policy_max_len);
            Some(("prompt_len + output_len", total.to_string(), format!("exceeds max_len {limit}")))
        } else if total - 1 > kv_tokens {
            Some(("prompt_len + output_len", total.to_string(), format!("exceeds one instance's KV ({kv_tokens})")))
        } else {
            None
        };
        if let Some((field, value, reason)) = problem {
            return Err(CoreError::invalid(field, format!("{value} (request {i})"), reason));
        }
    }
    Ok(())
}

/// Dense slots for `instances`, which must be exactly the policy's instances.
pub(super) fn slots(instances: &[InstanceId], policy: &dyn Policy) -> Result<Vec<u32>> {
    let mut ours: Vec<InstanceId> = instances.to_vec();
    ours.sort();
    let mut theirs: Vec<InstanceId> = policy.layout().instances().collect();
    theirs.sort();
    if ours != theirs {
        let ids = |v: &[InstanceId]| v.iter().map(|i| i.0.to_string()).collect::<Vec<_>>().join(",");
        return Err(CoreError::invalid(
            "instances",
            format!("[{}]", ids(&ours)),
            format!("must be exactly the policy's instances [{}]", ids(&theirs)),
        ));
    }
    let max = instances.iter().map(|i| i.index()).max().unwrap_or(0);
    let mut slot_of = vec![u32::MAX; max + 1];
    for (k, id) in instances.iter().enumerate() {
        slot_of[id.index()] = k as u32;
    }
    Ok(slot_of)
}
