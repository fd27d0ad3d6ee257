use super::*;
use crate::cost::tests::gpu;
use crate::layout::StageRange;
use crate::partition::{partition, PartitionOptions};
use crate::presets::Preset;
use crate::rng::Rng;
use crate::workload::{RequestSample, WorkloadSummary};

/// Stationary synthetic traffic: each simulated second, `rate` arrivals and one token-step for
/// every token the workload decodes per second, at lengths drawn from its token distribution.
struct SteadyTraffic {
    samples: Vec<RequestSample>,
    cumulative_output: Vec<f64>,
    rate: f64,
    rng: Rng,
    next_request: u64,
}

impl SteadyTraffic {
    fn new(preset: Preset, rate: f64, seed: u64) -> Self {
        let samples = preset.sample(20_000, seed);
        let mut acc = 0.0;
        let cumulative_output = samples
            .iter()
            .map(|s| {
                acc += f64::from(s.output_len);
                acc
            })
            .collect();
        SteadyTraffic { samples, cumulative_output, rate, rng: Rng::new(seed + 1), next_request: 0 }
    }

    fn token_length(&mut self) -> u32 {
        let total = *self.cumulative_output.last().unwrap();
        let k = self.cumulative_output.partition_point(|&c| c < self.rng.uniform() * total);
        let s = self.samples[k.min(self.samples.len() - 1)];
        s.prompt_len + self.rng.range_u32(0, s.output_len - 1)
    }

    /// Drives one second of traffic through `policy`; returns whether the layout changed.
    fn second(&mut self, policy: &mut CascadePolicy, now: f64) -> bool {
        let mean_output = *self.cumulative_output.last().unwrap() / self.samples.len() as f64;
        for _ in 0..self.rate as usize {
            let s = self.samples[self.rng.range_u32(0, self.samples.len() as u32 - 1) as usize];
            policy.admit(&NewRequest::new(RequestId(self.next_request), s.prompt_len), now).unwrap();
            self.next_request += 1;
        }
        let layout = policy.layout().clone();
        let entries: Vec<StepEntry> = (0..(self.rate * mean_output) as usize)
            .map(|k| {
                let len = self.token_length();
                let stage = &layout.stages()[layout.stage_of_len(len)];
                let instance = stage.instances[k % stage.instances.len()];
                StepEntry { request: RequestId(1_000_000_000 + k as u64), instance, context_len: len }
            })
            .collect();
        policy.on_step(&entries, now).unwrap();
        policy.tick(now).new_layout.is_some()
    }
}

fn planned_policy(preset: Preset, rate: f64, config: CascadeConfig) -> CascadePolicy {
    let grid = BucketGrid::geometric(preset.max_len(), 64, 64).unwrap();
    let w = WorkloadSummary::from_samples(&grid, &preset.sample(20_000, 1), rate).unwrap();
    let plan = partition(&w, &gpu(), &PartitionOptions { num_instances: 16, max_stages: None }).unwrap();
    let instances: Vec<InstanceId> = (0..16).map(InstanceId).collect();
    let layout = StageLayout::from_plan(&plan, &instances).unwrap();
    CascadePolicy::new(gpu(), layout, grid, config, Some(&w)).unwrap()
}

fn refining() -> CascadeConfig {
    CascadeConfig { is_refine_enabled: true, ..CascadeConfig::default() }
}

#[test]
fn a_steady_workload_never_changes_a_layout_planned_for_it() {
    let mut policy = planned_policy(Preset::LongContextMixed, 4.0, refining());
    let mut traffic = SteadyTraffic::new(Preset::LongContextMixed, 4.0, 7);
    let changes = (0..600).filter(|&t| traffic.second(&mut policy, f64::from(t))).count();
    assert_eq!(changes, 0);
}

