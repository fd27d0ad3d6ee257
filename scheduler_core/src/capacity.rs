//! The capacity guard: moves whole instances between stages when a stage's decode steps run
//! slower than the same fleet pooled into one stage would run them.
//!
//! Why: a stage's size is fixed by the plan, but bursty traffic loads the stages unevenly for
//! minutes at a time (a run of long generations fills the late stages, a run of chat the early
//! ones), and the late stages hold the longest generations, which decode most of their tokens
//! there: their end-to-end latency (the p99) follows the late stages' step time. Least-load
//! spreads everything evenly, so its requests decode at the fleet's pooled step time. A split
//! only pays on the tail while no stage steps much slower than that; when one does for longer
//! than a passing burst, an instance moves to it from the stage that can best spare one.
//! Within-stage balancing moves requests; this moves capacity between stages.
//!
//! A stage's load includes the new requests waiting for admission because it and every later
//! stage lacked KV room: the book shows only what runs, so a last stage full of long decodes,
//! with long prompts queued for it, looked no hotter than its running batch, and those prompts
//! waited for its KV while the earlier stages had room to spare (at high load on bursty
//! production-like traffic, three times as long as under least-load: `docs/benchmarks.md`,
//! "Waiting demand in the capacity guard").
//!
//! Requests on a moved instance stay and finish there. Moved to a later stage they are shorter
//! than its range, as a spilled admission is, so nothing migrates; moved to an earlier stage,
//! those past its bound go back to their own stage at the next step (the donor's instance with
//! the least KV is the one that moves, so that copy is the smallest).
//!
//! On steady traffic a plan from the partitioner gives no stage such an excess, and the guard
//! leaves it alone; on a layout sized for other traffic it moves instances until the excess is
//! gone and stops (`cascade::tests`).

use serde::{Deserialize, Serialize};

use crate::cost::{BatchShape, CostProfile};
use crate::error::{CoreError, Result};
use crate::ids::InstanceId;
use crate::layout::StageLayout;
use crate::load::LoadBook;

#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapacityConfig {
    /// Act when a stage's mean predicted step exceeds the pooled fleet's by more than this share.
    pub margin: f64,
    /// The excess must hold this many seconds before a move (a burst passes, a skew stays).
    pub persist_s: f64,
    /// No move within this many seconds of the previous one.
    pub cooldown_s: f64,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        CapacityConfig { margin: 0.1, persist_s: 10.0, cooldown_s: 10.0 }
    }
}

impl CapacityConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.margin.is_finite() && self.margin >= 0.0) {
            return Err(CoreError::invalid("capacity.margin", self.margin, "must be finite and >= 0"));
        }
        for (field, v) in [("capacity.persist_s", self.persist_s), ("capacity.cooldown_s", self.cooldown_s)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(CoreError::invalid(field, v, "must be finite and >= 0"));
            }
        }
        Ok(())
    }
}

/// A move must cut the hot stage's mean step by this share (it shifts work the partitioner
/// placed on purpose, so a marginal gain is not worth it).
const MIN_GAIN: f64 = 0.05;

/// What a stage's instances hold together.
#[derive(Copy, Clone, Debug, Default)]
struct StageLoad {
    num_decode: u64,
    sum_context: u64,
    max_context: u32,
}

impl StageLoad {
    fn of(loads: &LoadBook, instances: &[InstanceId]) -> Self {
        let mut s = StageLoad::default();
        for &i in instances {
            let l = loads.get(i);
            s.num_decode += l.running.len() as u64;
            s.sum_context += l.sum_context;
            s.max_context = s.max_context.max(l.max_context);
        }
        s
    }

    fn add(&mut self, len: u32) {
        self.num_decode += 1;
        self.sum_context += u64::from(len);
        self.max_context = self.max_context.max(len);
    }

