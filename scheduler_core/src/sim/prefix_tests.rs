//! Prefix caches in the simulator: hits, eviction, migrated KV, and traces without reuse.

use super::tests::{baseline, bimodal, ids, run, two_stage};
use super::*;
use crate::arrivals::{generate_trace, ArrivalProcess};
use crate::baselines::BaselineKind;
use crate::cascade::{CascadeConfig, CascadePolicy, OneStageTurns};
use crate::cost::tests::gpu;
use crate::grid::BucketGrid;
use crate::layout::StageLayout;
use crate::presets::Preset;
use crate::session::{SessionId, SessionTurn};

fn turn(arrival_s: f64, prompt_len: u32, output_len: u32, session: u64, turn: u32, prefix_len: u32) -> TraceRequest {
    TraceRequest {
        session: Some(SessionTurn { session: SessionId(session), turn, prefix_len }),
        ..TraceRequest::new(arrival_s, prompt_len, output_len)
    }
}

fn without_sessions(trace: &[TraceRequest]) -> Vec<TraceRequest> {
    trace.iter().map(|r| TraceRequest { session: None, ..*r }).collect()
}

#[test]
fn a_turn_where_its_session_ran_skips_the_cached_prefill() {
    let p = gpu();
    let block = p.kv_block_size;
    let trace = [turn(0.0, 4000, 50, 1, 0, 0), turn(30.0, 8000, 50, 1, 1, 4050)];
    let cached = run(&mut baseline(BaselineKind::LeastLoad, &p, 1), &p, &trace);
    let cold = run(&mut baseline(BaselineKind::LeastLoad, &p, 1), &p, &without_sessions(&trace));
    // Turn 0 left 4,049 tokens of KV (its last sampled token has none): whole blocks of them.
    let hit = 4049 / block * block;
    assert_eq!(cached.requests[1].num_cached_prompt_tokens, hit);
    assert_eq!(cached.summary.prefix_cache_hit_rate, f64::from(hit) / 12_000.0);
    let (warm, cold_ttft) = (cached.requests[1].ttft_s().unwrap(), cold.requests[1].ttft_s().unwrap());
    assert!(warm < 0.7 * cold_ttft, "TTFT {warm} with the prefix cached, {cold_ttft} without");
    assert_eq!(cold.summary.prefix_cache_hit_rate, 0.0);
    assert_eq!(cached.instances[0].final_kv_tokens, 0, "cached blocks are free blocks");
}

#[test]
fn other_requests_evict_the_least_recently_used_prefix_tail_first() {
    let p = CostProfile { kv_capacity_tokens: 2048, ..gpu() };
    let block = p.kv_block_size;
    let total = (2048 / block) as i64;
    // A's 1,009 computed tokens are cached (63 blocks); B then needs ceil(1510 / 16) blocks
    // of the pool at its peak, which evicts A's tail down to what stays free beside B.
    let trace = [turn(0.0, 1000, 10, 1, 0, 0), TraceRequest::new(5.0, 1500, 10), turn(30.0, 1200, 10, 1, 1, 1010)];
    let report = run(&mut baseline(BaselineKind::LeastLoad, &p, 1), &p, &trace);
    let a_blocks = 1009 / block as i64;
    let b_blocks = (1500 + 10 - 1 + block as i64 - 1) / block as i64;
    let kept = a_blocks.min(total - b_blocks).max(0) as u32;
    assert!(kept > 0 && kept < 1009 / block, "the test needs a partial eviction ({kept})");
    assert_eq!(report.requests[2].num_cached_prompt_tokens, kept * block);
}

#[test]
fn a_migrated_requests_kv_is_cached_where_it_ended() {
    let p = gpu();
    let block = p.kv_block_size;
    // Turn 0 starts in stage [0, 512) and migrates to stage [512, max) while it decodes; turn 1
    // (past 512) is admitted to that stage and finds the KV there.
    let trace = [turn(0.0, 500, 600, 4, 0, 0), turn(30.0, 1200, 20, 4, 1, 1100)];
    let report = run(&mut two_stage(&p, 512, 1), &p, &trace);
    assert_eq!(report.requests[0].num_migrations, 1);
    assert_eq!(report.requests[1].num_cached_prompt_tokens, 1099 / block * block);
}

