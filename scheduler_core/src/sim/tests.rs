use super::*;
use crate::arrivals::{generate_trace, ArrivalProcess};
use crate::baselines::{Baseline, BaselineKind, LlumnixConfig};
use crate::cascade::{CascadeConfig, CascadePolicy};
use crate::cost::tests::gpu;
use crate::grid::BucketGrid;
use crate::layout::{StageLayout, StageRange};
use crate::presets::Preset;
use crate::rng::Rng;

pub(super) fn ids(n: u32) -> Vec<InstanceId> {
    (0..n).map(InstanceId).collect()
}

/// Stages `[0, bound)` and `[bound, max)` with `n` instances each; refinement off.
pub(super) fn two_stage(profile: &CostProfile, bound: u32, n: u32) -> CascadePolicy {
    let max_len = profile.max_model_len;
    let layout = StageLayout::new(vec![
        StageRange { min_len: 0, max_len: bound, instances: (0..n).map(InstanceId).collect() },
        StageRange { min_len: bound, max_len, instances: (n..2 * n).map(InstanceId).collect() },
    ])
    .unwrap();
    let grid = BucketGrid::new(vec![0, bound, max_len]).unwrap();
    CascadePolicy::new(profile.clone(), layout, grid, CascadeConfig::default(), None).unwrap()
}

pub(super) fn baseline(kind: BaselineKind, profile: &CostProfile, n: u32) -> Baseline {
    Baseline::new(kind, profile.clone(), &ids(n), profile.max_model_len, 7, LlumnixConfig::default()).unwrap()
}

/// `simulate` with the wall time zeroed, so two reports compare on what they simulated.
pub(super) fn run(policy: &mut dyn Policy, profile: &CostProfile, trace: &[TraceRequest]) -> SimReport {
    let n = policy.layout().num_instances() as u32;
    let mut report = simulate(policy, profile, trace, &ids(n), &SimConfig::default()).unwrap();
    report.summary.sim_wall_s = 0.0;
    report
}

pub(super) fn bimodal(n: usize, rate: f64, seed: u64) -> Vec<TraceRequest> {
    generate_trace(Preset::Bimodal, n, rate, ArrivalProcess::Poisson, seed).unwrap()
}

/// Requests whose prompts fit under `bound` and whose outputs take them past it, 0.5 s apart:
/// light enough that none starts in a second stage (a swamped stage sends new requests on to
/// the next, `Router::cheaper_next_stage`).
fn crossing_trace(n: usize, bound: u32, seed: u64) -> Vec<TraceRequest> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|k| TraceRequest {
            arrival_s: k as f64 * 0.5,
            prompt_len: rng.range_u32(bound / 2, bound - 100),
            output_len: rng.range_u32(bound / 2 + 100, bound),
            session: None,
        })
        .collect()
}

fn assert_conserved(report: &SimReport, trace: &[TraceRequest], profile: &CostProfile) {
    let n = trace.len() as u64;
    assert_eq!((report.summary.completed, report.num_unfinished), (n, 0), "{}", report.policy);
    let wanted: u64 = trace.iter().map(|r| u64::from(r.output_len)).sum();
    assert_eq!(report.total_output_tokens, wanted, "{}", report.policy);
    for r in &report.requests {
        let (queue, ttft, e2e) = (r.queue_s().unwrap(), r.ttft_s().unwrap(), r.e2e_s().unwrap());
        assert!(0.0 <= queue && queue < ttft && ttft <= e2e, "{r:?}");
    }
    assert_eq!(report.requests.iter().map(|r| u64::from(r.num_migrations)).sum::<u64>(), report.summary.migrations);
    assert_eq!(report.requests.iter().map(|r| u64::from(r.num_preemptions)).sum::<u64>(), report.num_preemptions);
    for i in &report.instances {
        assert!(i.peak_kv_tokens <= profile.kv_capacity_tokens, "{i:?}");
        assert!(i.peak_batch_tokens <= profile.max_batch_tokens && i.peak_batch_seqs <= profile.max_num_seqs, "{i:?}");
        assert_eq!(i.final_kv_tokens, 0, "{i:?}");
    }
}