    /// Mean decode step time if the stage's running requests were spread evenly over
    /// `instances` instances, each padding to the stage's longest context. Queued prefill is
    /// left out: it comes in bursts that admission and balancing spread, while the guard is
    /// about the steady decode rate of the requests a stage holds.
    fn step_over(&self, profile: &CostProfile, instances: usize) -> f64 {
        let k = instances.max(1) as f64;
        profile.step_time(&BatchShape {
            num_decode: (self.num_decode as f64 / k).round() as u32,
            sum_context: (self.sum_context as f64 / k) as u64,
            max_context: self.max_context,
            ..Default::default()
        })
    }
}

/// Tracks how long a stage has run hot and decides the moves.
#[derive(Clone, Debug)]
pub struct CapacityGuard {
    config: CapacityConfig,
    /// Since when the hottest stage has exceeded the pooled step by the margin.
    hot_since: Option<f64>,
    last_move: f64,
}

impl CapacityGuard {
    pub fn new(config: CapacityConfig) -> Result<Self> {
        config.validate()?;
        Ok(CapacityGuard { config, hot_since: None, last_move: f64::NEG_INFINITY })
    }

    /// The layout after moving one instance to a stage that runs hot, when one does and the
    /// moves it takes to cool it are predicted to pay; `None` otherwise.
    /// `refused` are the prompt lengths of requests waiting for admission because their stage
    /// and every later one lacked KV room (the cascade policy passes those the fleet as a whole
    /// has room for): demand the book does not show, counted in their own stage and in the
    /// pooled fleet as if they ran.
    pub fn decide(
        &mut self,
        layout: &StageLayout,
        loads: &LoadBook,
        refused: &[u32],
        profile: &CostProfile,
        now: f64,
    ) -> Option<StageLayout> {
        let stages = layout.stages();
        if stages.len() < 2 {
            self.hot_since = None;
            return None;
        }
        let mut per_stage: Vec<StageLoad> = stages.iter().map(|s| StageLoad::of(loads, &s.instances)).collect();
        for &len in refused {
            per_stage[layout.stage_of_len(len)].add(len);
        }
        let count = |k: usize| stages[k].instances.len();
        let step: Vec<f64> = (0..stages.len()).map(|k| per_stage[k].step_over(profile, count(k))).collect();
        let pooled = pooled_step(layout, loads, refused, profile);
        let hot = (0..stages.len()).max_by(|&a, &b| step[a].total_cmp(&step[b]))?;
        if step[hot] <= pooled * (1.0 + self.config.margin) {
            self.hot_since = None;
            return None;
        }
        let since = *self.hot_since.get_or_insert(now);
        if now - since < self.config.persist_s || now - self.last_move < self.config.cooldown_s {
            return None;
        }
        // What the other stages can spare: instances each can give while it still steps within
        // the margin of the pooled fleet and 5% under the hot stage's step (keeping one).
        let within = pooled * (1.0 + self.config.margin);
        let donor_bound = within.min(step[hot] * (1.0 - MIN_GAIN));
        let spare: Vec<usize> = (0..stages.len())
            .map(|j| {
                let can_give = |s: &usize| per_stage[j].step_over(profile, count(j) - s) <= donor_bound;
                if j == hot {
                    0
                } else {
                    (1..count(j)).take_while(can_give).count()
                }
            })
            .collect();
        let total_spare: usize = spare.iter().sum();
        // Judged over the moves it takes to bring the hot stage within the margin (or all the
        // others can spare), not the first alone: past `longest_request_floor_from` requests an
        // instance, the step follows the longest context, and one more instance may change
        // nothing while a few more would halve it (the late stages holding the longest
        // generations as a trace drains).
        let target = (1..=total_spare)
            .find(|&m| per_stage[hot].step_over(profile, count(hot) + m) <= within)
            .unwrap_or(total_spare);
        if target == 0 || per_stage[hot].step_over(profile, count(hot) + target) > step[hot] * (1.0 - MIN_GAIN) {
            return None;
        }
        let donor = (0..stages.len())
            .filter(|&j| spare[j] >= 1)
            .map(|j| (j, per_stage[j].step_over(profile, count(j) - 1)))
            .min_by(|a, b| a.1.total_cmp(&b.1))?
            .0;
        // The donor's instance with the least KV: the least work left behind on it, and the
        // fewest tokens to migrate when it moves to an earlier stage (its requests then
        // exceed their new stage's bound and go back to their own).
        let moved = *stages[donor].instances.iter().min_by_key(|&&i| loads.get(i).kv_tokens())?;
        let mut next = layout.clone();
        next.move_instance(moved, hot).ok()?;
        self.last_move = now;
        self.hot_since = None;
        Some(next)
    }
}

