//! Simulator speed: 1,000,000 requests on 64 instances of the built-in GPU profile, scheduled by
//! the cascade policy (planned by the partitioner) and by round-robin.
//!
//! `cargo run --release --example sim_speed [-- NUM_REQUESTS [PRESET [UTILIZATION]]]`
//! (defaults: 1000000 bimodal 0.3). The arrival rate is UTILIZATION of the fleet's estimated
//! capacity for the preset (`WorkloadSummary::work_per_second`, which leaves out the per-step
//! overhead: at the 0.6 `cascade plan` assumes, round-robin falls behind on bimodal traffic and
//! both policies do on short-chat).

use std::time::Instant;

use scheduler_core::cost::builtin_profile;
use scheduler_core::{
    generate_trace, partition, simulate, ArrivalProcess, Baseline, BaselineKind, BucketGrid, CascadeConfig,
    CascadePolicy, CostProfile, InstanceId, LlumnixConfig, PartitionOptions, Policy, Preset, SimConfig, SimReport,
    StageLayout, WorkloadSummary,
};

const NUM_INSTANCES: u32 = 64;

fn print(report: &SimReport, num_requests: usize) {
    let s = &report.summary;
    println!(
        "{:<12} wall {:>6.2} s  {:>9.0} simulated requests/s  (simulated {:.0} s, {} steps, completed {}, \
         migrations {} landed {:?} failed, preemptions {}, layout changes {})",
        report.policy,
        s.sim_wall_s,
        num_requests as f64 / s.sim_wall_s,
        report.makespan_s,
        report.instances.iter().map(|i| i.num_steps).sum::<u64>(),
        s.completed,
        s.migrations,
        report.failed_migrations_by_cause,
        report.num_preemptions,
        report.num_layout_changes,
    );
    println!(
        "{:<12} e2e mean {:.3} s p99 {:.3} s | ttft mean {:.3} s p99 {:.3} s | tpot mean {:.1} ms p99 {:.1} ms | \
         {:.0} tok/s",
        "",
        s.mean_e2e_s,
        s.p99_e2e_s,
        s.mean_ttft_s,
        s.p99_ttft_s,
        s.mean_tpot_s * 1e3,
        s.p99_tpot_s * 1e3,
        s.throughput_tok_s
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num_requests: usize = args.get(1).map_or(1_000_000, |a| a.parse().expect("NUM_REQUESTS is an integer"));
    let preset = Preset::from_name(args.get(2).map_or("bimodal", String::as_str)).expect("a preset name");
    let utilization: f64 = args.get(3).map_or(0.3, |a| a.parse().expect("UTILIZATION is a number"));

    let profile = CostProfile::from_json(builtin_profile("gpu-h100-llama3-8b").unwrap()).unwrap();
    let max_len = preset.max_len().min(profile.max_model_len);
    let grid = BucketGrid::geometric(max_len, 128, 16).unwrap();
    let samples = preset.sample(20_000, 0);
    let unit = WorkloadSummary::from_samples(&grid, &samples, 1.0).unwrap();
    let rate = utilization * f64::from(NUM_INSTANCES) / unit.work_per_second(&profile);
    let workload = WorkloadSummary::from_samples(&grid, &samples, rate).unwrap();
    let options = PartitionOptions { num_instances: NUM_INSTANCES, max_stages: None };
    let plan = partition(&workload, &profile, &options).unwrap();
    let ids: Vec<InstanceId> = (0..NUM_INSTANCES).map(InstanceId).collect();
    let stages: Vec<String> =
        plan.stages.iter().map(|s| format!("[{}, {}) x{}", s.min_len, s.max_len, s.num_instances)).collect();
    println!("{} requests of {} at {rate:.1} req/s on {NUM_INSTANCES} instances", num_requests, preset.name());
    println!("cascade plan: {}", stages.join(", "));

    let started = Instant::now();
    let trace = generate_trace(preset, num_requests, rate, ArrivalProcess::Poisson, 1).unwrap();
    println!("trace generated in {:.2} s", started.elapsed().as_secs_f64());

    let config = SimConfig::default();
    let cascade_config = CascadeConfig { is_refine_enabled: true, ..CascadeConfig::default() };
    let layout = StageLayout::from_plan(&plan, &ids).unwrap();
    let mut cascade = CascadePolicy::new(profile.clone(), layout, grid, cascade_config, Some(&workload)).unwrap();
    let mut round_robin =
        Baseline::new(BaselineKind::RoundRobin, profile.clone(), &ids, max_len, 0, LlumnixConfig::default()).unwrap();
    let policies: [&mut dyn Policy; 2] = [&mut cascade, &mut round_robin];
    for policy in policies {
        let report = simulate(policy, &profile, &trace, &ids, &config).unwrap();
        print(&report, num_requests);
    }
}
