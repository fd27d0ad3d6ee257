//! Within-stage balancing: when the predicted step times of a stage's instances drift apart,
//! move one request at a time from the slowest to the fastest, with hysteresis and a cooldown
//! so balancing never chases noise.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::ids::InstanceId;
use crate::load::KV_WATERMARK;
use crate::policy::{Migration, MigrationReason, StepEntry};
use crate::router::Router;

#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BalanceConfig {
    /// Start balancing a stage when (slowest - fastest) / slowest exceeds this.
    pub start_imbalance: f64,
    /// Stop once it falls below this (must be below `start_imbalance`).
    pub stop_imbalance: f64,
    /// An instance takes part in at most one balancing move per this many seconds.
    pub cooldown_s: f64,
    /// Also move a request from the stage's fullest to its emptiest KV cache while their KV
    /// usage fractions differ by more than this (Llumnix's trigger); 1 turns it off.
    #[serde(default = "default_kv_gap")]
    pub kv_gap: f64,
}

fn default_kv_gap() -> f64 {
    0.1
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig { start_imbalance: 0.3, stop_imbalance: 0.1, cooldown_s: 1.0, kv_gap: default_kv_gap() }
    }
}

impl BalanceConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.stop_imbalance >= 0.0 && self.stop_imbalance < self.start_imbalance && self.start_imbalance < 1.0) {
            return Err(CoreError::invalid(
                "balance.start_imbalance/stop_imbalance",
                format!("{}/{}", self.start_imbalance, self.stop_imbalance),
                "need 0 <= stop_imbalance < start_imbalance < 1",
            ));
        }
        if !(self.kv_gap > 0.0 && self.kv_gap <= 1.0) {
            return Err(CoreError::invalid("balance.kv_gap", self.kv_gap, "must be in (0, 1]"));
        }
        if !(self.cooldown_s.is_finite() && self.cooldown_s >= 0.0) {
            return Err(CoreError::invalid("balance.cooldown_s", self.cooldown_s, "must be finite and >= 0"));
        }
        Ok(())
    }
}

/// A balancing move must cut the slower instance's predicted step by this share: it costs the
/// moved request a stall and both caches its KV for the copy.
const MIN_MOVE_GAIN: f64 = 0.02;

#[derive(Clone, Debug)]
pub struct Balancer {
    config: BalanceConfig,
    /// Per stage: inside a balancing episode (between start and stop thresholds).
    active: Vec<bool>,
    last_move: Vec<f64>,
}

impl Balancer {
    pub fn new(config: BalanceConfig) -> Result<Self> {
        config.validate()?;
        Ok(Balancer { config, active: Vec::new(), last_move: Vec::new() })
    }

    fn cooled(&self, inst: InstanceId, now: f64) -> bool {
        self.last_move.get(inst.index()).is_none_or(|&t| now - t >= self.config.cooldown_s)
    }

    fn mark(&mut self, inst: InstanceId, now: f64) {
        if self.last_move.len() <= inst.index() {
            self.last_move.resize(inst.index() + 1, f64::NEG_INFINITY);
        }
        self.last_move[inst.index()] = now;
    }

    /// At most one move per stage per call.
    pub fn decide(&mut self, router: &mut Router, now: f64) -> Vec<Migration> {
        let num_stages = router.layout.stages().len();
        self.active.resize(num_stages, false);
        let mut out = Vec::new();
        for stage in 0..num_stages {
            let instances = router.layout.stages()[stage].instances.clone();
            if instances.len() < 2 {
                continue;
            }
            let step = |i: &InstanceId| router.loads.predicted_step(&router.profile, *i);
            let slow = *instances.iter().max_by(|a, b| step(a).total_cmp(&step(b))).unwrap();
            let fast = *instances.iter().min_by(|a, b| step(a).total_cmp(&step(b))).unwrap();
            let imbalance = (step(&slow) - step(&fast)) / step(&slow);
            let threshold = if self.active[stage] { self.config.stop_imbalance } else { self.config.start_imbalance };
            self.active[stage] = imbalance > threshold;
            if self.active[stage] && self.cooled(slow, now) && self.cooled(fast, now) {
                if let Some(m) = self.pick(router, slow, fast) {
                    self.mark(slow, now);
                    self.mark(fast, now);
                    out.push(m);
                    continue;
                }
            }
            out.extend(self.even_kv(router, &instances));
        }
        out
    }

    /// When the stage's fullest KV cache is past the admission watermark and differs from the
    /// emptiest by more than `kv_gap` of the capacity, the shortest request on the fullest moves
    /// to the emptiest (least KV to copy). Step times do not show a cache filling up until it
    /// preempts, and a preempted request recomputes its whole context; below the watermark a
    /// move only costs its stall.
    fn even_kv(&self, router: &mut Router, instances: &[InstanceId]) -> Option<Migration> {
        let usage = |i: &InstanceId| router.kv_usage(*i);
        let full = *instances.iter().max_by(|a, b| usage(a).total_cmp(&usage(b)))?;
        let empty = *instances.iter().min_by(|a, b| usage(a).total_cmp(&usage(b)))?;
        if usage(&full) <= KV_WATERMARK || usage(&full) - usage(&empty) <= self.config.kv_gap {
            return None;
        }
        router.move_shortest(full, empty, MigrationReason::Balance)
    }