#[test]
fn same_seed_same_report_other_seed_another() {
    fn cascade() -> Box<dyn Policy> {
        Box::new(two_stage(&gpu(), 2048, 2))
    }
    fn llumnix() -> Box<dyn Policy> {
        Box::new(baseline(BaselineKind::Llumnix, &gpu(), 4))
    }
    fn power_of_two() -> Box<dyn Policy> {
        Box::new(baseline(BaselineKind::PowerOfTwo, &gpu(), 4))
    }
    let p = gpu();
    for make in [cascade, llumnix, power_of_two] {
        let a = run(make().as_mut(), &p, &bimodal(400, 4.0, 1));
        assert_eq!(a, run(make().as_mut(), &p, &bimodal(400, 4.0, 1)), "{}", a.policy);
        assert_ne!(a.requests, run(make().as_mut(), &p, &bimodal(400, 4.0, 2)).requests, "{}", a.policy);
    }
}

#[test]
fn every_request_completes_within_the_engine_limits() {
    let p = gpu();
    let trace = bimodal(300, 4.0, 3);
    let kinds = [BaselineKind::RoundRobin, BaselineKind::LeastLoad, BaselineKind::PowerOfTwo, BaselineKind::Llumnix];
    let mut policies: Vec<Box<dyn Policy>> = vec![Box::new(two_stage(&p, 2048, 2))];
    policies.extend(kinds.map(|k| Box::new(baseline(k, &p, 4)) as Box<dyn Policy>));
    for mut policy in policies {
        let report = run(policy.as_mut(), &p, &trace);
        assert_conserved(&report, &trace, &p);
        assert!(report.summary.throughput_tok_s > 0.0 && report.makespan_s > 0.0);
    }
}

#[test]
fn crossing_a_stage_bound_migrates_under_cascade_and_not_under_round_robin() {
    let p = gpu();
    let trace = crossing_trace(40, 512, 5);
    // One instance a stage: no balancing moves, only the stage-bound ones.
    let cascade = run(&mut two_stage(&p, 512, 1), &p, &trace);
    assert_conserved(&cascade, &trace, &p);
    assert!(cascade.summary.migrations > 0);
    assert_eq!(cascade.migrations_by_reason.get("stage_bound"), Some(&cascade.summary.migrations));
    // Every request ends in the second stage: each crossed once and the moves had room.
    assert!(cascade.requests.iter().all(|r| r.num_migrations == 1), "{:?}", cascade.failed_migrations_by_reason);
    let rr = run(&mut baseline(BaselineKind::RoundRobin, &p, 4), &p, &trace);
    assert_conserved(&rr, &trace, &p);
    assert_eq!(rr.summary.migrations, 0);
    assert!(rr.migrations_by_reason.is_empty() && rr.failed_migrations_by_reason.is_empty());
}

#[test]
fn a_migration_stalls_for_the_pause_and_the_delta_not_the_whole_copy() {
    // A slow link makes the whole context's copy (~70 ms) larger than the fixed pause (25 ms).
    let p = CostProfile { migration_bandwidth_bytes_per_s: 1e9, ..gpu() };
    let trace = [TraceRequest::new(0.0, 500, 600)];
    let moved = run(&mut two_stage(&p, 512, 1), &p, &trace);
    let stayed = run(&mut baseline(BaselineKind::RoundRobin, &p, 2), &p, &trace);
    assert_eq!((moved.summary.migrations, stayed.summary.migrations), (1, 0));
    let stall = moved.summary.mean_e2e_s - stayed.summary.mean_e2e_s;
    let whole_copy = p.migration_stall(512) - p.migration_pause_s;
    assert!(stall > p.migration_pause_s, "stall {stall}");
    assert!(stall < p.migration_pause_s + whole_copy / 2.0, "stall {stall}, whole copy {whole_copy}");
}