#[test]
fn sessions_that_share_nothing_simulate_exactly_as_no_sessions() {
    let p = gpu();
    let plain = bimodal(1500, 12.0, 3);
    let alone: Vec<TraceRequest> =
        plain.iter().enumerate().map(|(i, r)| turn(r.arrival_s, r.prompt_len, r.output_len, i as u64, 0, 0)).collect();
    for kind in [BaselineKind::LeastLoad, BaselineKind::Llumnix] {
        let a = run(&mut baseline(kind, &p, 4), &p, &plain);
        let b = run(&mut baseline(kind, &p, 4), &p, &alone);
        assert_eq!(a, b, "{kind:?}");
    }
    let a = run(&mut two_stage(&p, 4096, 2), &p, &plain);
    let b = run(&mut two_stage(&p, 4096, 2), &p, &alone);
    assert_eq!(a, b, "cascade");
}

#[test]
fn cache_aware_is_least_load_exactly_on_requests_without_sessions() {
    let p = gpu();
    let trace = bimodal(1500, 14.0, 5);
    let mut ours = run(&mut baseline(BaselineKind::CacheAware, &p, 4), &p, &trace);
    let theirs = run(&mut baseline(BaselineKind::LeastLoad, &p, 4), &p, &trace);
    assert_eq!(ours.policy, "cache-aware");
    ours.policy = theirs.policy.clone();
    assert_eq!(ours, theirs);
}

/// One stage of `n` instances of cascade placing sessions' turns as `turns` says (and other
/// requests Llumnix's way where `is_kv_first`).
fn one_stage_with_turns(p: &CostProfile, n: u32, turns: OneStageTurns, is_kv_first: bool) -> CascadePolicy {
    let config = CascadeConfig {
        one_stage_turns: turns,
        is_one_stage_kv_first: is_kv_first,
        is_refine_enabled: true,
        ..CascadeConfig::default()
    };
    let layout = StageLayout::single(p.max_model_len, &ids(n)).unwrap();
    let grid = BucketGrid::geometric(p.max_model_len, 64, 16).unwrap();
    CascadePolicy::new(p.clone(), layout, grid, config, None).unwrap()
}

#[test]
fn one_stage_placing_turns_as_a_baseline_does_is_that_baseline_exactly() {
    // The one-stage forms the planner can fall back to on multi-turn traffic: turns placed
    // blind to the caches (least-load, or Llumnix's way) or by the cache-aware rule make that
    // baseline's every decision, so the selection can pick whichever of them simulates better.
    let p = gpu();
    let trace = generate_trace(Preset::Agentic, 2000, 5.0, ArrivalProcess::Poisson, 3).unwrap();
    assert!(trace.iter().any(|r| r.session.is_some_and(|s| s.prefix_len > 0)), "turns reuse prefixes");
    for (turns, is_kv_first, kind) in [
        (OneStageTurns::Blind, false, BaselineKind::LeastLoad),
        (OneStageTurns::Blind, true, BaselineKind::Llumnix),
        (OneStageTurns::CacheAware, false, BaselineKind::CacheAware),
    ] {
        let expected = run(&mut baseline(kind, &p, 8), &p, &trace);
        let got = run(&mut one_stage_with_turns(&p, 8, turns, is_kv_first), &p, &trace);
        // Every decision alike (the reports differ only in the policy's name and the label of
        // Llumnix's moves).
        assert_eq!(got.summary, expected.summary, "{turns:?}, KV first {is_kv_first}");
        assert_eq!(got.requests, expected.requests, "{turns:?}, KV first {is_kv_first}");
    }
    // And cascade's own way is neither.
    let own = run(&mut one_stage_with_turns(&p, 8, OneStageTurns::Cheapest, false), &p, &trace);
    let least_load = run(&mut baseline(BaselineKind::LeastLoad, &p, 8), &p, &trace);
    assert!(own.summary.prefix_cache_hit_rate > least_load.summary.prefix_cache_hit_rate);
}