/// Mean decode step time if every running request were spread evenly over the whole fleet, as
/// least-load spreads them: each instance holds the fleet's mean batch, padding to the longest
/// of that many contexts drawn from all running ones (the `n/(n+1)` quantile, the expected
/// maximum of `n` draws).
fn pooled_step(layout: &StageLayout, loads: &LoadBook, refused: &[u32], profile: &CostProfile) -> f64 {
    let mut contexts: Vec<u32> = layout
        .instances()
        .flat_map(|i| loads.get(i).running.iter().map(|&(_, len)| len))
        .chain(refused.iter().copied())
        .collect();
    let num_instances = layout.num_instances().max(1);
    let mut total = StageLoad {
        num_decode: contexts.len() as u64,
        sum_context: contexts.iter().map(|&c| u64::from(c)).sum(),
        max_context: 0,
    };
    if !contexts.is_empty() {
        let per_instance = total.num_decode as f64 / num_instances as f64;
        let rank = ((contexts.len() as f64 * per_instance / (per_instance + 1.0)) as usize).min(contexts.len() - 1);
        total.max_context = *contexts.select_nth_unstable(rank).1;
    }
    total.step_over(profile, num_instances)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::tests::gpu;
    use crate::ids::RequestId;
    use crate::layout::StageRange;

    fn ids(v: &[u32]) -> Vec<InstanceId> {
        v.iter().map(|&i| InstanceId(i)).collect()
    }

    /// Three short-stage instances with a few short requests each, one long-stage instance
    /// with many long ones.
    fn skewed() -> (StageLayout, LoadBook) {
        let layout = StageLayout::new(vec![
            StageRange { min_len: 0, max_len: 4096, instances: ids(&[0, 1, 2]) },
            StageRange { min_len: 4096, max_len: 131_072, instances: ids(&[3]) },
        ])
        .unwrap();
        let mut loads = LoadBook::default();
        loads.begin_refresh();
        let mut r = 0;
        for inst in 0..3 {
            for _ in 0..8 {
                loads.record(InstanceId(inst), RequestId(r), 500);
                r += 1;
            }
        }
        for _ in 0..40 {
            loads.record(InstanceId(3), RequestId(r), 20_000);
            r += 1;
        }
        loads.end_refresh();
        (layout, loads)
    }

    fn even() -> LoadBook {
        let mut loads = LoadBook::default();
        loads.begin_refresh();
        for inst in 0..4 {
            for k in 0..8 {
                loads.record(InstanceId(inst), RequestId(u64::from(inst) * 100 + k), 600);
            }
        }
        loads.end_refresh();
        loads
    }

    #[test]
    fn a_stage_that_stays_hot_takes_an_instance_from_the_coolest() {
        let (layout, loads) = skewed();
        let mut guard = CapacityGuard::new(CapacityConfig::default()).unwrap();
        let p = gpu();
        assert!(guard.decide(&layout, &loads, &[], &p, 0.0).is_none(), "a fresh excess waits persist_s");
        let next = guard.decide(&layout, &loads, &[], &p, 10.0).expect("moves once the excess has held");
        assert_eq!(next.stages()[0].instances.len(), 2);
        assert_eq!(next.stages()[1].instances.len(), 2);
        assert_eq!(next.stages()[1].max_len, 131_072);
        assert!(guard.decide(&next, &loads, &[], &p, 12.0).is_none(), "cooldown");
    }

    /// Twelve idle short-stage instances; two long-stage ones with 36 requests each, one at
    /// 30K tokens and the rest at 8K: past the profile's floor, where the step follows the
    /// longest context.
    fn drained_into_the_last_stage() -> (StageLayout, LoadBook) {
        let layout = StageLayout::new(vec![
            StageRange { min_len: 0, max_len: 4096, instances: ids(&(0..12).collect::<Vec<_>>()) },
            StageRange { min_len: 4096, max_len: 131_072, instances: ids(&[12, 13]) },
        ])
        .unwrap();
        let mut loads = LoadBook::default();
        loads.begin_refresh();
        for inst in 12..14 {
            for k in 0..36 {
                let len = if k == 0 { 30_000 } else { 8_000 };
                loads.record(InstanceId(inst), RequestId(u64::from(inst) * 100 + k), len);
            }
        }
        loads.end_refresh();
        (layout, loads)
    }

    #[test]
    fn a_stage_past_the_floor_takes_instances_though_one_alone_would_not_pay() {
        let (layout, loads) = drained_into_the_last_stage();
        let p = gpu();
        let long = StageLoad::of(&loads, &layout.stages()[1].instances);
        // The case this is about: one more instance leaves every batch past the floor.
        assert!(long.step_over(&p, 3) > long.step_over(&p, 2) * (1.0 - MIN_GAIN));
        let mut guard = CapacityGuard::new(CapacityConfig::default()).unwrap();
        assert!(guard.decide(&layout, &loads, &[], &p, 0.0).is_none());
        let next = guard.decide(&layout, &loads, &[], &p, 10.0).expect("the moves it takes pay together");
        assert!(next.stages()[1].instances.len() > 2);
        assert_eq!(next.num_instances(), 14);
    }

    #[test]
    fn a_burst_shorter_than_persist_s_moves_nothing() {
        let (layout, _) = skewed();
        let calm = even();
        // For 3 s the long stage's instance holds twice its usual batch, at ten times the context.
        let mut burst = LoadBook::default();
        burst.begin_refresh();
        for inst in 0..4 {
            let (n, len) = if inst == 3 { (16, 6000) } else { (8, 600) };
            for k in 0..n {
                burst.record(InstanceId(inst), RequestId(u64::from(inst) * 100 + k), len);
            }
        }
        burst.end_refresh();
        let mut guard = CapacityGuard::new(CapacityConfig::default()).unwrap();
        let p = gpu();
        for t in 0..120 {
            let loads = if (60..63).contains(&t) { &burst } else { &calm };
            assert!(guard.decide(&layout, loads, &[], &p, f64::from(t)).is_none(), "moved at {t} s");
        }
        // The same load held for good does move.
        assert!((120..200).any(|t| guard.decide(&layout, &burst, &[], &p, f64::from(t)).is_some()));
    }

    #[test]
    fn even_stages_are_left_alone() {
        let (layout, _) = skewed();
        let loads = even();
        let mut guard = CapacityGuard::new(CapacityConfig::default()).unwrap();
        for t in 0..60 {
            assert!(guard.decide(&layout, &loads, &[], &gpu(), f64::from(t)).is_none());
        }
    }

    #[test]
    fn long_prompts_waiting_for_a_full_stage_count_as_its_load() {
        let (layout, _) = skewed();
        let loads = even();
        let p = gpu();
        // Twenty prompts of 30K tokens wait for the long stage, whose running batch alone
        // is as light as the others'.
        let refused = [30_000; 20];
        let mut guard = CapacityGuard::new(CapacityConfig::default()).unwrap();
        for t in 0..30 {
            assert!(guard.decide(&layout, &loads, &[], &p, f64::from(t)).is_none(), "moved at {t} s unprompted");
        }
        let mut guard = CapacityGuard::new(CapacityConfig::default()).unwrap();
        let moved = (0..30).find_map(|t| guard.decide(&layout, &loads, &refused, &p, f64::from(t)));
        let next = moved.expect("the waiting demand makes the long stage hot");
        assert_eq!(next.stages()[1].instances.len(), 2);
    }

    #[test]
    fn bad_settings_are_rejected() {
        let err = CapacityGuard::new(CapacityConfig { margin: -1.0, ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("capacity.margin"), "{err}");
    }
}
