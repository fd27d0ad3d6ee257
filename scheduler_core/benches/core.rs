//! criterion benchmarks of the core's decisions: `make bench-rust`.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use std::hint::black_box;

use scheduler_core::cost::builtin_profile;
use scheduler_core::{
    partition, BucketGrid, CostProfile, InstanceId, PartitionOptions, Preset, RequestId, Router, StageLayout,
    StageRange, StepEntry, WorkloadSummary,
};

fn gpu() -> CostProfile {
    CostProfile::from_json(builtin_profile("gpu-h100-llama3-8b").unwrap()).unwrap()
}

/// The long-context preset at 60% of the fleet's estimated capacity (what `cascade plan` uses).
fn workload(num_instances: u32, num_buckets: usize, profile: &CostProfile) -> WorkloadSummary {
    let preset = Preset::LongContextMixed;
    let grid = BucketGrid::geometric(preset.max_len(), num_buckets, 16).unwrap();
    let samples = preset.sample(20_000, 1);
    let unit = WorkloadSummary::from_samples(&grid, &samples, 1.0).unwrap();
    let rate = 0.6 * f64::from(num_instances) / unit.work_per_second(profile);
    WorkloadSummary::from_samples(&grid, &samples, rate).unwrap()
}

fn bench_partition(c: &mut Criterion) {
    let profile = gpu();
    let mut group = c.benchmark_group("partition");
    group.sample_size(10);
    for (n, b) in [(64u32, 128usize), (512, 256)] {
        let w = workload(n, b, &profile);
        let options = PartitionOptions { num_instances: n, max_stages: None };
        group.bench_with_input(BenchmarkId::new("long-context-mixed", format!("N{n}_B{b}")), &w, |bench, w| {
            bench.iter(|| partition(black_box(w), &profile, &options).unwrap())
        });
    }
    // A stage limit, as the stage-count selection asks for every count below the DP's own.
    let w = workload(64, 128, &profile);
    let options = PartitionOptions { num_instances: 64, max_stages: Some(6) };
    group.bench_with_input(BenchmarkId::new("long-context-mixed-max6", "N64_B128"), &w, |bench, w| {
        bench.iter(|| partition(black_box(w), &profile, &options).unwrap())
    });
    group.finish();
}

fn router() -> Router {
    let ids = |r: std::ops::Range<u32>| r.map(InstanceId).collect::<Vec<_>>();
    let layout = StageLayout::new(vec![
        StageRange { min_len: 0, max_len: 2048, instances: ids(0..8) },
        StageRange { min_len: 2048, max_len: 16_384, instances: ids(8..12) },
        StageRange { min_len: 16_384, max_len: 131_072, instances: ids(12..16) },
    ])
    .unwrap();
    Router::new(gpu(), layout).unwrap()
}

fn bench_router(c: &mut Criterion) {
    let mut r = router();
    // One engine step of 256 requests on instance 3; every 16th has just crossed the bound.
    let entries: Vec<StepEntry> = (0..256u64)
        .map(|k| StepEntry {
            request: RequestId(k),
            instance: InstanceId(3),
            context_len: if k % 16 == 0 { 2048 } else { 100 + (k as u32) * 7 },
        })
        .collect();
    c.bench_function("check_step_256", |b| {
        b.iter(|| {
            let moves = r.check_step(black_box(&entries)).unwrap();
            for m in &moves {
                r.migration_done(m, false);
            }
            moves
        })
    });
    // A fresh router per batch of admissions so queued load never fills the instances.
    c.bench_function("admit", |b| {
        b.iter_batched_ref(router, |r| r.admit(RequestId(0), black_box(700)).unwrap(), BatchSize::SmallInput)
    });
}

criterion_group!(benches, bench_partition, bench_router);
criterion_main!(benches);
