use proptest::prelude::*;

use super::minplus::{first_finite, is_convex, is_finite_suffix_from, min_plus_into};
use super::*;
use crate::cost::tests::gpu;
use crate::grid::BucketGrid;
use crate::presets::Preset;
use crate::workload::RequestSample;

/// Every way to cut `nb` buckets into contiguous stages and split `n` instances among them.
fn brute_force(table: &RangeTable, n: usize, max_stages: Option<usize>) -> f64 {
    let nb = table.num_buckets();
    let mut best = f64::INFINITY;
    for mask in 0u32..(1 << (nb - 1)) {
        let mut cuts = vec![0usize];
        cuts.extend((1..nb).filter(|b| mask & (1 << (b - 1)) != 0));
        cuts.push(nb);
        let k = cuts.len() - 1;
        if k > n || max_stages.is_some_and(|s| k > s) {
            continue;
        }
        let loads: Vec<_> = cuts.windows(2).map(|w| table.load(w[0], w[1])).collect();
        best = best.min(best_allocation(table, &loads, n));
    }
    best
}

fn best_allocation(table: &RangeTable, loads: &[StageLoad], left: usize) -> f64 {
    let Some((first, rest)) = loads.split_first() else {
        return if left == 0 { 0.0 } else { f64::INFINITY };
    };
    (1..=left.saturating_sub(rest.len()))
        .map(|m| {
            let here = table.predict(first, m as u32).map_or(f64::INFINITY, |(c, _)| c);
            here + best_allocation(table, rest, left - m)
        })
        .fold(f64::INFINITY, f64::min)
}