#[test]
fn a_tiny_kv_cache_preempts_and_still_finishes_everything() {
    // The policy believes in the big cache; the engines have 2048 tokens each.
    let engines = CostProfile { kv_capacity_tokens: 2048, ..gpu() };
    let mut rng = Rng::new(9);
    let trace: Vec<TraceRequest> = (0..60)
        .map(|k| TraceRequest {
            arrival_s: k as f64 * 0.01,
            prompt_len: rng.range_u32(100, 400),
            output_len: rng.range_u32(200, 600),
            session: None,
        })
        .collect();
    let report = run(&mut baseline(BaselineKind::RoundRobin, &gpu(), 2), &engines, &trace);
    assert!(report.num_preemptions > 0);
    assert_conserved(&report, &trace, &engines);
    assert!(report.instances.iter().all(|i| i.peak_kv_tokens > 1500), "the cache was under pressure");
}

#[test]
fn a_migration_to_a_full_target_fails_and_the_request_finishes_where_it_is() {
    // Instance 1 (second stage) holds a long request that leaves it 24 free blocks; the short
    // request crossing 512 on instance 0 needs 33.
    let engines = CostProfile { kv_capacity_tokens: 8192, ..gpu() };
    let trace = [TraceRequest::new(0.0, 7800, 300), TraceRequest::new(0.001, 500, 100)];
    let report = run(&mut two_stage(&gpu(), 512, 1), &engines, &trace);
    assert_conserved(&report, &trace, &engines);
    assert_eq!(report.summary.migrations, 0);
    let failed = report.failed_migrations_by_reason.get("stage_bound").copied().unwrap_or(0);
    assert!(failed > 0);
    assert_eq!(report.failed_migrations_by_cause.get("no_room"), Some(&failed));
}

#[test]
fn the_stage_load_series_has_every_stage_at_every_tick() {
    let p = gpu();
    let report = run(&mut two_stage(&p, 2048, 2), &p, &bimodal(200, 4.0, 4));
    let s = &report.stage_load;
    let last_finish = report.requests.iter().filter_map(|r| r.finished_s).fold(0.0, f64::max);
    assert!((s.len() as f64 / 2.0 - last_finish / 0.5).abs() <= 1.0, "{} samples", s.len());
    assert!(s.chunks(2).all(|c| c[0].stage == 0 && c[1].stage == 1 && c[0].time_s == c[1].time_s));
    assert!(s.chunks(2).all(|c| c[0].num_instances + c[1].num_instances == 4), "a tick's stages hold the fleet");
    assert!(s.iter().any(|x| x.num_running > 0 && x.kv_tokens > 0));
    assert!(s.iter().all(|x| x.kv_tokens <= 2 * p.kv_capacity_tokens));
}

#[test]
fn bad_inputs_name_what_is_wrong() {
    let p = gpu();
    let trace = bimodal(10, 1.0, 1);
    let config = SimConfig::default();
    let err = |policy: &mut dyn Policy, trace: &[TraceRequest], instances: &[InstanceId], config: &SimConfig| {
        simulate(policy, &p, trace, instances, config).unwrap_err().to_string()
    };
    let mut rr = baseline(BaselineKind::RoundRobin, &p, 2);
    assert!(err(&mut rr, &trace, &ids(3), &config).contains("instances"));
    assert!(err(&mut rr, &[], &ids(2), &config).contains("trace"));
    let too_long = [TraceRequest::new(0.0, 131_000, 100)];
    assert!(err(&mut rr, &too_long, &ids(2), &config).contains("max_len"));
    let zero = [TraceRequest::new(0.0, 10, 0)];
    assert!(err(&mut rr, &zero, &ids(2), &config).contains("output_len"));
    // Past 2^53 half-seconds a tick no longer moves the clock: the run never ended.
    let far = [TraceRequest::new(0.0, 10, 10), TraceRequest::new(1e300, 10, 10)];
    assert!(err(&mut rr, &far, &ids(2), &config).contains("arrival_s"));
    let no_ticks = SimConfig { tick_interval_s: 0.0, ..config };
    assert!(err(&mut rr, &trace, &ids(2), &no_ticks).contains("tick_interval_s"));
    let small = CostProfile { kv_capacity_tokens: 1024, ..p.clone() };
    let big = [TraceRequest::new(0.0, 1000, 100)];
    let msg = simulate(&mut rr, &small, &big, &ids(2), &config).unwrap_err().to_string();
    assert!(msg.contains("KV"), "{msg}");
}