#[test]
fn a_steady_workload_settles_after_at_most_a_few_changes_from_a_bad_start() {
    // Planned for chat, then serving long-context traffic: it must adapt, then stop changing.
    let policy = planned_policy(Preset::ShortChat, 4.0, refining());
    let grid_max = policy.layout().max_len();
    assert_eq!(grid_max, Preset::ShortChat.max_len());
    let mut policy = {
        let instances: Vec<InstanceId> = (0..16).map(InstanceId).collect();
        let stages = policy
            .layout()
            .stages()
            .iter()
            .map(|s| (s.min_len, s.max_len.min(131_071), s.instances.len()))
            .collect::<Vec<_>>();
        let mut ranges = Vec::new();
        let mut next = instances.into_iter();
        for (k, (lo, hi, n)) in stages.iter().enumerate() {
            let hi = if k + 1 == stages.len() { 131_072 } else { *hi };
            ranges.push(crate::layout::StageRange {
                min_len: *lo,
                max_len: hi,
                instances: next.by_ref().take(*n).collect(),
            });
        }
        let grid = BucketGrid::geometric(131_072, 64, 64).unwrap();
        let chat = WorkloadSummary::from_samples(&grid, &Preset::ShortChat.sample(20_000, 1), 4.0).unwrap();
        CascadePolicy::new(gpu(), StageLayout::new(ranges).unwrap(), grid, refining(), Some(&chat)).unwrap()
    };
    let before = policy.layout().clone();
    let mut traffic = SteadyTraffic::new(Preset::LongContextMixed, 4.0, 7);
    let mut seen = vec![before.clone()];
    let mut changes = Vec::new();
    for t in 0..900 {
        if traffic.second(&mut policy, f64::from(t)) {
            assert!(!seen.contains(policy.layout()), "returned to an earlier layout at {t}s: oscillation");
            seen.push(policy.layout().clone());
            changes.push(t);
        }
    }
    assert!(!changes.is_empty(), "the layout must adapt to the new traffic");
    assert_ne!(policy.layout(), &before);
    let late = changes.iter().filter(|&&t| t >= 450).count();
    assert_eq!(late, 0, "still changing after settling: {changes:?}");
}

#[test]
fn refinement_keeps_the_planned_number_of_stages() {
    // One stage planned for chat, then long-context traffic: the refiner re-plans (the
    // histogram diverges) but within one stage, so the layout stays what the planner chose.
    let grid = BucketGrid::geometric(131_072, 64, 64).unwrap();
    let chat = WorkloadSummary::from_samples(&grid, &Preset::ShortChat.sample(20_000, 1), 4.0).unwrap();
    let single =
        crate::layout::StageRange { min_len: 0, max_len: 131_072, instances: (0..16).map(InstanceId).collect() };
    let layout = StageLayout::new(vec![single]).unwrap();
    let mut policy = CascadePolicy::new(gpu(), layout.clone(), grid, refining(), Some(&chat)).unwrap();
    let mut traffic = SteadyTraffic::new(Preset::LongContextMixed, 4.0, 7);
    for t in 0..300 {
        traffic.second(&mut policy, f64::from(t));
        assert_eq!(policy.layout().stages().len(), 1, "the refiner added stages at {t}s");
    }
}

#[test]
fn without_refinement_the_layout_is_fixed() {
    let mut policy = planned_policy(Preset::LongContextMixed, 4.0, CascadeConfig::default());
    let mut traffic = SteadyTraffic::new(Preset::LongContextMixed, 4.0, 7);
    assert!((0..200).all(|t| !traffic.second(&mut policy, f64::from(t))));
}

#[test]
fn a_refused_request_counts_as_one_arrival_however_often_it_is_retried() {
    let mut policy = planned_policy(Preset::ShortChat, 4.0, refining());
    let arrivals = |p: &CascadePolicy| -> f64 { p.refiner.as_ref().unwrap().arrivals.iter().sum() };
    // Fill every instance of the first stage up to its sequence cap, then retry one more
    // request many times.
    let first = policy.admit(&NewRequest::new(RequestId(0), 100), 0.0).unwrap().unwrap();
    let mut request = 1;
    while policy.admit(&NewRequest::new(RequestId(request), 100), 0.0).unwrap().is_some() {
        request += 1;
    }
    let before = arrivals(&policy);
    for _ in 0..50 {
        assert!(policy.admit(&NewRequest::new(RequestId(request), 100), 0.0).unwrap().is_none());
    }
    assert_eq!(arrivals(&policy), before);
    policy.request_finished(RequestId(0), first.instance);
    assert!(policy.admit(&NewRequest::new(RequestId(request), 100), 0.0).unwrap().is_some());
    assert_eq!(arrivals(&policy), before, "admitted at last: still the same arrival");
}