fn samples_strategy(max_len: u32) -> impl Strategy<Value = Vec<RequestSample>> {
    prop::collection::vec((1u32..max_len / 2, 1u32..max_len / 2), 1..40)
        .prop_map(|v| v.into_iter().map(|(p, o)| RequestSample { prompt_len: p, output_len: o }).collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The DP (with its Monge divide-and-conquer) finds the brute-force optimum.
    #[test]
    fn dp_matches_brute_force(
        samples in samples_strategy(4096),
        nb in 1usize..=6,
        n in 1u32..=6,
        rate in 0.5f64..400.0,
        heterogeneity in 0.0f64..=1.0,
        max_stages in prop::option::of(1u32..=4),
    ) {
        let grid = BucketGrid::geometric(4096, nb, 64).unwrap();
        let w = WorkloadSummary::from_samples(&grid, &samples, rate).unwrap();
        let profile = CostProfile { heterogeneity, kv_capacity_tokens: 20_000, ..gpu() };
        let table = RangeTable::new(&w, &profile);
        let expected = brute_force(&table, n as usize, max_stages.map(|s| s as usize));
        let got = partition(&w, &profile, &PartitionOptions { num_instances: n, max_stages });
        match got {
            Ok(plan) => {
                let total = plan.objective_s * rate;
                prop_assert!((total - expected).abs() <= 1e-9 * (1.0 + expected.abs()), "dp {total} brute {expected}");
                prop_assert_eq!(plan.stages.iter().map(|s| s.num_instances).sum::<u32>(), n);
                prop_assert_eq!(plan.stages[0].min_len, 0);
                prop_assert_eq!(plan.stages.last().unwrap().max_len, 4096);
                prop_assert!(plan.stages.windows(2).all(|s| s[0].max_len == s[1].min_len));
                if let Some(k) = max_stages { prop_assert!(plan.stages.len() <= k as usize); }
            }
            Err(_) => prop_assert!(expected.is_infinite(), "dp infeasible, brute {expected}"),
        }
    }

    /// The stage cost is convex and non-increasing in the instance count, so the fast path runs.
    #[test]
    fn stage_cost_is_convex_in_instances(samples in samples_strategy(4096), rate in 0.5f64..400.0) {
        let grid = BucketGrid::geometric(4096, 6, 64).unwrap();
        let w = WorkloadSummary::from_samples(&grid, &samples, rate).unwrap();
        let profile = gpu();
        let table = RangeTable::new(&w, &profile);
        let mut g = Vec::new();
        for i in 0..6 {
            for j in i + 1..=6 {
                table.stage_costs(&table.load(i, j), 64, &mut g);
                if let Some(lo) = first_finite(&g) {
                    prop_assert!(is_finite_suffix_from(&g, lo));
                    prop_assert!(is_convex(&g, lo));
                    prop_assert!(g[lo..].windows(2).all(|w| w[1] <= w[0] + 1e-12));
                }
            }
        }
    }
}

#[test]
fn min_plus_fast_path_equals_naive() {
    let f = [f64::INFINITY, f64::INFINITY, 3.0, 1.0, 4.0, 1.5, 9.0, 2.0, 6.0];
    let g: Vec<f64> = (0..9).map(|m| if m < 2 { f64::INFINITY } else { 10.0 / m as f64 }).collect();
    let mut fast = vec![f64::INFINITY; 9];
    let mut arg = vec![0; 9];
    min_plus_into(&f, &g, &mut fast, &mut arg);
    for n in 0..9 {
        let naive = (0..=n).map(|k| f[k] + g[n - k]).fold(f64::INFINITY, f64::min);
        assert_eq!(fast[n], naive, "n={n}");
    }
}

#[test]
fn long_context_traffic_gets_several_stages_on_a_gpu_profile() {
    let p = Preset::LongContextMixed;
    let grid = BucketGrid::geometric(p.max_len(), 64, 64).unwrap();
    let w = WorkloadSummary::from_samples(&grid, &p.sample(20_000, 1), 4.0).unwrap();
    let plan = partition(&w, &gpu(), &PartitionOptions { num_instances: 16, max_stages: None }).unwrap();
    assert!(plan.stages.len() >= 2, "{plan:?}");
    // Splitting must beat one big stage under the same model.
    let single = partition(&w, &gpu(), &PartitionOptions { num_instances: 16, max_stages: Some(1) }).unwrap();
    assert!(plan.objective_s < single.objective_s);
}

#[test]
fn overload_is_reported_as_infeasible() {
    let grid = BucketGrid::geometric(8192, 16, 16).unwrap();
    let w = WorkloadSummary::from_samples(&grid, &Preset::ShortChat.sample(1000, 1), 1e6).unwrap();
    let err = partition(&w, &gpu(), &PartitionOptions { num_instances: 2, max_stages: None }).unwrap_err();
    assert!(matches!(err, CoreError::Infeasible(_)), "{err}");
    let message = err.to_string();
    assert!(message.contains("busy instances") && !message.contains("context"), "{message}");
}

#[test]
fn a_context_no_instance_holds_is_named_as_the_cause() {
    let grid = BucketGrid::geometric(8192, 16, 16).unwrap();
    let samples = vec![RequestSample { prompt_len: 6000, output_len: 100 }; 10];
    let w = WorkloadSummary::from_samples(&grid, &samples, 0.01).unwrap();
    let small_kv = CostProfile { kv_capacity_tokens: 4096, ..gpu() };
    let err = partition(&w, &small_kv, &PartitionOptions { num_instances: 4, max_stages: None }).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("does not fit an instance") && !message.contains("busy"), "{message}");
}

#[test]
fn zero_instances_is_invalid() {
    let grid = BucketGrid::geometric(8192, 16, 16).unwrap();
    let w = WorkloadSummary::from_samples(&grid, &Preset::ShortChat.sample(10, 1), 1.0).unwrap();
    let err = partition(&w, &gpu(), &PartitionOptions { num_instances: 0, max_stages: None }).unwrap_err();
    assert!(err.to_string().contains("num_instances"));
}