/// Requests that finish inside their first step never appear in a step feed, and an instance
/// left with nothing running sends none: their admission must not stay counted against the
/// instance (it once did, and admission refused the queue head for good once the sequence cap
/// filled with such ghosts).
#[test]
fn one_token_requests_leave_no_load_behind() {
    let mut profile = gpu();
    profile.max_num_seqs = 4;
    let trace: Vec<TraceRequest> = (0..200).map(|k| TraceRequest::new(k as f64 * 0.5, 100, 1)).collect();
    for policy in [
        &mut two_stage(&profile, 2048, 1) as &mut dyn Policy,
        &mut baseline(BaselineKind::LeastLoad, &profile, 2),
        &mut baseline(BaselineKind::Llumnix, &profile, 2),
    ] {
        let report = run(policy, &profile, &trace);
        assert_conserved(&report, &trace, &profile);
        let worst_queue = report.requests.iter().map(|r| r.queue_s().unwrap()).fold(0.0, f64::max);
        assert!(worst_queue < 0.5, "{}: a request waited {worst_queue} s for admission", report.policy);
        for inst in 0..2 {
            assert_eq!(policy.router().loads().get(InstanceId(inst)).kv_tokens(), 0, "{}", report.policy);
        }
    }
}

#[test]
fn one_unbalanced_stage_is_least_load_exactly() {
    // The no-regret fallback: a one-stage cascade without balancing makes least-load's every
    // decision, refinement on or off, so the planner can always fall back to it.
    let p = gpu();
    let trace = bimodal(3000, 12.0, 5);
    let mut least_load = baseline(BaselineKind::LeastLoad, &p, 8);
    let expected = run(&mut least_load, &p, &trace);
    for is_refine_enabled in [false, true] {
        let config = CascadeConfig { is_refine_enabled, ..CascadeConfig::default() };
        let layout = StageLayout::single(p.max_model_len, &ids(8)).unwrap();
        let grid = BucketGrid::geometric(p.max_model_len, 64, 16).unwrap();
        let mut cascade = CascadePolicy::new(p.clone(), layout, grid, config, None).unwrap();
        let got = run(&mut cascade, &p, &trace);
        assert_eq!(got.summary, expected.summary, "refine {is_refine_enabled}");
        assert_eq!(got.requests, expected.requests);
    }
    let balanced = CascadeConfig { is_one_stage_balanced: true, ..CascadeConfig::default() };
    let layout = StageLayout::single(p.max_model_len, &ids(8)).unwrap();
    let grid = BucketGrid::geometric(p.max_model_len, 64, 16).unwrap();
    let mut cascade = CascadePolicy::new(p.clone(), layout, grid, balanced, None).unwrap();
    assert!(run(&mut cascade, &p, &trace).summary.migrations > 0, "balancing one stage moves requests");
}

#[test]
fn one_kv_first_stage_is_llumnix_exactly() {
    // The other single-pool fallback: one stage run Llumnix's way makes the Llumnix baseline's
    // every decision (dispatch by free KV per request, moves that even KV usage), so the
    // planner can pick it where that policy beats least-load.
    let p = gpu();
    let trace = bimodal(3000, 12.0, 5);
    let mut llumnix = baseline(BaselineKind::Llumnix, &p, 8);
    let expected = run(&mut llumnix, &p, &trace);
    assert!(expected.summary.migrations > 0, "the trace makes Llumnix move requests");
    let config = CascadeConfig { is_one_stage_kv_first: true, ..CascadeConfig::default() };
    let layout = StageLayout::single(p.max_model_len, &ids(8)).unwrap();
    let grid = BucketGrid::geometric(p.max_model_len, 64, 16).unwrap();
    let mut cascade = CascadePolicy::new(p.clone(), layout, grid, config, None).unwrap();
    let got = run(&mut cascade, &p, &trace);
    assert_eq!(got.summary, expected.summary);
    assert_eq!(got.requests, expected.requests);
}