#[test]
fn a_refused_request_is_forgotten_when_it_is_withdrawn_or_finishes() {
    let mut policy = planned_policy(Preset::ShortChat, 4.0, refining());
    let mut request = 0;
    while policy.admit(&NewRequest::new(RequestId(request), 100), 0.0).unwrap().is_some() {
        request += 1;
    }
    // Everything is full: these wait in the caller's queue, and two of them give up there.
    for r in request..request + 3 {
        assert!(policy.admit(&NewRequest::new(RequestId(r), 100), 0.0).unwrap().is_none());
    }
    assert_eq!(policy.refused.len(), 3);
    policy.request_withdrawn(RequestId(request));
    policy.request_withdrawn(RequestId(request + 1));
    assert_eq!(policy.refused.len(), 1);
    // The last one was running elsewhere all along (a drain asked to move it) and finishes.
    policy.request_finished(RequestId(request + 2), InstanceId(0));
    assert!(policy.refused.is_empty(), "nothing is kept for requests that are gone");
}

#[test]
fn the_capacity_guard_settles_on_a_steady_workload() {
    // Long-context traffic on a layout that gives its long stage a quarter of the fleet: the
    // guard moves instances there, then stops, and never returns to a layout it left.
    let grid = BucketGrid::geometric(131_072, 64, 64).unwrap();
    let layout = StageLayout::new(vec![
        crate::layout::StageRange { min_len: 0, max_len: 2048, instances: (0..12).map(InstanceId).collect() },
        crate::layout::StageRange { min_len: 2048, max_len: 131_072, instances: (12..16).map(InstanceId).collect() },
    ])
    .unwrap();
    let config = CascadeConfig { is_capacity_guarded: true, ..CascadeConfig::default() };
    let mut policy = CascadePolicy::new(gpu(), layout, grid, config, None).unwrap();
    let mut traffic = SteadyTraffic::new(Preset::LongContextMixed, 4.0, 7);
    let mut seen = vec![policy.layout().clone()];
    let mut changes = Vec::new();
    for t in 0..900 {
        if traffic.second(&mut policy, f64::from(t)) {
            assert!(!seen.contains(policy.layout()), "back to an earlier layout at {t}s");
            seen.push(policy.layout().clone());
            changes.push(t);
        }
    }
    assert!(!changes.is_empty(), "the starved long stage must get instances");
    assert!(policy.layout().stages()[1].instances.len() > 4);
    assert!(changes.iter().all(|&t| t < 450), "still changing: {changes:?}");
}

#[test]
fn a_capacity_move_to_a_later_stage_migrates_nothing() {
    // Two stages; the long one holds far more decode work than the pooled fleet would give it.
    let grid = BucketGrid::geometric(131_072, 64, 64).unwrap();
    let layout = StageLayout::new(vec![
        crate::layout::StageRange { min_len: 0, max_len: 4096, instances: (0..3).map(InstanceId).collect() },
        crate::layout::StageRange { min_len: 4096, max_len: 131_072, instances: vec![InstanceId(3)] },
    ])
    .unwrap();
    let config = CascadeConfig { is_capacity_guarded: true, ..CascadeConfig::default() };
    let mut policy = CascadePolicy::new(gpu(), layout, grid, config, None).unwrap();
    let mut entries: Vec<StepEntry> = (0..24)
        .map(|r| StepEntry { request: RequestId(r), instance: InstanceId((r % 3) as u32), context_len: 500 })
        .collect();
    entries.extend((100..140).map(|r| StepEntry {
        request: RequestId(r),
        instance: InstanceId(3),
        context_len: 20_000,
    }));
    let mut moved = None;
    for t in 0..30 {
        assert!(policy.on_step(&entries, f64::from(t)).unwrap().is_empty());
        let outcome = policy.tick(f64::from(t));
        if let Some((_, change)) = &outcome.new_layout {
            assert_eq!(*change, LayoutChange::CapacityMove);
            assert!(
                outcome.migrations.iter().all(|m| m.reason != MigrationReason::Refinement),
                "a move to a later stage realigns nothing"
            );
            moved = Some(t);
            break;
        }
    }
    assert!(moved.is_some(), "the hot last stage must get an instance");
    assert_eq!(policy.layout().stages()[1].instances.len(), 2);
    // The short requests on the moved instance keep decoding there: no bound was crossed.
    assert!(policy.on_step(&entries, 31.0).unwrap().is_empty());
}