#[test]
fn one_solve_gives_the_plan_of_every_stage_limit() {
    let profile = gpu();
    let mut num_feasible = [0, 0];
    for (preset, n, nb, rate) in [
        (Preset::LongContextMixed, 16u32, 32usize, 4.0),
        (Preset::Bimodal, 9, 24, 3.0),
        (Preset::ShortChat, 4, 16, 30.0),
        (Preset::Agentic, 12, 20, 1e6),
    ] {
        let grid = BucketGrid::geometric(preset.max_len(), nb, 16).unwrap();
        let w = WorkloadSummary::from_samples(&grid, &preset.sample(2000, 3), rate).unwrap();
        let max_stages = 7;
        let all = partition_by_stage_count(&w, &profile, n, max_stages).unwrap();
        assert_eq!(all.len(), max_stages as usize);
        for (k, plan) in (1..=max_stages).zip(all) {
            let alone = partition(&w, &profile, &PartitionOptions { num_instances: n, max_stages: Some(k) });
            num_feasible[usize::from(plan.is_some())] += 1;
            match (alone, plan) {
                (Ok(a), Some(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}"), "{preset:?} k={k}"),
                (Err(CoreError::Infeasible(_)), None) => {}
                (a, b) => panic!("{preset:?} k={k}: alone {a:?}, in one solve {b:?}"),
            }
        }
    }
    assert!(num_feasible[0] > 0 && num_feasible[1] > 0, "{num_feasible:?}");
    assert!(partition_by_stage_count(
        &WorkloadSummary::from_samples(
            &BucketGrid::geometric(8192, 8, 16).unwrap(),
            &Preset::ShortChat.sample(10, 1),
            1.0
        )
        .unwrap(),
        &profile,
        2,
        0
    )
    .is_err());
}

#[test]
fn a_plan_resized_to_its_own_sizes_is_the_plan_and_other_sizes_keep_its_ranges() {
    let profile = gpu();
    let grid = BucketGrid::geometric(Preset::LongContextMixed.max_len(), 32, 16).unwrap();
    let w = WorkloadSummary::from_samples(&grid, &Preset::LongContextMixed.sample(2000, 3), 4.0).unwrap();
    let plan = partition(&w, &profile, &PartitionOptions { num_instances: 16, max_stages: Some(3) }).unwrap();
    assert_eq!(plan.stages.len(), 3);
    let sizes: Vec<u32> = plan.stages.iter().map(|s| s.num_instances).collect();
    let same = resized(&w, &profile, &plan, &sizes).unwrap();
    assert_eq!(format!("{plan:?}"), format!("{same:?}"));

    // One instance from the last stage to the first: same ranges, the model's prediction for
    // each stage at its new size, and an infinite objective where the model finds a stage
    // infeasible (a single instance cannot carry the long stage).
    let mut moved = sizes.clone();
    moved[2] -= 1;
    moved[0] += 1;
    let other = resized(&w, &profile, &plan, &moved).unwrap();
    let table = RangeTable::new(&w, &profile);
    for ((a, b), &m) in plan.stages.iter().zip(&other.stages).zip(&moved) {
        assert_eq!((a.min_len, a.max_len, m), (b.min_len, b.max_len, b.num_instances));
        let (i, j) = (grid.edges().binary_search(&a.min_len).unwrap(), grid.edges().binary_search(&a.max_len).unwrap());
        let expected = table.predict(&table.load(i, j), m).map(|(_, p)| p).unwrap_or_default();
        assert_eq!(b.prediction, expected);
    }
    let starved = resized(&w, &profile, &plan, &[sizes[0] + sizes[2] - 1, sizes[1], 1]).unwrap();
    assert!(starved.objective_s.is_infinite(), "{starved:?}");

    assert!(resized(&w, &profile, &plan, &[16]).is_err(), "one size for three stages");
    assert!(resized(&w, &profile, &plan, &[sizes[0] + sizes[2], sizes[1], 0]).is_err(), "an empty stage");
}