    /// The request on `slow` whose move leaves the slower of the two instances fastest, when
    /// that beats `slow`'s step now by `MIN_MOVE_GAIN`. Both sides are priced by the cost model,
    /// padding included: evening context totals alone moved long requests onto instances of
    /// short ones, whose every step the padding then stretched (one-stage balancing cost 25%
    /// of mean latency on agentic traffic that way).
    fn pick(&self, router: &mut Router, slow: InstanceId, fast: InstanceId) -> Option<Migration> {
        let (loads, profile) = (&router.loads, &router.profile);
        let now = loads.predicted_step(profile, slow);
        let (after, request, len) = loads
            .get(slow)
            .running
            .iter()
            .filter(|(r, len)| !router.in_flight.contains(r) && loads.has_room(profile, fast, *len))
            .map(|&(r, len)| {
                let slower = loads
                    .predicted_step_moving(profile, slow, len, false)
                    .max(loads.predicted_step_moving(profile, fast, len, true));
                (slower, r, len)
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))?;
        if after > now * (1.0 - MIN_MOVE_GAIN) {
            return None;
        }
        let entry = StepEntry { request, instance: slow, context_len: len };
        Some(router.start_migration(entry, fast, MigrationReason::Balance))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::tests::gpu;
    use crate::ids::RequestId;
    use crate::layout::StageLayout;

    fn entry(r: u64, i: u32, len: u32) -> StepEntry {
        StepEntry { request: RequestId(r), instance: InstanceId(i), context_len: len }
    }

    #[test]
    fn moves_from_slow_to_fast_with_hysteresis_and_cooldown() {
        let layout = StageLayout::single(131_072, &[InstanceId(0), InstanceId(1)]).unwrap();
        let mut router = Router::new(gpu(), layout).unwrap();
        // 300K of 409.6K KV tokens: below the KV watermark, so only the step-time rule acts.
        let mut entries: Vec<StepEntry> = (0..15).map(|r| entry(r, 0, 20_000)).collect();
        entries.push(entry(100, 1, 100));
        router.check_step(&entries).unwrap();
        let mut b = Balancer::new(BalanceConfig::default()).unwrap();
        let moves = b.decide(&mut router, 0.0);
        assert_eq!(moves.len(), 1);
        assert_eq!((moves[0].from, moves[0].to), (InstanceId(0), InstanceId(1)));
        // Cooldown: nothing new within a second even though still imbalanced.
        assert!(b.decide(&mut router, 0.5).is_empty());
        assert_eq!(b.decide(&mut router, 1.5).len(), 1);
    }

    #[test]
    fn a_cache_past_the_watermark_sheds_its_shortest_request_to_the_emptiest() {
        let layout = StageLayout::single(131_072, &[InstanceId(0), InstanceId(1), InstanceId(2)]).unwrap();
        let mut router = Router::new(gpu(), layout).unwrap();
        // Equal step times would not trigger the step-time rule; instance 0's cache is at 88%.
        let mut entries: Vec<StepEntry> = (0..9).map(|r| entry(r, 0, 40_000)).collect();
        entries.push(entry(50, 0, 1000));
        entries.extend((0..9).map(|r| entry(100 + r, 1, 20_000)));
        entries.extend((0..9).map(|r| entry(200 + r, 2, 1000)));
        router.check_step(&entries).unwrap();
        let config = BalanceConfig { start_imbalance: 0.99, stop_imbalance: 0.98, ..BalanceConfig::default() };
        let moves = Balancer::new(config).unwrap().decide(&mut router, 0.0);
        assert_eq!(moves.len(), 1);
        assert_eq!((moves[0].from, moves[0].to, moves[0].request), (InstanceId(0), InstanceId(2), RequestId(50)));
        // Below the watermark a KV gap alone moves nothing (a move only costs its stall).
        let layout = StageLayout::single(131_072, &[InstanceId(0), InstanceId(1)]).unwrap();
        let mut router = Router::new(gpu(), layout).unwrap();
        let mut entries: Vec<StepEntry> = (0..7).map(|r| entry(r, 0, 40_000)).collect();
        entries.push(entry(100, 1, 100));
        router.check_step(&entries).unwrap();
        assert!(Balancer::new(config).unwrap().decide(&mut router, 0.0).is_empty());
    }

    #[test]
    fn a_balanced_stage_is_left_alone() {
        let layout = StageLayout::single(131_072, &[InstanceId(0), InstanceId(1)]).unwrap();
        let mut router = Router::new(gpu(), layout).unwrap();
        let entries: Vec<StepEntry> = (0..40).map(|r| entry(r, (r % 2) as u32, 5000 + r as u32)).collect();
        router.check_step(&entries).unwrap();
        let mut b = Balancer::new(BalanceConfig::default()).unwrap();
        for t in 0..10 {
            assert!(b.decide(&mut router, f64::from(t) * 2.0).is_empty());
        }
    }

    #[test]
    fn bad_thresholds_are_rejected() {
        let bad = BalanceConfig { start_imbalance: 0.1, stop_imbalance: 0.2, ..BalanceConfig::default() };
        assert!(Balancer::new(bad).unwrap_err().to_string().contains("start_imbalance"));
    }
}