#[test]
fn long_prompts_refused_for_a_full_last_stage_bring_it_an_instance() {
    // The long stage's one instance runs three requests of 130K tokens (its KV all but full);
    // the short stage's three run 100 of 2,000 each (their KV half full). The batches alone
    // leave every stage within the guard's margin; long prompts waiting for the long stage's
    // KV, which the short stage has room for, do not.
    let grid = BucketGrid::geometric(131_072, 64, 64).unwrap();
    let layout = || {
        StageLayout::new(vec![
            StageRange { min_len: 0, max_len: 4096, instances: (0..3).map(InstanceId).collect() },
            StageRange { min_len: 4096, max_len: 131_072, instances: vec![InstanceId(3)] },
        ])
        .unwrap()
    };
    let config = CascadeConfig { is_capacity_guarded: true, ..CascadeConfig::default() };
    let run = |short_len: u32, waiting: u64| {
        let mut entries: Vec<StepEntry> = (0..300)
            .map(|r| StepEntry { request: RequestId(r), instance: InstanceId((r % 3) as u32), context_len: short_len })
            .collect();
        entries.extend((500..503).map(|r| StepEntry {
            request: RequestId(r),
            instance: InstanceId(3),
            context_len: 130_000,
        }));
        let mut policy = CascadePolicy::new(gpu(), layout(), grid.clone(), config, None).unwrap();
        for t in 0..60 {
            policy.on_step(&entries, f64::from(t)).unwrap();
            for r in 1000..1000 + waiting {
                let admitted = policy.admit(&NewRequest::new(RequestId(r), 30_000), f64::from(t)).unwrap();
                assert!(admitted.is_none(), "no KV room in the long stage");
            }
            if let Some((_, change)) = policy.tick(f64::from(t)).new_layout {
                assert_eq!(change, LayoutChange::CapacityMove);
                return Some(policy.layout().stages()[1].instances.len());
            }
        }
        None
    };
    assert_eq!(run(2000, 0), None, "the running batches alone move nothing");
    assert_eq!(run(2000, 20), Some(2), "the waiting prompts are the long stage's load too");
    // With the short stage's KV full as well, they would wait under least-load too: an
    // overload no move relieves.
    assert_eq!(run(4000, 20), None, "a full fleet's queue moves nothing");
}

fn ranges(policy: &CascadePolicy) -> Vec<(u32, u32, Vec<u32>)> {
    policy.layout().stages().iter().map(|s| (s.min_len, s.max_len, s.instances.iter().map(|i| i.0).collect())).collect()
}

#[test]
fn instances_that_join_restore_the_stages_a_departure_merged() {
    // Three stages of one instance each (the operator's `--stages`, or a small plan).
    let stage = |min_len, max_len, i| StageRange { min_len, max_len, instances: vec![InstanceId(i)] };
    let layout = StageLayout::new(vec![stage(0, 256, 0), stage(256, 4096, 1), stage(4096, 8192, 2)]).unwrap();
    let grid = BucketGrid::geometric(8192, 64, 16).unwrap();
    let mut policy = CascadePolicy::new(gpu(), layout, grid, CascadeConfig::default(), None).unwrap();
    policy.remove_instance(InstanceId(1)).unwrap();
    policy.remove_instance(InstanceId(2)).unwrap();
    assert_eq!(ranges(&policy), vec![(0, 8192, vec![0])], "no neighbour could spare one");
    policy.add_instance(InstanceId(3)).unwrap();
    assert_eq!(ranges(&policy), vec![(0, 256, vec![3]), (256, 8192, vec![0])]);
    policy.add_instance(InstanceId(4)).unwrap();
    assert_eq!(ranges(&policy), vec![(0, 256, vec![3]), (256, 4096, vec![4]), (4096, 8192, vec![0])]);
    // Every planned stage back: the next one joins the busiest stage, as before.
    policy.add_instance(InstanceId(5)).unwrap();
    assert_eq!(policy.layout().stages().len(), 3);
    assert_eq!(policy.layout().num_instances(), 4);
}
